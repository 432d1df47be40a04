"""FedProx's Synthetic(alpha, beta) data (Li et al. 2020, "Federated Optimization in
Heterogeneous Networks", Sec. 5.1, and its released generator ``data/synthetic_*``).

Per user k (60 features, 10 classes)::

    u_k ~ N(0, alpha^2)       B_k ~ N(0, beta^2)       # alpha, beta are standard deviations
    W_k ~ N(u_k, 1)  (60, 10)  b_k ~ N(u_k, 1)  (10,)  v_k ~ N(B_k, 1)  (60,)
    x ~ N(v_k, Sigma),  Sigma = diag(j^-1.2), j = 1..60
    y = argmax softmax(x W_k + b_k)
    n_k = int(lognormal(4, 2)) + 50, capped at SYNTHETIC_MAX_SAMPLES

``alpha`` controls how much users' models differ, ``beta`` how much their inputs differ.
The IID variant uses one W, b ~ N(0, 1) shared by all users and x ~ N(0, Sigma).

Unlike the released generator (one global stream for all users), user k is drawn from
``np.random.default_rng([seed, k])`` alone (`seeds.user_rng`), so any subset of users can
be generated independently and identically; the IID model comes from `seeds.shared_rng`.
"""

from __future__ import annotations

import numpy as np

from .seeds import shared_rng

NUM_FEATURES = 60
NUM_CLASSES = 10
SYNTHETIC_MIN_SAMPLES = 50
# lognormal(4, 2) has a heavy tail (about 0.5% of users would exceed 10,000 samples and the
# largest of 10,000 users typically exceeds 10^6), so n_k is capped here.
SYNTHETIC_MAX_SAMPLES = 10_000

_SIGMA_DIAG = np.arange(1, NUM_FEATURES + 1, dtype=np.float64) ** -1.2  # (60,)


def shared_model(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The IID variant's (W, b), shapes (60, 10) and (10,), drawn from N(0, 1)."""
    rng = shared_rng(seed)
    w = rng.normal(0.0, 1.0, (NUM_FEATURES, NUM_CLASSES))
    b = rng.normal(0.0, 1.0, NUM_CLASSES)
    return w, b


def generate_user(
    rng: np.random.Generator,
    alpha: float,
    beta: float,
    shared: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One user's ``(x float32 (n, 60), y int64 (n,))``.

    With ``shared = (W, b)`` (the IID variant) ``alpha`` and ``beta`` are unused, every user
    shares W and b, and x ~ N(0, Sigma).
    """
    n = SYNTHETIC_MIN_SAMPLES + int(
        min(rng.lognormal(4.0, 2.0), SYNTHETIC_MAX_SAMPLES - SYNTHETIC_MIN_SAMPLES)
    )
    if shared is None:
        u = rng.normal(0.0, alpha)
        big_b = rng.normal(0.0, beta)
        w = rng.normal(u, 1.0, (NUM_FEATURES, NUM_CLASSES))
        b = rng.normal(u, 1.0, NUM_CLASSES)
        v = rng.normal(big_b, 1.0, NUM_FEATURES)  # (60,)
    else:
        w, b = shared
        v = np.zeros(NUM_FEATURES)
    x = v + rng.standard_normal((n, NUM_FEATURES)) * np.sqrt(_SIGMA_DIAG)  # (n, 60)
    y = np.argmax(x @ w + b, axis=1)  # softmax is monotone, so argmax of the logits
    return x.astype(np.float32), y.astype(np.int64)
