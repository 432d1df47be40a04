"""`server start`'s round feed: each round's line and its row for the live display."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pollinate import config
from pollinate.deploy.server import ServerOptions, _RunWatch
from pollinate.deploy.state import ServerDir
from pollinate.server.metrics import MetricsRecorder


def test_each_round_reaches_the_echo_and_the_display_once(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cfg = config.load(None, [f'run.dir="{run_dir}"', "run.num-rounds=3"])
    lines: list[str] = []
    rows: list[dict[str, Any]] = []
    opts = ServerOptions(
        cfg=cfg,
        host="127.0.0.1",
        port=1,
        state=ServerDir(tmp_path / "state"),
        certs=None,
        echo=lines.append,
        on_round=rows.append,
    )
    watch = _RunWatch(opts, submitted_at=time.time())
    recorder = MetricsRecorder(run_dir)
    recorder.start(config_toml="", num_rounds=3)
    for r in (0, 1, 2):
        recorder.end_round(r, {"loss": 1.0, "accuracy": 0.1 * r})
    watch.poll()
    watch.poll()  # nothing new: nothing printed twice
    recorder.close()
    assert [line.split(" |")[0] for line in lines] == ["round 1/3", "round 2/3"]
    assert [row["round"] for row in rows] == [1, 2]
    assert rows[1]["server_accuracy"] == 0.2 and "train_users" in rows[1]
