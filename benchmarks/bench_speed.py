"""Speed: the same federated job three ways, side by side in one invocation.

    python benchmarks/bench_speed.py                       # 10..10,000 users, 20 rounds
    python benchmarks/bench_speed.py --users 10,100 --rounds 5   # a quick look
    python benchmarks/bench_speed.py --device cuda --users 10000 --model logreg --batch-size 10 \
        --variants plain,plain-cpu,pollinate,pollinate-stacked,pollinate-stacked-few  # a GPU

The job: FedProx's Synthetic(1,1) data (lazily generated per user), an MLP (60-64-10),
``--fraction`` (10%) of the users sampled per round, each trains ``--epochs`` local epoch(s)
of minibatch SGD from the global weights, and the server takes the example-weighted mean.

- ``plain``: the compute limit — one process, a plain PyTorch loop over the sampled users
  with ``pollinate.models.train`` and a weighted sum; no framework, one torch thread
  (the fastest setting for a model this small; more threads only add synchronisation).
- ``flower``: what users run today — ``benchmarks/flower_default.py``, a quickstart-style
  Flower app (one Flower node per user, plain ``FedAvg``) on Flower's simulation engine
  (Ray) with Flower's default resources.
- ``pollinate``: ``pollinate.simulation.engine.run_simulation`` — the Pollinate
  ServerApp/ClientApp on the same engine, each Flower node hosting a cohort of users.

All three sample the same users with the same seeds: ``plain`` and ``pollinate`` end with
the same global weights (checked: column ``max_dw_vs_plain``), so they did the same work.
Column ``accuracy`` is each run's final global model on every user's own test split
(example-weighted), ``acc_vs_per_user`` its difference to the ``pollinate`` variant's (one
user at a time through Pollinate), measured here after all runs.

Issue 13's job (``--max-samples 200``): the harness first writes one users file (Parquet,
or ``--users-file-format csv``) of Synthetic(1,1) users cut to 200 samples each, and every
variant reads its users from it (``data.dataset = "file"``; the plain loop through the same
reader), start-up included::

    python benchmarks/bench_speed.py --users 1000 --variants plain,pollinate,pollinate-stacked \
        --model logreg --batch-size 10 --rounds 20 --max-samples 200 --repeat 2

Every run is its own child process (own Ray instance), watched from here: wall time from
launch to exit, the peak of the summed RSS and PSS of its whole process tree (driver, Ray's
gcs/raylet/agents and every worker), and the times at which rounds ended. Derived:
``startup_s`` = time from launch to the end of round 1 minus one steady round (imports,
Ray start, actor warm-up, data), ``client_round_ms`` = steady-state time per client-round
(rounds 2..R), ``teardown_s`` = from the end of the last round to the process's exit.
Writes ``benchmarks/results/speed.csv``, ``speed.md`` and ``speed.png``.

``--device cuda`` runs ``plain`` and every ``pollinate`` variant on the GPU
(``simulation.device``); ``plain-cpu`` is the plain loop on the CPU all the same, and
``x_plain_cpu_wall`` each run's wall time over it (``x_plain_wall`` stays the ratio to the
plain loop on the same device). ``benchmarks/gpu_check.sh`` is the one command for a GPU.
"""

from __future__ import annotations

import time

T_START = time.time()  # before the heavy imports: start-up counts them

import argparse  # noqa: E402
import contextlib  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from dataclasses import asdict, dataclass, replace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

VARIANTS = ("plain", "pollinate", "flower")
# Not run by default: Pollinate with every user's update sent to the server (no node means),
# which must give the plain loop's weights bit for bit; shows what the node means save.
# ``pollinate-ray``: Pollinate on Flower's Ray backend (a fresh local Ray) instead of the
# default local worker processes.
# ``pollinate-cluster``: attached to a Ray cluster started once beforehand (``ray start``),
# what repeated runs on a kept-up cluster cost.
# ``pollinate-stacked``: each node trains its sampled users as one stack of models
# (``train.stack-users``, torch.func.vmap): the same updates up to float32 rounding.
# ``plain-cpu``: the plain loop on the CPU whatever --device says (the GPU's CPU baseline).
# ``pollinate-stacked-few``: stacked on FEW_NODES nodes: on a GPU, fewer and bigger stacks
# (each node a process with its own CUDA context, time-sliced on the one GPU).
EXTRA_VARIANTS = (
    "pollinate-updates",
    "pollinate-ray",
    "pollinate-cluster",
    "pollinate-stacked",
    "plain-cpu",
    "pollinate-stacked-few",
)
STACKED = {"train.stack-users": 4096}
FEW_NODES = 2
GiB = 2**30


@dataclass(frozen=True)
class Job:
    users: int
    rounds: int = 20
    fraction: float = 0.1
    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    hidden: int = 64
    seed: int = 0
    model: str = "mlp"
    device: str = "cpu"  # the plain loop's, and simulation.device for Pollinate
    # Issue 13's job: every variant reads its users from this one CSV/Parquet file
    # (written by `write_users_file`) instead of generating Synthetic(1,1) users itself.
    users_file: str = ""

    def data_spec(self) -> Any:
        """The users every variant trains: the users file, or the lazy generator."""
        from pollinate.data import DataSpec

        if self.users_file:
            return DataSpec(dataset="file", path=self.users_file, seed=self.seed)
        return DataSpec(
            dataset="synthetic",
            num_users=self.users,
            synthetic_alpha=1.0,
            synthetic_beta=1.0,
            seed=self.seed,
        )

    def data_config(self) -> dict[str, Any]:
        if self.users_file:
            return {"data.dataset": "file", "data.path": self.users_file}
        return {
            "data.dataset": "synthetic",
            "data.num-users": self.users,
            "data.synthetic-alpha": 1.0,
            "data.synthetic-beta": 1.0,
        }

    def model_kwargs(self) -> dict[str, Any]:
        return {"hidden": self.hidden} if self.model == "mlp" else {}

    @property
    def sampled(self) -> int:
        """Users per round, exactly as Flower's FedAvg computes it (min 1)."""
        return max(int(self.users * self.fraction), 1)

    def flower_config(self) -> dict[str, Any]:
        return {
            "dataset": "synthetic",
            "num-users": self.users,
            "synthetic-alpha": 1.0,
            "synthetic-beta": 1.0,
            "seed": self.seed,
            "model": self.model,
            "in-features": 60,
            "num-classes": 10,
            "hidden": self.hidden,
            "epochs": self.epochs,
            "batch-size": self.batch_size,
            "lr": self.lr,
            "fraction": self.fraction,
            "rounds": self.rounds,
        }

    def pollinate_config(self, run_dir: Path, extra: dict[str, Any] | None = None) -> Any:
        from pollinate.config import resolve

        return resolve(self.pollinate_flat(run_dir, extra))

    def pollinate_flat(self, run_dir: Path, extra: dict[str, Any] | None = None) -> dict:
        """The run's config as ``pollinate run`` reads it from a file, not yet resolved."""
        return dict(
            {
                "run.name": f"bench-{self.users}",
                "run.num-rounds": self.rounds,
                "run.seed": self.seed,
                "run.dir": str(run_dir),
                "run.overwrite": True,  # each repeat replaces the last one's folder
                **self.data_config(),
                "model.name": self.model,
                "model.hidden": self.hidden,
                "train.epochs": self.epochs,
                "train.batch-size": self.batch_size,
                "train.lr": self.lr,
                "strategy.name": "fedavg",
                "strategy.fraction-train": self.fraction,
                "strategy.fraction-evaluate": 0.0,
                "strategy.min-train-users": 1,
                "personalization.method": "none",
                "simulation.device": self.device,
                # One user at a time unless a variant stacks them (``pollinate-stacked``):
                # ``pollinate`` is the per-user path the stacked one is compared with.
                "train.stack-users": 0,
                **(extra or {}),
            }
        )


# ------------------------------------------------------------------------ the variants


def run_plain(job: Job, out: Path) -> dict[str, Any]:
    """One process, no framework: exactly the training and averaging of the other two."""
    import random

    import torch

    from pollinate.client.local import user_seed
    from pollinate.data import load_federated_dataset
    from pollinate.models import TrainConfig, create_model, train

    torch.set_num_threads(1)
    data = load_federated_dataset(job.data_spec())
    model = create_model(
        job.model, in_features=60, num_classes=10, seed=job.seed, **job.model_kwargs()
    ).to(job.device)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(epochs=job.epochs, batch_size=job.batch_size, lr=job.lr)
    random.seed(job.seed)  # the draws of Pollinate's sampler, random.Random(seed)
    round_ends = [time.time()]
    for server_round in range(1, job.rounds + 1):
        sampled = sorted(random.sample(range(job.users), job.sampled))
        total = {k: torch.zeros_like(v) for k, v in weights.items()}
        examples = 0
        updates = []
        for k in sampled:
            user = data.user(data.user_ids[k])
            model.load_state_dict(weights)
            seed = user_seed(job.seed, server_round, user.user_id, "train")
            stats = train(
                model,
                torch.from_numpy(user.x_train).to(job.device),
                torch.from_numpy(user.y_train).to(job.device),
                cfg,
                generator=torch.Generator().manual_seed(seed),
            )
            updates.append(
                (stats.num_examples, {k: v.clone() for k, v in model.state_dict().items()})
            )
            examples += stats.num_examples
        for n, update in updates:
            for key, value in update.items():
                total[key] += value * (n / examples)
        weights = total
        if job.device != "cpu":
            torch.cuda.synchronize()  # the round is over when the GPU is done
        round_ends.append(time.time())
    torch.save({k: v.cpu() for k, v in weights.items()}, out / "weights.pt")
    return {"round_ends": round_ends}


def run_flower(job: Job, out: Path) -> dict[str, Any]:
    """Flower's run_simulation with its defaults: one node per user."""
    import logging
    import os

    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import flower_default
    import torch
    from flwr.simulation import run_simulation

    logging.getLogger("flwr").setLevel(logging.WARNING)
    round_ends: list[float] = []
    final: dict[str, Any] = {}
    run_simulation(
        server_app=flower_default.server_app(job.flower_config(), round_ends, final),
        client_app=flower_default.app,
        num_supernodes=job.users,
    )
    torch.save(final["state_dict"], out / "weights.pt")
    return {"round_ends": round_ends}


def run_pollinate(
    job: Job, out: Path, extra: dict[str, Any] | None = None, *, node_means: bool = True
) -> dict[str, Any]:
    # As `pollinate run` does: the local backend's workers start from the config as read,
    # before it is resolved (resolving imports torch), then the run.
    from pollinate.simulation.engine import run_simulation, start_workers_from

    flat = job.pollinate_flat(out / "run", extra)
    start_workers_from(flat)

    import torch

    if not node_means:  # every user's update travels to the server, as robust rules need
        from pollinate.server.strategy import CohortFedAvg

        CohortFedAvg.mean_of_updates = False

    import sqlite3

    from pollinate.config import resolve
    from pollinate.models import load_artifact

    run_dir = run_simulation(resolve(flat))
    # Straight from the metrics database: pandas (`read_rounds`) would add its import to
    # this variant's teardown, which the others do not pay.
    with sqlite3.connect(run_dir / "metrics.db") as db:
        ends = [t for (t,) in db.execute("SELECT finished_at FROM rounds ORDER BY round")]
    torch.save(load_artifact(run_dir / "models" / "global.pt").state_dict, out / "weights.pt")
    return {"round_ends": [float(t) for t in ends]}


def worker(variant: str, job: Job, out: Path, extra: dict[str, Any]) -> None:
    if variant == "plain":
        result = run_plain(job, out)
    elif variant == "plain-cpu":
        result = run_plain(replace(job, device="cpu"), out)
    elif variant == "flower":
        result = run_flower(job, out)
    else:
        result = run_pollinate(job, out, extra, node_means=variant != "pollinate-updates")
    result["t_start"] = T_START
    result["t_end"] = time.time()
    (out / "result.json").write_text(json.dumps(result))


# ----------------------------------------------------------------------------- harness


def measure(
    variant: str,
    job: Job,
    work: Path,
    timeout: float,
    extra: dict[str, Any] | None = None,
    label: str | None = None,
    also_group: int | None = None,
) -> dict[str, Any]:
    label = label or variant
    out = work / f"{label}-{job.users}"
    out.mkdir(parents=True, exist_ok=True)
    argv = [
        common.python(),
        __file__,
        "--worker",
        variant,
        "--job",
        json.dumps(asdict(job)),
        "--out",
        str(out),
        "--extra",
        json.dumps(extra or {}),
    ]
    child = common.run_child(argv, log=out / "log.txt", timeout=timeout, also_group=also_group)
    row: dict[str, Any] = {
        "variant": label,
        "users": job.users,
        "rounds": job.rounds,
        "client_rounds": job.rounds * job.sampled,
        "wall_s": child.wall_s,
        "peak_rss_gib": child.peak_rss / GiB,
        "peak_pss_gib": child.peak_pss / GiB,
        "processes": child.peak_processes,
        "cpu_s": child.cpu_s,
        "ok": child.returncode == 0,
    }
    result_file = out / "result.json"
    if child.returncode != 0 or not result_file.exists():
        print(
            f"  {label:>10} {job.users:>6} users: FAILED (rc {child.returncode}), "
            f"see {out / 'log.txt'}",
            flush=True,
        )
        return row
    result = json.loads(result_file.read_text())
    ends = result["round_ends"][-(job.rounds + 1) :]  # [round 0 (start), round 1, ..., R]
    steady = [b - a for a, b in itertools.pairwise(ends[1:])]  # rounds 2..R
    if len(steady) < 2:  # too few rounds to tell start-up from a slow first round
        row.update({"wall_per_client_round_ms": 1000 * child.wall_s / (job.rounds * job.sampled)})
        print(
            f"  {label:>10} {job.users:>6} users: wall {row['wall_s']:7.1f} s "
            f"(too few rounds to split start-up from rounds)",
            flush=True,
        )
        return row
    per_round = statistics.median(steady)
    row.update(
        {
            "startup_s": ends[1] - child.launched_at - per_round,
            "round_s": per_round,
            "client_round_ms": 1000 * sum(steady) / max(1, len(steady) * job.sampled)
            if steady
            else math.nan,
            "rounds_s": ends[-1] - ends[1] + per_round,
            "teardown_s": child.launched_at + child.wall_s - ends[-1],
            "weights": str(out / "weights.pt"),
        }
    )
    print(
        f"  {label:>10} {job.users:>6} users: wall {row['wall_s']:7.1f} s | start-up "
        f"{row['startup_s']:5.1f} s | {row['client_round_ms']:7.2f} ms/client-round | "
        f"CPU {row['cpu_s']:5.1f} s | "
        f"peak RSS {row['peak_rss_gib']:.2f} GiB (PSS {row['peak_pss_gib']:.2f})",
        flush=True,
    )
    return row


def write_users_file(path: Path, users: int, max_samples: int, seed: int = 0) -> Path:
    """Issue 13's users file: ``users`` Synthetic(1,1) users, each cut to its first
    ``max_samples`` samples (0 = all), one row per sample (``user``, ``label``, ``x0..x59``).

    A user's samples are i.i.d. given the user, so its first ``max_samples`` are the data
    Synthetic(1,1) gives with n_k capped there. Parquet or CSV by the suffix.
    """
    import numpy as np
    import pandas as pd

    from pollinate.data import synthetic
    from pollinate.data.federated import user_id_for
    from pollinate.data.seeds import user_rng

    xs, ys, ids = [], [], []
    for k in range(users):
        x, y = synthetic.generate_user(user_rng(seed, k), 1.0, 1.0)
        if max_samples:
            x, y = x[:max_samples], y[:max_samples]
        xs.append(x)
        ys.append(y)
        ids.extend([user_id_for(k, users)] * len(y))
    df = pd.DataFrame(np.concatenate(xs), columns=[f"x{j}" for j in range(xs[0].shape[1])])
    df.insert(0, "label", np.concatenate(ys))
    df.insert(0, "user", ids)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".csv":
        df.to_csv(path, index=False, float_format="%.9g")  # float32 round-trips
    else:
        df.to_parquet(path, index=False)
    return path


def global_accuracy(job: Job, weights: str) -> float:
    """The final global model's test accuracy: the example-weighted mean over every user's
    own test split (the ``global_accuracy`` a full evaluation round records)."""
    import torch

    from pollinate.data import load_federated_dataset
    from pollinate.models import create_model, evaluate

    data = load_federated_dataset(job.data_spec())
    model = create_model(job.model, in_features=60, num_classes=10, **job.model_kwargs())
    model.load_state_dict(torch.load(weights))
    correct = total = 0.0
    for user in data.users():
        stats = evaluate(model, torch.from_numpy(user.x_test), torch.from_numpy(user.y_test))
        correct += stats.accuracy * stats.num_examples
        total += stats.num_examples
    return correct / total


def max_abs_diff(a: str, b: str) -> float:
    import torch

    wa, wb = torch.load(a), torch.load(b)
    return max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)


def add_accuracy(rows: list[dict[str, Any]], jobs: dict[int, Job]) -> None:
    """Each run's final global test accuracy, and its difference to the per-user path
    (the ``pollinate`` variant: one user at a time through Pollinate)."""
    for r in rows:
        if r.get("ok") and r.get("weights"):
            r["accuracy"] = global_accuracy(jobs[r["users"]], r["weights"])
    by = {(r["variant"], r["users"]): r for r in rows}
    for r in rows:
        base = by.get(("pollinate", r["users"]))
        if "accuracy" in r and base and "accuracy" in base:
            r["acc_vs_per_user"] = r["accuracy"] - base["accuracy"]


def add_ratios(rows: list[dict[str, Any]]) -> None:
    by = {(r["variant"], r["users"]): r for r in rows}
    for r in rows:
        plain = by.get(("plain", r["users"]))
        flower = by.get(("flower", r["users"]))
        ok = r.get("ok") and "startup_s" in r
        if ok and plain and plain.get("ok") and "startup_s" in plain:
            r["x_plain_wall"] = r["wall_s"] / plain["wall_s"]
            r["speedup_vs_plain"] = plain["wall_s"] / r["wall_s"]
            if plain.get("cpu_s"):
                r["cpu_s_vs_plain"] = r["cpu_s"] / plain["cpu_s"]
            r["startup_over_plain_s"] = r["startup_s"] - plain["startup_s"]
            r["x_plain_rounds"] = r["rounds_s"] / plain["rounds_s"]
            if r["variant"] not in ("plain", "flower") and r.get("weights"):
                r["max_dw_vs_plain"] = max_abs_diff(plain["weights"], r["weights"])
        plain_cpu = by.get(("plain-cpu", r["users"]))
        if ok and plain_cpu and plain_cpu.get("ok") and r["variant"] != "plain-cpu":
            r["x_plain_cpu_wall"] = r["wall_s"] / plain_cpu["wall_s"]
            r["x_plain_cpu_rounds"] = r["rounds_s"] / plain_cpu["rounds_s"]
        if ok and flower and flower.get("ok") and r["variant"] != "flower":
            r["flower_x_faster_wall"] = flower["wall_s"] / r["wall_s"]
            r["flower_x_faster_rounds"] = flower["rounds_s"] / r["rounds_s"]


COLUMNS = (
    "variant",
    "users",
    "client_rounds",
    "wall_s",
    "startup_s",
    "startup_over_plain_s",
    "rounds_s",
    "teardown_s",
    "client_round_ms",
    "peak_rss_gib",
    "peak_pss_gib",
    "processes",
    "cpu_s",
    "cpu_s_vs_plain",
    "x_plain_wall",
    "speedup_vs_plain",
    "x_plain_rounds",
    "flower_x_faster_wall",
    "flower_x_faster_rounds",
    "x_plain_cpu_wall",
    "x_plain_cpu_rounds",
    "max_dw_vs_plain",
    "accuracy",
    "acc_vs_per_user",
)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    colors = {
        "plain": "black",
        "pollinate": "tab:green",
        "flower": "tab:red",
        "pollinate-updates": "tab:olive",
    }
    panels = [
        ("wall_s", "wall time (s)", True),
        ("client_round_ms", "ms per client-round (steady)", True),
        ("peak_rss_gib", "peak RSS, process tree (GiB)", False),
        ("startup_s", "start-up (s)", False),
    ]
    for ax, (key, label, logy) in zip(axes, panels, strict=True):
        for variant in dict.fromkeys(r["variant"] for r in rows):
            pts = [
                (r["users"], r[key])
                for r in rows
                if r["variant"] == variant
                and r.get(key) is not None
                and r.get("ok")
                and not (isinstance(r[key], float) and math.isnan(r[key]))
            ]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, marker="o", label=variant, color=colors.get(variant))
        if key == "peak_rss_gib":
            ax.axhline(4, ls=":", color="gray", label="4 GiB target")
        if key == "startup_s":
            ax.axhline(3, ls=":", color="gray", label="3 s target")
        ax.set_xscale("log")
        if logy:
            ax.set_yscale("log")
        ax.set(xlabel="users", ylabel=label)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


@contextlib.contextmanager
def _stopping(cluster: tuple[str, int, Path] | None) -> Iterator[None]:
    try:
        yield
    finally:
        if cluster:
            common.stop_ray_cluster(cluster[1], cluster[2])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", default="10,100,1000,10000", help="comma-separated scales")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--model", default="mlp", choices=("mlp", "logreg"))
    p.add_argument(
        "--max-samples",
        type=int,
        default=0,
        help="issue 13's job: every variant reads one users file of Synthetic(1,1) users cut "
        "to this many samples each (written once per scale, before any run); 0 = the lazy "
        "generator in every process, n_k up to 10,000",
    )
    p.add_argument("--users-file-format", default="parquet", choices=("parquet", "csv"))
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument(
        "--device",
        default="cpu",
        choices=("cpu", "cuda"),
        help="where plain and the pollinate variants train (plain-cpu: always the CPU)",
    )
    p.add_argument(
        "--flower-max-users",
        type=int,
        default=1000,
        help="skip Flower's one-node-per-user run above this many users",
    )
    p.add_argument("--timeout", type=float, default=900, help="seconds per run")
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs per variant and scale; the fastest is reported (noisy machines)",
    )
    p.add_argument("--out", default=str(common.RESULTS), help="where speed.csv/.md/.png go")
    p.add_argument("--name", default="speed", help="file name stem of the outputs")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra Pollinate config for the pollinate variant",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--job", help=argparse.SUPPRESS)
    p.add_argument("--extra", default="{}", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        worker(args.worker, Job(**json.loads(args.job)), Path(args.out), json.loads(args.extra))
        # Every variant ends as `pollinate run` does: at once, its results written, without
        # the interpreter's teardown of torch's and Flower's modules (0.5-1.5 s here).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    from pollinate.config import parse_override

    extra = dict(parse_override(s) for s in args.set)
    base = Job(
        users=0,
        rounds=args.rounds,
        fraction=args.fraction,
        epochs=args.epochs,
        batch_size=args.batch_size,
        model=args.model,
        device=args.device,
    )
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    scales = [int(u) for u in args.users.split(",")]
    print("machine:", json.dumps(common.machine()), flush=True)
    rows: list[dict[str, Any]] = []
    cluster = common.start_ray_cluster() if "pollinate-cluster" in variants else None
    extras = {v: extra if v.startswith("pollinate") else None for v in variants}
    if "pollinate-stacked" in extras:
        extras["pollinate-stacked"] = {**extra, **STACKED}
    if "pollinate-stacked-few" in extras:
        extras["pollinate-stacked-few"] = {**extra, **STACKED, "simulation.num-nodes": FEW_NODES}
    if "pollinate-ray" in extras:
        extras["pollinate-ray"] = {**extra, "simulation.backend": "ray"}
    if cluster:
        extras["pollinate-cluster"] = {**extra, "simulation.ray-address": cluster[0]}
    jobs: dict[int, Job] = {}
    with tempfile.TemporaryDirectory(prefix="pollinate-bench-") as tmp, _stopping(cluster):
        work = Path(tmp)
        # Warm the page cache (torch, Ray and Flower binaries) so the first measured run
        # does not pay for cold disk reads the others do not.
        for v in ("plain", "pollinate"):
            measure(v, replace(base, users=10, rounds=1), work / "warmup", args.timeout)
        for users in scales:
            job = replace(base, users=users)
            if args.max_samples:
                name = f"users-{users}-max{args.max_samples}.{args.users_file_format}"
                path = write_users_file(work / name, users, args.max_samples, base.seed)
                job = replace(job, users_file=str(path))
            jobs[users] = job
            # Flower's quickstart-style app generates its users itself (no file reader).
            flower_ok = users <= args.flower_max_users and not job.users_file
            run_now = [v for v in variants if v != "flower" or flower_ok]
            if len(run_now) < len(variants):
                print(
                    f"  {'flower':>10} {users:>6} users: skipped (--flower-max-users "
                    f"{args.flower_max_users})",
                    flush=True,
                )
            # Repeats go round the variants, so a busy spell hits all of them alike.
            tries: dict[str, list[dict[str, Any]]] = {v: [] for v in run_now}
            for i in range(args.repeat):
                for v in run_now:
                    group = cluster[1] if cluster and v == "pollinate-cluster" else None
                    tries[v].append(
                        measure(v, job, work / f"try{i}", args.timeout, extras[v], also_group=group)
                    )
            for v in run_now:
                ok = [t for t in tries[v] if t.get("ok") and "startup_s" in t] or tries[v]
                best = dict(min(ok, key=lambda t: t["wall_s"]))
                best["wall_s_all"] = " ".join(f"{t['wall_s']:.1f}" for t in tries[v])
                rows.append(best)
        add_ratios(rows)
        add_accuracy(rows, jobs)
    for r in rows:
        r.pop("weights", None)
    out = Path(args.out)
    common.write_csv(out / f"{args.name}.csv", rows)
    data = "Synthetic(1,1)"
    if args.max_samples:
        data += (
            f" users of at most {args.max_samples} samples from one {args.users_file_format} file"
        )
    title = (
        f"{args.rounds} rounds, {args.fraction:.0%} of users per round, E={args.epochs}, "
        f"B={args.batch_size}, {args.model} on {data}; {common.machine()['nproc']} cores"
        + (f"; on {args.device}" if args.device != "cpu" else "")
    )
    plot(rows, out / f"{args.name}.png", title)
    md = f"{title}\n\n" + common.markdown_table(
        rows, [c for c in COLUMNS if any(c in r for r in rows)]
    )
    (out / f"{args.name}.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
