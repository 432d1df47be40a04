"""Flower's SecAgg+ pieces (Bell et al. 2020) that Pollinate's secure aggregation reuses.

Flower 1.42 ships SecAgg+ for its older workflow API only: ``SecAggPlusWorkflow`` drives a
legacy ``Strategy`` through a ``LegacyContext``, which Pollinate's Message-API strategies
are not. Pollinate keeps Flower's *client* side whole (the public ``secaggplus_mod``, which
speaks the four-stage protocol) and drives the same stages from its own server code
(:mod:`pollinate.server.secagg`), using Flower's primitives for everything cryptographic:
key agreement, Shamir shares, the mask generator, quantization. Those primitives, the
protocol's record keys and the legacy ``FitRes`` layout the mod reads live in non-public
modules, so they are imported here, once, with the signatures Pollinate relies on checked
at import (a Flower that changed them is a one-line :class:`FlowerIncompatible`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Parameters, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    factor_extract,
    parameters_addition,
    parameters_mod,
    parameters_subtraction,
)
from flwr.common.secure_aggregation.quantization import dequantize
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    RECORD_KEY_STATE,
    Key,
    Stage,
)
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
from flwr.compat.common.recorddict_compat import fitres_to_recorddict
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

from pollinate.flower_compat._core import FlowerIncompatible, require_parameters

# What each function must take: the server stages call them exactly as Flower's own
# SecAggPlusWorkflow does (flwr/server/workflow/secure_aggregation/secaggplus_workflow.py).
_SIGNATURES: dict[str, tuple[Callable[..., Any], tuple[str, ...]]] = {
    "secaggplus_mod": (secaggplus_mod, ("msg", "ctxt", "call_next")),
    "combine_shares": (combine_shares, ("share_list",)),
    "generate_shared_key": (generate_shared_key, ("private_key", "public_key")),
    "pseudo_rand_gen": (pseudo_rand_gen, ("seed", "num_range", "dimensions_list")),
    "dequantize": (dequantize, ("quantized_parameters", "clipping_range", "target_range")),
    "factor_extract": (factor_extract, ("parameters",)),
    "fitres_to_recorddict": (fitres_to_recorddict, ("fitres", "keep_input")),
}


def check_secagg_api() -> None:
    """Raise :class:`FlowerIncompatible` if a reused SecAgg+ function changed its signature,
    or the stage names the client mod expects are not the four Pollinate sends."""
    for name, (fn, expected) in _SIGNATURES.items():
        require_parameters(fn, expected, what=name)
    stages = (Stage.SETUP, Stage.SHARE_KEYS, Stage.COLLECT_MASKED_VECTORS, Stage.UNMASK)
    if Stage.all() != stages:
        raise FlowerIncompatible(
            f"flwr's SecAgg+ stages are {Stage.all()}, Pollinate drives {stages}"
        )


check_secagg_api()

__all__ = [
    "RECORD_KEY_CONFIGS",
    "RECORD_KEY_STATE",
    "Code",
    "FitRes",
    "Key",
    "Parameters",
    "Stage",
    "Status",
    "bytes_to_private_key",
    "bytes_to_public_key",
    "check_secagg_api",
    "combine_shares",
    "dequantize",
    "factor_extract",
    "fitres_to_recorddict",
    "generate_shared_key",
    "ndarrays_to_parameters",
    "parameters_addition",
    "parameters_mod",
    "parameters_subtraction",
    "pseudo_rand_gen",
    "secaggplus_mod",
]
