"""The run's data split, recorded at its start: ``<run dir>/data-split.json``.

In a simulation the server knows every user's data (the ClientApps load the same
``[data]`` spec), so it writes each user's train and test label counts before round 1;
the report shows them (:mod:`pollinate.server.report`). A deployed server has no data and
the devices are not asked for their label histograms: a label distribution is itself
information about a user's data (e.g. which conditions a clinic sees), and the point of a
deployment is that nothing about it leaves the device unasked. The file then says so.

The file is written atomically at the start of every run (so an earlier run's split never
stands for this one's), from a background thread: counting builds every user once, seconds
for 10,000 synthetic users, which round 1 need not wait for. Above ``MAX_USERS`` users it is
not recorded (the file says why): for 100,000 synthetic users, building each one to count
labels took longer than 2 rounds of the run itself, and the run waits for it to end.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from pollinate.data import DataSpec, shared_federated_dataset
from pollinate.data.stats import LabelCounts, label_counts
from pollinate.models import atomic_write

DATA_SPLIT_NAME = "data-split.json"
MAX_USERS = 10_000
NOT_RECORDED_DEPLOYMENT = (
    "not recorded for deployments: the server has no data, and devices do not report "
    "their label counts"
)


def write_data_split(run_dir: Path, spec: DataSpec | None) -> Path:
    """Write the split of ``spec``'s dataset, or (``spec=None``, a deployment) why there is none."""
    body: dict[str, Any]
    dataset = None if spec is None else shared_federated_dataset(spec)  # lazy: no user built
    if dataset is None:
        body = {"recorded": False, "reason": NOT_RECORDED_DEPLOYMENT}
    elif len(dataset) > MAX_USERS:
        body = {
            "recorded": False,
            "reason": f"not recorded: {len(dataset):,} users is over {MAX_USERS:,}, and "
            "counting labels builds every user's data (pollinate data CONFIG counts them)",
        }
    else:
        body = {
            "recorded": True,
            "dataset": dataset.name,
            "detail": dataset.detail,
            "central_test": None if dataset.central_test is None else len(dataset.central_test[1]),
            **label_counts(dataset).to_dict(),
        }
    text = json.dumps(body, separators=(",", ":")).encode()
    path = run_dir / DATA_SPLIT_NAME
    atomic_write(path, lambda f: f.write(text), mode=0o644)
    return path


def start_data_split(run_dir: Path, spec: DataSpec | None) -> threading.Thread:
    """:func:`write_data_split` in a background thread (join it before the run ends).

    The split of the previous run in this folder is removed at once; a failure to count
    is written into the file as its reason, never raised.
    """
    (run_dir / DATA_SPLIT_NAME).unlink(missing_ok=True)

    def write() -> None:
        try:
            write_data_split(run_dir, spec)
        except Exception as err:  # the report says why; the run itself goes on
            text = json.dumps({"recorded": False, "reason": f"not recorded: {err}"}).encode()
            atomic_write(run_dir / DATA_SPLIT_NAME, lambda f: f.write(text), mode=0o644)

    thread = threading.Thread(target=write, name="pollinate-data-split", daemon=True)
    thread.start()
    return thread


def read_data_split(run_dir: str | Path) -> tuple[LabelCounts | None, dict[str, Any]]:
    """The recorded split and the file's other fields; ``(None, {"reason": ...})`` if none."""
    path = Path(run_dir) / DATA_SPLIT_NAME
    if not path.is_file():
        return None, {"reason": f"not recorded ({DATA_SPLIT_NAME} is missing: an older run?)"}
    try:
        raw = json.loads(path.read_text())
        if not raw.get("recorded"):
            return None, {"reason": str(raw.get("reason", "not recorded"))}
        meta = {k: v for k, v in raw.items() if k not in ("users", "train", "test")}
        return LabelCounts.from_dict(raw), meta
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        return None, {"reason": f"unreadable {DATA_SPLIT_NAME}: {err}"}
