"""Many devices in one process: emulated SuperNodes that speak Flower's Fleet API.

``pollinate node start`` runs one device per process (a Flower SuperNode plus a warm
ClientApp worker, ~400 MB with torch). To measure a *server* with 1,000 devices on one
machine, :class:`Emulator` hosts many device identities in one process instead. Each has
its own node key (node authentication: every request carries a timestamp signed with it; a
signature is reused for up to a minute, which the SuperLink accepts, see
:class:`~pollinate.flower_compat.fleet.ReusedSignatureInterceptor`), its own TLS
connection and its own data file, and does what a stock ``flower-supernode`` does with the
SuperLink, request for request (``flwr/supernode/fleet_http_connection.py`` and
``start_client_internal.py``):

    ActivateNode; then loop: PullMessages -> [GetRun, GetFab once per run] -> PullObject x k
    -> ConfirmMessageReceived -> ClientApp -> PushMessages -> PushObject x k';
    SendNodeHeartbeat every ~0.8 x the heartbeat interval; DeactivateNode at the end.

What differs from a real device is only what the server cannot see: the ClientApp (the
Pollinate ClientApp installed here, as :mod:`pollinate.deploy.worker` runs it) is called in
this process, one call at a time (it keeps one model workbench per process), and a pool of
threads serves all identities, each identity at most one request at a time.

:class:`PollPolicy` sets how an idle device polls; ``STOCK`` is ``flower-supernode``'s
(an empty pull, then 3 s of sleep; GetRun + GetFab for a new run), ``TUNED`` polls soon
after a message and then backs off to ``idle_max``, and skips GetFab (the app is installed,
so the FAB is never run — the same as the warm worker).
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import Context, Message, RecordDict
from flwr.app.error import Error

from pollinate import protocol
from pollinate.flower_compat import fleet, poll_advice
from pollinate.flower_compat.keep_alive import CLIENT_KEEP_ALIVE, clients_keep_connections

log = logging.getLogger("pollinate.emulator")

ClientApp = Callable[[Message, Context], Message]


@dataclass(frozen=True)
class PollPolicy:
    """How an emulated device paces its requests.

    ``idle_min``..``idle_max``: the sleep after an empty pull grows as ``idle_share`` of the
    time idle so far (0: always ``idle_max``). ``heartbeat``: the interval announced to the
    SuperLink (it marks a node offline after 2 missed ones); a heartbeat goes out every
    ~0.8 x that, as Flower's ``HeartbeatSender`` does. ``get_fab``: ask for the run's FAB.
    ``expect`` (0: off): after a reply, the first poll waits ``expect`` x the wait that came
    before the last message (federated rounds keep a rhythm: the next message is due about
    a round later), at most ``expect_max`` s; polling then goes on as above.

    Scaled to the rhythm (0: off), so that a device's requests per round stay flat however
    long a round takes (a round's length grows with the number of devices):
    ``rhythm_poll``: the idle sleep may grow past ``idle_max`` to that share of the last
    wait; ``rhythm_heartbeat``: the heartbeat interval announced is that many last waits
    (within ``heartbeat`` .. ``heartbeat_max``; the SuperLink takes any interval of
    10 .. 1,800 s with every heartbeat, and marks a node offline after 2 missed ones).
    ``keep_alive`` (None: httpx's 5 s, as a stock SuperNode): how long the device keeps an
    idle connection to the SuperLink (Pollinate's SuperLink keeps one 75 s).
    """

    idle_min: float
    idle_max: float
    idle_share: float
    heartbeat: int = fleet.HEARTBEAT_DEFAULT_INTERVAL
    get_fab: bool = True
    expect: float = 0.0
    expect_max: float = 60.0
    rhythm_poll: float = 0.0
    rhythm_heartbeat: float = 0.0
    heartbeat_max: int = 600
    take_advice: bool = False
    keep_alive: float | None = None

    def idle_sleep(self, idle: float, last_wait: float = 0.0) -> float:
        cap = max(self.idle_max, self.rhythm_poll * last_wait)
        if self.idle_share <= 0:
            return cap
        return min(max(self.idle_min, idle * self.idle_share), cap)

    def heartbeat_interval(self, last_wait: float) -> int:
        """The interval to announce (s), given the wait before the last message."""
        scaled = int(self.rhythm_heartbeat * last_wait)
        return min(max(self.heartbeat, scaled), max(self.heartbeat, self.heartbeat_max))

    def first_sleep(self, last_wait: float) -> float:
        """The sleep right after a reply, given the wait before the last message."""
        return min(self.expect * last_wait, self.expect_max)


# flower-supernode 1.42: `time.sleep(3)` after an empty PullMessages, heartbeat 30 s.
STOCK = PollPolicy(idle_min=3.0, idle_max=3.0, idle_share=0.0)
# A round's next message comes about as long after a reply as the last one did: sleep 80%
# of that, then poll every 15% of the time idle so far (0.25 .. 4 s), so a message is
# picked up within ~3% of a round late with a few polls per round. Where there is no
# rhythm yet (after the user query, which comes once), polls start 0.25 s apart and grow
# 15% each: a wait of 60 s costs ~30 polls (50 ms and 10%: ~74). The 4 s cap stays
# under a stock SuperLink's 5 s keep-alive (uvicorn's): an idle device's poll reuses its
# TLS connection instead of costing the server a new handshake; Pollinate's SuperLink keeps
# an idle connection 75 s and these devices 60 s. Rounds of minutes (hundreds of devices
# on one server): polls up to 10% of the last wait apart (a few per round instead of one
# per 4 s; over 60 s apart, a new handshake each), and a heartbeat interval of 2 waits (a
# dead device is still found within ~4 rounds), so requests per device-round do not grow
# with the round.
TUNED = PollPolicy(
    idle_min=0.25,
    idle_max=4.0,
    idle_share=0.15,
    get_fab=False,
    expect=0.8,
    expect_max=600.0,
    rhythm_poll=0.1,
    rhythm_heartbeat=2.0,
    take_advice=True,
    keep_alive=CLIENT_KEEP_ALIVE,
)
POLICIES = {"stock": STOCK, "tuned": TUNED}

RETRY_AFTER = 1.0  # s, after a failed request (server busy or restarting)


@dataclass(frozen=True)
class DeviceSpec:
    """One emulated device: its node key (``None``: insecure, no auth) and node config."""

    key: Path | None
    node_config: Mapping[str, str | int | float | bool]


def load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """A node's ECDSA private key (OpenSSH or PEM, as ``ssh-keygen`` / certs.py write it)."""
    data = path.read_bytes()
    key: Any
    if b"OPENSSH" in data:
        key = serialization.load_ssh_private_key(data, password=None)
    else:
        key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path}: not an ECDSA key")
    return key


@dataclass(eq=False)
class _Device:
    spec: DeviceSpec
    client: Any  # fleet.FleetHttpClient
    public_key: bytes = b""
    node: Any = None  # fleet.Node once active
    idle_since: float = 0.0
    last_wait: float = 0.0  # idle time before the last message
    advised: int = 0  # s, the server's advice at the last empty pull since a message
    next_heartbeat: float = 0.0
    contexts: dict[int, Context] = field(default_factory=dict)
    runs: set[int] = field(default_factory=set)
    failures: int = 0


@dataclass
class EmulatorStats:
    """What the emulated devices did, for benchmarks and tests."""

    requests: Counter[str] = field(default_factory=Counter)
    messages: int = 0  # ClientApp calls (train + evaluate + query)
    app_errors: int = 0
    request_errors: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, rpc: str) -> None:
        with self._lock:
            self.requests[rpc] += 1

    def count_request_error(self) -> None:
        with self._lock:
            self.request_errors += 1

    def count_app_error(self) -> None:
        with self._lock:
            self.app_errors += 1


class _CountingClient:
    """A Fleet client that counts each RPC it makes (per-device request figures)."""

    def __init__(self, inner: Any, stats: EmulatorStats) -> None:
        self._inner = inner
        self._stats = stats

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not name[:1].isupper():
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            self._stats.count(name)
            return attr(*args, **kwargs)

        return call


class Emulator:
    """Serve ``devices`` against the SuperLink at ``address`` with ``threads`` threads.

    ``root_certificates``: the CA's PEM bytes (TLS), or None for an insecure SuperLink.
    Use as a context manager, or :meth:`start` / :meth:`stop`.
    """

    def __init__(
        self,
        devices: Sequence[DeviceSpec],
        address: str,
        *,
        client_app: ClientApp,
        root_certificates: bytes | None,
        policy: PollPolicy = TUNED,
        threads: int = 8,
        seed: int = 0,
        signature_reuse: float = fleet.SIGNATURE_REUSE,
    ) -> None:
        fleet.check_fleet_api()
        self._signature_reuse = signature_reuse
        self.address = address
        self.policy = policy
        self.client_app = client_app
        self.stats = EmulatorStats()
        self._threads = threads
        self._rng = random.Random(seed)
        self._app_lock = threading.Lock()  # the ClientApp keeps one workbench per process
        self._stop = threading.Event()
        self._cv = threading.Condition()
        self._due: list[tuple[float, int, _Device]] = []
        self._seq = 0
        self._workers: list[threading.Thread] = []
        self.devices = [self._device(spec, root_certificates) for spec in devices]

    def _device(self, spec: DeviceSpec, root_certificates: bytes | None) -> _Device:
        private = public = None
        if spec.key is not None:
            private = load_private_key(spec.key)
            public = private.public_key()
        kept = self.policy.keep_alive
        if os.environ.get("POLLINATE_SHORT_KEEPALIVE"):  # httpx's 5 s, for side-by-side runs
            kept = None
        with clients_keep_connections(kept) if kept is not None else contextlib.nullcontext():
            client = fleet.fleet_client(
                self.address,
                root_certificates,
                private,
                public,
                signature_reuse=self._signature_reuse,
            )
        device = _Device(spec, _CountingClient(client, self.stats))
        if public is not None:
            device.public_key = fleet.public_key_to_bytes(public)
        return device

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Emulator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def active(self) -> int:
        """Devices the SuperLink has activated."""
        return sum(d.node is not None for d in self.devices)

    def start(self) -> None:
        now = time.monotonic()
        for device in self.devices:
            self._schedule(device, now)
        for i in range(self._threads):
            worker = threading.Thread(target=self._serve, name=f"emulator-{i}", daemon=True)
            worker.start()
            self._workers.append(worker)

    def stop(self) -> None:
        """Stop polling, deactivate every device (as a stopping SuperNode does), close."""
        self._stop.set()
        with self._cv:
            self._cv.notify_all()
        for worker in self._workers:
            worker.join(60)
        for device in self.devices:
            if device.node is not None:
                with contextlib.suppress(Exception):
                    device.client.DeactivateNode(
                        fleet.DeactivateNodeRequest(node_id=device.node.node_id)
                    )
                device.node = None
            with contextlib.suppress(Exception):
                device.client.close()

    # ------------------------------------------------------------------ scheduling

    def _schedule(self, device: _Device, due: float) -> None:
        with self._cv:
            self._seq += 1
            heapq.heappush(self._due, (due, self._seq, device))
            self._cv.notify()

    def _next(self) -> _Device | None:
        with self._cv:
            while not self._stop.is_set():
                if self._due:
                    wait = self._due[0][0] - time.monotonic()
                    if wait <= 0:
                        return heapq.heappop(self._due)[2]
                    self._cv.wait(wait)
                else:
                    self._cv.wait(1.0)
        return None

    def _serve(self) -> None:
        while (device := self._next()) is not None:
            try:
                due = self._step(device)
                device.failures = 0
            except Exception as err:  # a request failed: retry later, never die
                device.failures += 1
                self.stats.count_request_error()
                if device.failures in (1, 10, 100):
                    log.warning("device %s: %s", device.spec.node_config, err)
                due = time.monotonic() + RETRY_AFTER
            self._schedule(device, due)

    # ------------------------------------------------------------------ protocol

    def _step(self, device: _Device) -> float:
        """One turn of a SuperNode's loop for ``device``; returns when it is due again."""
        now = time.monotonic()
        if device.node is None:
            self._activate(device)
            now = device.idle_since = time.monotonic()
        if now >= device.next_heartbeat:
            self._heartbeat(device)
        got = device.client.PullMessages(fleet.PullMessagesRequest(node=device.node))
        if got.messages_list:
            device.last_wait = time.monotonic() - device.idle_since
            device.advised = 0
            message = fleet.message_from_proto(got.messages_list[0])
            self._handle(device, message, got.message_object_trees[0])
            now = device.idle_since = time.monotonic()
            if message.metadata.message_type.startswith("query"):
                return now  # a one-off exchange before the rounds: no rhythm to go by
            # A SuperNode pulls again at once (expect = 0).
            return min(now + self.policy.first_sleep(device.last_wait), device.next_heartbeat)
        advised = poll_advice.advice_of(got) if self.policy.take_advice else 0
        if advised:
            device.advised = advised
            return min(time.monotonic() + advised, device.next_heartbeat)
        sleep = self.policy.idle_sleep(time.monotonic() - device.idle_since, device.last_wait)
        return min(time.monotonic() + sleep, device.next_heartbeat)

    def _activate(self, device: _Device) -> None:
        res = device.client.ActivateNode(
            fleet.ActivateNodeRequest(
                public_key=device.public_key, heartbeat_interval=self.policy.heartbeat
            )
        )
        device.node = fleet.Node(node_id=res.node_id)
        device.next_heartbeat = time.monotonic() + self._heartbeat_every()

    def _heartbeat_every(self, interval: float | None = None) -> float:
        # Flower's HeartbeatSender: (interval - 5 s call timeout) x (0.8 +- 0.1).
        interval = self.policy.heartbeat if interval is None else interval
        return (interval - 5) * (0.8 + self._rng.uniform(-0.1, 0.1))

    def _heartbeat(self, device: _Device) -> None:
        interval = self.policy.heartbeat_interval(max(device.last_wait, device.advised))
        res = device.client.SendNodeHeartbeat(
            fleet.SendNodeHeartbeatRequest(node=device.node, heartbeat_interval=interval)
        )
        if not res.success:
            device.node = None  # the SuperLink forgot it: activate again
            raise RuntimeError("heartbeat refused; re-activating")
        device.next_heartbeat = time.monotonic() + self._heartbeat_every(interval)

    def _handle(self, device: _Device, message: Message, tree: Any) -> None:
        run_id = message.metadata.run_id
        client, node = device.client, device.node
        if run_id not in device.runs:
            run = client.GetRun(fleet.GetRunRequest(node=node, run_id=run_id)).run
            if self.policy.get_fab:
                client.GetFab(fleet.GetFabRequest(node=node, hash_str=run.fab_hash, run_id=run_id))
            device.runs.add(run_id)
        message_id = message.metadata.message_id
        contents = fleet.pull_objects(
            [t.object_id for t in fleet.iterate_object_tree(tree)],
            pull_object_fn=fleet.make_pull_object_fn_protobuf(client.PullObject, node, run_id),
            max_concurrent_pulls=1,
            initial_backoff=0.05,
            backoff_cap=0.5,
        )
        fleet.make_confirm_message_received_fn_protobuf(
            client.ConfirmMessageReceived, node, run_id
        )(message_id)
        full = fleet.inflate_object_from_contents(message_id, contents)
        assert isinstance(full, Message)
        full.metadata.__dict__["_message_id"] = message_id
        t0 = time.perf_counter()
        reply = self._run_app(device, full)
        self._push(device, reply, run_id, time.perf_counter() - t0)

    def _run_app(self, device: _Device, message: Message) -> Message:
        run_id = message.metadata.run_id
        context = device.contexts.get(run_id)
        if context is None:
            context = Context(
                run_id=run_id,
                node_id=device.node.node_id,
                node_config=dict(device.spec.node_config),
                state=RecordDict(),
                run_config={},
            )
            device.contexts[run_id] = context
        try:
            with self._app_lock:
                reply = self.client_app(message, context)
                self.stats.messages += 1
            return reply
        except Exception as err:  # an error reply, as a SuperNode sends for a failed app
            self.stats.count_app_error()
            log.warning("device %s: ClientApp raised %r", device.spec.node_config, err)
            error = Error(code=fleet.ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=repr(err))
            return Message(error, reply_to=message)

    def _push(self, device: _Device, reply: Message, run_id: int, runtime: float) -> None:
        client, node = device.client, device.node
        reply.metadata.__dict__["_message_id"] = reply.object_id
        with fleet.no_object_id_recompute():
            tree = fleet.get_object_tree(reply)
            objects = fleet.get_all_nested_objects(reply)
            res = client.PushMessages(
                fleet.PushMessagesRequest(
                    node=node,
                    messages_list=[
                        fleet.message_to_proto(fleet.remove_content_from_message(reply))
                    ],
                    message_object_trees=[tree],
                    clientapp_runtime_list=[runtime],
                )
            )
            fleet.push_objects(
                objects,
                fleet.make_push_object_fn_protobuf(client.PushObject, node, run_id, res.session_id),
                object_ids_to_push=set(res.objects_to_push),
                max_concurrent_pushes=1,
            )


def write_device_files(root: Path, num: int, rows: int = 40) -> list[Path]:
    """``root/device<i>.csv`` holding user ``user<i>``: ``rows`` of sklearn's 8x8 digits each.

    Rows are taken in a window that wraps around the 1,797 digits, so any number of
    devices gets ``rows`` rows (neighbours overlap; for measuring the server, not models).
    """
    import numpy as np
    import pandas as pd
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    root.mkdir(parents=True, exist_ok=True)
    columns = [f"p{j}" for j in range(x.shape[1])]
    paths = []
    for i in range(num):
        idx = (i * 7 + np.arange(rows) * 13) % len(x)  # stride 13: all classes in a window
        df = pd.DataFrame(x[idx], columns=columns)
        df.insert(0, "user", f"user{i}")
        df["label"] = y[idx]
        path = root / f"device{i}.csv"
        df.to_csv(path, index=False)
        paths.append(path)
    return paths


def device_specs(root: Path, num: int, *, keys: bool, rows: int = 40) -> list[DeviceSpec]:
    """``num`` devices under ``root``: data files, model folders and (``keys``) node keys."""
    from pollinate.deploy.certs import create_node_key

    specs = []
    for i, data in enumerate(write_device_files(root / "data", num, rows)):
        key = create_node_key(root / "keys", f"device{i}").private if keys else None
        config = protocol.device_node_config(str(data), str(root / "models" / f"device{i}"))
        specs.append(DeviceSpec(key, config))
    return specs


def register_devices(flwr_home: Path, connection: str, devices: Sequence[DeviceSpec]) -> int:
    """Register every device's key with the SuperLink's Control API; returns how many.

    ``flwr_home``: the folder whose ``config.toml`` names ``connection`` (``pollinate server
    start`` writes ``<state>/flwr``). One request per key, from this process.
    """
    import os

    keys = [
        fleet.public_key_to_bytes(load_private_key(d.key).public_key())
        for d in devices
        if d.key is not None
    ]
    before = os.environ.get("FLWR_HOME")
    os.environ["FLWR_HOME"] = str(flwr_home)  # where Flower's CLI helpers read connections
    try:
        return len(fleet.register_node_keys(connection, keys))
    finally:
        if before is None:
            del os.environ["FLWR_HOME"]
        else:
            os.environ["FLWR_HOME"] = before


def wait_until(condition: Callable[[], bool], timeout: float, every: float = 0.2) -> bool:
    """True once ``condition()`` holds, False after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(every)
    return True


__all__ = [
    "POLICIES",
    "STOCK",
    "TUNED",
    "DeviceSpec",
    "Emulator",
    "EmulatorStats",
    "PollPolicy",
    "device_specs",
    "load_private_key",
    "register_devices",
    "wait_until",
    "write_device_files",
]
