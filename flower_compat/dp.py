"""Flower's differential-privacy helpers that the user-level DP layer builds on.

Why: Pollinate's user-level DP (:mod:`pollinate.server.privacy`) wraps Flower's public
``DifferentialPrivacy{Client,Server}Side{Fixed,Adaptive}Clipping`` strategies, which talk to
the ClientApp through two config/metric keys and size their noise with ``compute_stdv``;
those live in the non-public ``flwr.supercore.differential_privacy``. Pollinate needs the
same keys (its nodes clip per user before the wrappers see the mean) and the same noise
formula (it applies it to the users actually in the mean). Stock Flower has no public name
for either; a change is a one-line error at import, not a silently different noise.
"""

from __future__ import annotations

from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, KEY_NORM_BIT, compute_stdv

from pollinate import protocol
from pollinate.flower_compat._core import FlowerIncompatible, flower_version, require_parameters

require_parameters(
    compute_stdv,
    ("noise_multiplier", "clipping_norm", "num_sampled_clients"),
    what="flwr.supercore.differential_privacy.compute_stdv",
)
# protocol.py spells Flower's two DP keys so that client/ and server/ share them.
if (KEY_CLIPPING_NORM, KEY_NORM_BIT) != (protocol.CLIPPING_NORM, protocol.NORM_BIT):
    raise FlowerIncompatible(
        f"flwr {flower_version()}: its DP keys are ({KEY_CLIPPING_NORM!r}, {KEY_NORM_BIT!r}), "
        f"Pollinate's protocol expects ({protocol.CLIPPING_NORM!r}, {protocol.NORM_BIT!r})"
    )

__all__ = ["KEY_CLIPPING_NORM", "KEY_NORM_BIT", "compute_stdv"]
