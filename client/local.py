"""What one Flower node holds: the users it hosts and their data.

A node hosts a *cohort* of users. In simulation, node ``p`` of ``N`` hosts every user whose
index ``k`` has ``k % N == p`` (``N`` = number of users gives Flower's one-node-per-user
layout). On a device, the node hosts the users in its own data file (usually one).
"""

from __future__ import annotations

import functools
import os
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from pollinate import protocol
from pollinate.config import RunConfig, data_spec
from pollinate.data import (
    DataError,
    FederatedDataset,
    UserData,
    load_federated_dataset,
    load_user_file,
    split_user,
)


@dataclass(frozen=True)
class Cohort:
    """The users one node trains, in a stable order."""

    users: Mapping[str, UserData]

    @property
    def user_ids(self) -> list[str]:
        return list(self.users)


class _LazyUsers(Mapping[str, UserData]):
    """A node's simulated users, each built on first access (and kept in the dataset's
    bounded cache): a node hosting 5,000 of 10,000 synthetic users never holds them all."""

    def __init__(self, dataset: FederatedDataset, ids: list[str]) -> None:
        self._dataset = dataset
        self._ids = ids
        self._known = frozenset(ids)

    def __getitem__(self, user_id: str) -> UserData:
        if user_id not in self._known:
            raise KeyError(user_id)
        return self._dataset.user(user_id)

    def __iter__(self) -> Iterator[str]:
        return iter(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, user_id: object) -> bool:
        return user_id in self._known


def user_seed(*parts: object) -> int:
    """A stable 31-bit seed from any parts (Python's hash() is salted per process)."""
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF


@functools.lru_cache(maxsize=2)
def _federated(spec: Any) -> FederatedDataset:
    return load_federated_dataset(spec)


def preload_simulated_data(cfg: RunConfig) -> FederatedDataset:
    """Read the simulation's dataset into this process's cache, where :func:`hosted_cohort`
    finds it: the local backend's fork server does it once, before it forks the workers,
    which then share it instead of each parsing the users file again."""
    return _federated(data_spec(cfg))


@functools.lru_cache(maxsize=1024)  # a device reads one file; the emulator hosts 1,000 devices
def _device_file(
    path: str,
    mtime: float,
    user_column: str,
    label_column: str,
    user_id: str | None,
    test_fraction: float,
    seed: int,
) -> dict[str, UserData]:
    del mtime  # part of the cache key only: a rewritten file is read again
    table = load_user_file(
        path, user_column=user_column, label_column=label_column, user_id=user_id
    )
    # The same split the simulation gives this user, so results compare across the two.
    return {uid: split_user(uid, x, y, test_fraction, seed) for uid, (x, y) in table.items()}


def hosted_cohort(cfg: RunConfig, node_config: Mapping[str, Any]) -> Cohort:
    """The users this node hosts, from its node config (device file or simulation slot)."""
    node = protocol.read_node_config(node_config)
    if node.data_file:
        if not os.path.isfile(node.data_file):
            raise DataError(f"node data file '{node.data_file}' does not exist")
        users = _device_file(
            node.data_file,
            os.path.getmtime(node.data_file),
            node.user_column or cfg.data.user_column,
            node.label_column or cfg.data.label_column,
            node.user_id,
            cfg.data.test_fraction,
            cfg.run.seed,
        )
        return Cohort(users)
    slot, num_slots = node.partition_id, node.num_partitions
    return _simulated_cohort(data_spec(cfg), slot, num_slots)


@functools.lru_cache(maxsize=4)
def _simulated_cohort(spec: Any, slot: int, num_slots: int) -> Cohort:
    dataset = _federated(spec)
    return Cohort(_LazyUsers(dataset, dataset.user_ids[slot::num_slots]))
