"""The one door to Flower's internals.

Every non-public Flower name Pollinate uses is imported in this package, one small module per
thing it changes, each saying why it is needed. Importing the package checks the installed
Flower against the range Pollinate is written for (:data:`SUPPORTED_FLOWER`); each patch
checks the signatures it relies on before it is applied and is undone when its ``with`` block
ends. A mismatch is never silent: either a one-line :class:`FlowerIncompatible` error, or,
where stock Flower can do the job (only slower), a one-line warning and the stock path.
"""

from pollinate.flower_compat._core import (
    SUPPORTED_FLOWER,
    SUPPORTED_RANGE,
    FlowerIncompatible,
    active_patches,
    check_flower_version,
    engaged,
    flower_version,
    mark_engaged,
    parameters,
    require_leading_parameters,
    require_parameters,
    signature_matches,
    swapped,
    warn_fallback,
)

check_flower_version()

__all__ = [
    "SUPPORTED_FLOWER",
    "SUPPORTED_RANGE",
    "FlowerIncompatible",
    "active_patches",
    "check_flower_version",
    "engaged",
    "flower_version",
    "mark_engaged",
    "parameters",
    "require_leading_parameters",
    "require_parameters",
    "signature_matches",
    "swapped",
    "warn_fallback",
]
