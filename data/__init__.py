"""Per-user data for federated learning: pure numpy/pandas/scikit-learn (no torch, no flwr).

Entry point: ``load_federated_dataset(DataSpec(...))``. Partitioners, the train/test split
and the file reader are public so deployment and tests can use them directly.
"""

from .federated import (
    FederatedDataset,
    UserData,
    load_federated_dataset,
    register_dataset,
    register_partitioner,
    shared_federated_dataset,
    split_user,
)
from .files import load_user_file
from .partition import partition_dirichlet, partition_iid, partition_shards, split_train_test
from .spec import (
    DATASETS,
    PARTITIONERS,
    DataError,
    DataOptions,
    DatasetEntry,
    DataSpec,
    PartitionerEntry,
)

__all__ = [
    "DATASETS",
    "PARTITIONERS",
    "DataError",
    "DataOptions",
    "DataSpec",
    "DatasetEntry",
    "FederatedDataset",
    "PartitionerEntry",
    "UserData",
    "load_federated_dataset",
    "load_user_file",
    "partition_dirichlet",
    "partition_iid",
    "partition_shards",
    "register_dataset",
    "register_partitioner",
    "shared_federated_dataset",
    "split_train_test",
    "split_user",
]
