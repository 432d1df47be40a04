from __future__ import annotations

from typing import Any

import pytest

from pollinate.data import DataSpec, load_federated_dataset


def test_defaults_are_valid() -> None:
    assert DataSpec().validate() == DataSpec()


@pytest.mark.parametrize(
    ("changes", "needles"),
    [
        ({"dataset": "mnist"}, ("data.dataset = 'mnist' is not known", "digits, synthetic")),
        (
            {"partitioner": "pathological"},
            ("data.partitioner = 'pathological' is not known", "iid, dirichlet, shards"),
        ),
        ({"num_users": 0}, ("data.num-users", "an integer in 1..")),
        ({"num_users": True}, ("data.num-users",)),
        ({"num_users": "20"}, ("data.num-users", "'20'")),
        ({"alpha": 0.0}, ("data.alpha", "in (0, ")),
        ({"alpha": float("nan")}, ("data.alpha",)),
        ({"shards_per_user": 0}, ("data.shards-per-user",)),
        ({"synthetic_alpha": -1.0}, ("data.synthetic-alpha", "in [0, ")),
        ({"test_fraction": 1.0}, ("data.test-fraction", "in (0, 1)")),
        ({"central_test_fraction": 0.0}, ("data.central-test-fraction",)),
        ({"min_samples": 1}, ("data.min-samples", "in 2..")),
        ({"num_users": 10**9}, ("data.num-users", "1..1000000", "got 1000000000")),
        ({"seed": 10**23}, ("data.seed", "0..4294967295")),
        ({"alpha": float("inf")}, ("data.alpha", "got inf")),
        ({"seed": -1}, ("data.seed",)),
        ({"dataset": "file"}, ("data.path is empty",)),
        ({"label_column": "user"}, ("different columns",)),
    ],
)
def test_bad_spec(changes: dict[str, Any], needles: tuple[str, ...], data_error) -> None:
    spec = DataSpec(**changes)
    with data_error(*needles):
        spec.validate()
    with data_error(*needles):
        load_federated_dataset(spec)  # validates first


def test_synthetic_alpha_beta_zero_is_valid() -> None:
    DataSpec(dataset="synthetic", synthetic_alpha=0.0, synthetic_beta=0.0).validate()
