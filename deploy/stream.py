"""``pollinate node stream``: answer prediction requests from a message broker.

A thin shell over :class:`pollinate.client.streaming.StreamConsumer`: checks the options and
the broker (one line and exit 2 when either is wrong), answers until SIGINT / SIGTERM
(finishing the batch in hand), then prints what it did. ``pollinate node start
--stream-broker URL`` runs the same command as a child next to the SuperNode
(:func:`stream_argv`).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pollinate.client.broker import (
    BrokerError,
    RedisBroker,
    connect,
    default_consumer,
    redacted_url,
)
from pollinate.deploy.certs import DeployError

EXIT_OK = 0


@dataclass(frozen=True)
class StreamSettings:
    """Everything ``node stream`` needs; the CLI flags one to one."""

    broker: str
    requests: str
    predictions: str
    model_dir: Path
    model: str = "personal"
    user: str | None = None
    group: str | None = None  # default pollinate-<model>
    consumer: str | None = None  # default: the host name
    dead_letter: str | None = None  # default <requests>:dead-letter
    batch: int = 100
    maxlen: int = 0
    max_deliveries: int = 5
    claim_idle: float = 60.0  # seconds
    threads: int = 1

    @property
    def group_name(self) -> str:
        return self.group or f"pollinate-{self.model}"

    @property
    def dead_letter_name(self) -> str:
        return self.dead_letter or f"{self.requests}:dead-letter"

    @property
    def consumer_name(self) -> str:
        return self.consumer or default_consumer()


def check_settings(s: StreamSettings) -> None:
    """One-line :class:`DeployError` for options that cannot work."""
    from pollinate.client.store import KINDS  # lazy: the store imports torch (see above)

    if s.model not in KINDS:
        raise DeployError(f"--model {s.model!r}: choose one of {', '.join(KINDS)}")
    for flag, value in (("--batch", s.batch), ("--max-deliveries", s.max_deliveries)):
        if value < 1:
            raise DeployError(f"{flag} must be at least 1, got {value}")
    if s.maxlen < 0:
        raise DeployError(f"--maxlen must be >= 0 (0 keeps every entry), got {s.maxlen}")
    if not s.claim_idle > 0:
        raise DeployError(f"--claim-idle must be > 0 seconds, got {s.claim_idle}")
    if s.threads < 1:
        raise DeployError(f"--threads must be at least 1, got {s.threads}")
    if s.model_dir.exists() and not s.model_dir.is_dir():
        raise DeployError(f"--model-dir '{s.model_dir}' is not a folder")


def open_broker(s: StreamSettings) -> RedisBroker:
    """The broker of ``s``, reached once; a one-line :class:`DeployError` if it cannot be."""
    try:
        broker = connect(
            s.broker,
            requests=s.requests,
            predictions=s.predictions,
            dead_letter=s.dead_letter_name,
            group=s.group_name,
            consumer=s.consumer_name,
            maxlen=s.maxlen,
        )
        broker.check()
    except BrokerError as e:
        raise DeployError(f"--broker: {e}") from None
    return broker


def stream_store(s: StreamSettings, echo: Callable[[str], None] = print) -> int:
    """Answer requests until a signal; the exit status."""
    # Lazy, like torch below: only the `node stream` process scores; `node start`, which
    # imports this module for its settings, must not load torch (the heaviest import here).
    from pollinate.client.predictor import PredictError
    from pollinate.client.streaming import HotModel, StreamConsumer, StreamOptions, model_file

    check_settings(s)
    try:
        model_file(s.model_dir, s.model, s.user)  # several users and no --user: say so now
    except PredictError as e:
        raise DeployError(str(e)) from None
    import torch

    torch.set_num_threads(s.threads)
    _log_to(echo)
    broker = open_broker(s)
    options = StreamOptions(
        batch=s.batch,
        max_deliveries=s.max_deliveries,
        claim_idle_ms=max(1, round(s.claim_idle * 1000)),
    )
    consumer = StreamConsumer(broker, HotModel(s.model_dir, s.model, s.user), options)
    echo(
        f"stream: answering {s.requests!r} on {_shown_url(s.broker)} with the {s.model} model "
        f"from {s.model_dir}: predictions to {s.predictions!r}, malformed requests to "
        f"{s.dead_letter_name!r} (group {s.group_name!r}, consumer {s.consumer_name!r})"
    )
    stop = threading.Event()
    with _stop_on_signals(stop):
        stats = consumer.run(stop)
    broker.close()
    echo(
        f"stream: stopped; answered {stats.answered}, dead-lettered {stats.dead_lettered}, "
        f"{stats.swaps} model swaps"
    )
    return EXIT_OK


def stream_argv(s: StreamSettings) -> list[str]:
    """The ``python -m pollinate node stream ...`` command for ``s`` (``node start``'s child)."""
    argv = [
        sys.executable, "-m", "pollinate", "node", "stream",
        "--broker", s.broker, "--requests", s.requests, "--predictions", s.predictions,
        "--model", s.model, "--model-dir", str(s.model_dir.resolve()),
        "--group", s.group_name, "--consumer", s.consumer_name,
        "--dead-letter", s.dead_letter_name, "--batch", str(s.batch),
        "--maxlen", str(s.maxlen), "--max-deliveries", str(s.max_deliveries),
        "--claim-idle", str(s.claim_idle), "--threads", str(s.threads),
        "--exit-with-parent",
    ]  # fmt: skip
    if s.user is not None:
        argv += ["--user", s.user]
    return argv


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGINT / SIGTERM set ``stop`` (the consumer finishes its batch) instead of killing."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signals are the main thread's; an embedding caller stops us another way
        return
    handlers = {
        sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


class _Echo(logging.Handler):
    """Log records as ``stream: ...`` lines through the command's ``echo``."""

    def __init__(self, echo: Callable[[str], None]) -> None:
        super().__init__()
        self.echo = echo

    def emit(self, record: logging.LogRecord) -> None:
        level = "" if record.levelno <= logging.INFO else f"{record.levelname.lower()}: "
        self.echo(f"stream: {level}{record.getMessage()}")


def _log_to(echo: Callable[[str], None]) -> None:
    """The consumer's log lines (model swaps, broker outages) go to ``echo``."""
    logger = logging.getLogger("pollinate.streaming")
    for handler in [h for h in logger.handlers if isinstance(h, _Echo)]:
        logger.removeHandler(handler)
    logger.addHandler(_Echo(echo))
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _shown_url(url: str) -> str:
    return redacted_url(url)
