"""Example user files made from bundled data, for demos, tests and benchmarks of devices."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_digits_user_files(root: str | Path, num_users: int, rows: int = 120) -> list[Path]:
    """One CSV per device, ``<root>/device<i>.csv`` holding user ``user<i>``.

    Rows are scikit-learn's bundled 8x8 digits (64 pixel columns ``p0..p63``, raw 0..16,
    and ``label``), dealt round-robin so every device sees every class: the user-file
    schema that ``pollinate node start --data`` and ``data.dataset = "file"`` read.
    """
    import pandas as pd
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(num_users):
        idx = np.arange(i, len(x), num_users)[:rows]
        df = pd.DataFrame(x[idx], columns=[f"p{j}" for j in range(x.shape[1])])
        df.insert(0, "user", f"user{i}")
        df["label"] = y[idx]
        path = root / f"device{i}.csv"
        df.to_csv(path, index=False)
        paths.append(path)
    return paths
