"""Precompute and the v2 protocol, side by side: what the database and the new bodies cost.

    python benchmarks/bench_precompute.py                      # ~2 min on 2 cores (quiet)
    python benchmarks/bench_precompute.py --rows 20000         # quicker

Needs a model store: ``make quickstart`` writes ``runs/quickstart/users/``; ``--store``
names another (a store or one user's folder). Rows measured, each the best of two runs:

- ``pollinate.client.predict_file`` of a ROWS x 64 CSV into a CSV file, a CSV file and a
  SQLite table, and the table alone; then the same rows upserted again (same model version);
- single-row request latency (p50, p90; sequential, one keep-alive client) of ``/predict``
  with ``rows``, with TF-Serving's ``instances``, and ``POST /v2/models/personal/infer``,
  against the real service on a thread (torch threads 1). Only 127.0.0.1 is used.

Figures on a shared machine vary; compare the rows of one run with each other (ratios).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd

from pollinate.client import predict_file
from pollinate.client.serving import set_torch_threads, start_in_thread


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--store", default="runs/quickstart/users/user-0000")
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--requests", type=int, default=300)
    args = p.parse_args()
    set_torch_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench-precompute-"))
    n = args.rows
    x = np.random.default_rng(0).normal(size=(n, 64)) * 5  # (N, 64) digits-sized features
    df = pd.DataFrame(x, columns=[f"p{i}" for i in range(64)])
    df.insert(0, "id", [f"r{i}" for i in range(n)])
    src = tmp / "in.csv"
    df.to_csv(src, index=False)

    targets = {"csv": (True, False), "csv+sqlite": (True, True), "sqlite": (False, True)}
    best: dict[str, float] = {}
    for rep in range(2):
        for name, (to_file, to_db) in targets.items():
            t0 = time.perf_counter()
            predict_file(
                args.store,
                "personal",
                src,
                tmp / "out.csv" if to_file else None,
                db=tmp / f"{name}-{rep}.sqlite" if to_db else None,
            )
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - t0)
    t0 = time.perf_counter()
    predict_file(args.store, "personal", src, None, db=tmp / "sqlite-1.sqlite")
    best["sqlite, upserted again"] = time.perf_counter() - t0
    print(f"predict_file, {n} rows:")
    for name, took in best.items():
        print(f"  -> {name:<24} {took:7.2f} s  {n / took:10,.0f} rows/s  "
              f"x{took / best['csv']:.2f} of csv")  # fmt: skip

    row = x[0].tolist()
    bodies = {
        "/predict rows": ("/predict", {"rows": [row]}),
        "/predict instances": ("/predict", {"instances": [row]}),
        "/v2/models/personal/infer": (
            "/v2/models/personal/infer",
            {"inputs": [{"name": "features", "shape": [1, 64], "datatype": "FP32", "data": row}]},
        ),
    }
    with start_in_thread(args.store, port=0) as handle, httpx.Client(base_url=handle.url) as c:
        seconds: dict[str, list[float]] = {k: [] for k in bodies}
        for _ in range(3):  # interleaved, so load changes hit every body alike
            for name, (path, body) in bodies.items():
                for _ in range(20):
                    c.post(path, json=body)
                for _ in range(args.requests // 3):
                    t0 = time.perf_counter()
                    r = c.post(path, json=body)
                    seconds[name].append(time.perf_counter() - t0)
                    assert r.status_code == 200, r.text
    base = statistics.median(seconds["/predict rows"])
    print("one-row request latency:")
    for name, s in seconds.items():
        p50 = statistics.median(s)
        print(f"  {name:<28} p50 {p50 * 1e3:6.2f} ms  p90 {np.percentile(s, 90) * 1e3:6.2f} ms  "
              f"x{p50 / base:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
