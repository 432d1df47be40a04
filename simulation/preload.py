"""Imported by the local backend's fork server: the run's data, read once for all workers.

The fork server (:mod:`pollinate.simulation.workers`) imports the ClientApp's module and
then this one, before it forks any worker. With :data:`RUN_CONFIG_ENV` set (by
:func:`pollinate.simulation.engine.run_simulation`, only while the server starts) it reads
the run's dataset into the ClientApp's cache (:func:`pollinate.client.local.
preload_simulated_data`), so the workers forked from it share one parsed copy: without it
each worker parsed the users file itself on its first message (0.3-1.5 s each, on the same
two cores as the driver), after the driver had parsed it too. The fork server does this
while the driver imports Flower's engine.

A failure here is not raised (the fork server would die with it): the workers then read
the data themselves and report what is wrong as their replies, as without this module.
"""

from __future__ import annotations

import json
import os

RUN_CONFIG_ENV = "POLLINATE_PRELOAD_RUN_CONFIG"


def preload_from_environment() -> bool:
    """Read the dataset of the run config in :data:`RUN_CONFIG_ENV`; True if it was read."""
    text = os.environ.get(RUN_CONFIG_ENV)
    if not text:
        return False
    try:
        from pollinate.client.local import preload_simulated_data
        from pollinate.config import resolve

        preload_simulated_data(resolve(json.loads(text), ignore_unknown=True))
    except Exception:  # the workers meet the same error on their first message, and say it
        return False
    return True


preload_from_environment()
