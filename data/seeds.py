"""Random streams. Every stream is a pure function of the seed and a key, so any subset of
users can be built in any process, in any order, with identical results."""

from __future__ import annotations

import hashlib

import numpy as np


def user_rng(seed: int, k: int) -> np.random.Generator:
    """User number k's stream (synthetic generation, then its train/test split)."""
    return np.random.default_rng([seed, k])


def shared_rng(seed: int) -> np.random.Generator:
    """Draws shared by all users (central test set, partition, IID model).

    Independent of every `user_rng` stream; plain ``default_rng(seed)`` is not, since it
    equals ``default_rng([seed, 0])``, user 0's stream.
    """
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1,)))


def file_user_rng(seed: int, user_id: str) -> np.random.Generator:
    """A file user's train/test split stream, keyed by its id rather than its position, so a
    device that loads only its own rows splits them exactly as the simulation does."""
    digest = hashlib.sha256(user_id.encode()).digest()
    return np.random.default_rng([seed, int.from_bytes(digest[:8], "little"), 2])
