"""``python -m pollinate`` is the ``pollinate`` command."""

import sys

from pollinate.cli import main

sys.exit(main())
