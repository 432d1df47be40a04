"""Bad input to the deployment commands: one line, exit 2, before any process starts."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from deployhelp import write_device_files

from pollinate.cli import main
from pollinate.deploy.certs import create_certs, create_node_key


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("POLLINATE_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    return tmp_path / "home"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code, _out, err = run(capsys, *argv)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture
def device(tmp_path: Path) -> dict[str, str]:
    write_device_files(tmp_path, 1)
    key = create_node_key(tmp_path / "keys", "dev")
    create_certs(tmp_path / "certs")
    return {
        "data": str(tmp_path / "device0.csv"),
        "key": str(key.private),
        "ca": str(tmp_path / "certs" / "ca.crt"),
    }


def node(device: dict[str, str], *extra: str) -> list[str]:
    return ["node", "start", "--server", "127.0.0.1:1", "--data", device["data"], *extra]


def test_certs_and_keygen(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, _ = run(capsys, "certs", "create", str(tmp_path / "c"), "--host", "fl.example")
    assert code == 0 and "localhost, 127.0.0.1, ::1, fl.example" in out
    code, out, _ = run(capsys, "node", "keygen", str(tmp_path / "k"), "--name", "d1")
    assert code == 0 and "SHA256:" in out and (tmp_path / "k" / "d1.pub").is_file()
    assert "already exists" in one_line_error(
        capsys, "node", "keygen", str(tmp_path / "k"), "--name", "d1"
    )


def test_node_start_checks_the_data_file_first(
    capsys: pytest.CaptureFixture[str], device: dict[str, str], tmp_path: Path
) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("user,label,f1\nu,1,abc\n")
    args = ["node", "start", "--server", "127.0.0.1:1", "--data", str(bad)]
    message = one_line_error(capsys, *args, "--key", device["key"], "--root-cert", device["ca"])
    assert "feature column 'f1'" in message and "not numeric" in message
    message = one_line_error(capsys, *node(device, "--key", device["key"], "--user", "nobody"))
    assert "user 'nobody' is not in data file" in message
    assert not (tmp_path / "home" / "node" / "logs").exists()  # nothing was started


def test_node_start_key_and_tls_options(
    capsys: pytest.CaptureFixture[str], device: dict[str, str]
) -> None:
    assert "needs --key KEY" in one_line_error(capsys, *node(device))
    message = one_line_error(capsys, *node(device, "--insecure", "--key", device["key"]))
    assert "--insecure turns TLS off" in message
    message = one_line_error(capsys, *node(device, "--key", device["key"] + ".pub"))
    assert "is a public key" in message
    message = one_line_error(capsys, *node(device, "--key", device["key"], "--root-cert", "/nope"))
    assert "--root-cert '/nope' does not exist" in message
    message = one_line_error(capsys, *node(device, "--key", device["key"], "--serve", "8080"))
    assert "--serve" in message and "HOST:PORT" in message
    message = one_line_error(
        capsys, "node", "start", "--server", "nowhere", "--data", device["data"], "--insecure"
    )
    assert "--server" in message


def test_node_start_against_a_listener_that_is_not_tls_is_refused(
    capsys: pytest.CaptureFixture[str], device: dict[str, str]
) -> None:
    # A plain TCP listener that closes at once is neither TLS nor HTTP: for a TLS node
    # that is a server that does not speak TLS.
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    try:
        args = [
            "node", "start", "--server", f"127.0.0.1:{port}", "--data", device["data"],
            "--key", device["key"], "--root-cert", device["ca"], "--serve", "none",
        ]  # fmt: skip
        assert "does not use TLS" in one_line_error(capsys, *args)
    finally:
        listener.close()


def test_node_start_with_several_users_needs_a_user_to_serve(
    capsys: pytest.CaptureFixture[str], device: dict[str, str], tmp_path: Path
) -> None:
    two = tmp_path / "two.csv"
    rows = Path(device["data"]).read_text().splitlines()
    two.write_text("\n".join([rows[0], rows[1], rows[2].replace("user0", "user9", 1)]) + "\n")
    args = ["node", "start", "--server", "127.0.0.1:1", "--data", str(two), "--key", device["key"]]
    assert "holds 2 users" in one_line_error(capsys, *args)


def test_server_start_bad_input(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cfg = tmp_path / "exp.toml"
    cfg.write_text("[model]\nname = 'mlp'\n")
    message = one_line_error(capsys, "server", "start", "--config", str(cfg))
    assert "set model.in-features" in message
    cfg.write_text("[model]\nname = 'mlp'\nin-features = 64\nnum-classes = 10\n")
    message = one_line_error(capsys, "server", "start", "--config", str(cfg))
    assert "no TLS certificates" in message and "pollinate certs create" in message
    message = one_line_error(capsys, "server", "start", "--config", str(cfg), "--address", "x")
    assert "--address" in message
    create_certs(tmp_path / "c", ["localhost", "127.0.0.1"])
    busy = socket.create_server(("127.0.0.1", 0))
    try:
        port = busy.getsockname()[1]
        message = one_line_error(
            capsys, "server", "start", "--config", str(cfg), "--certs", str(tmp_path / "c"),
            "--address", f"127.0.0.1:{port}",
        )  # fmt: skip
        assert "already in use" in message
    finally:
        busy.close()
    message = one_line_error(capsys, "server", "start", "--config", str(tmp_path / "missing.toml"))
    assert "does not exist" in message


def test_register_and_status_without_a_server(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    key = create_node_key(tmp_path / "keys", "dev")
    assert "is a private key" in one_line_error(capsys, "server", "register-node", str(key.private))
    code, out, _ = run(capsys, "server", "register-node", str(key.public))
    assert code == 0 and "registered when the server starts" in out
    assert (tmp_path / "home" / "server" / "nodes" / "dev.pub").is_file()
    code, out, _ = run(capsys, "server", "status", "--format", "json")
    assert code == 0 and json.loads(out)["running"] is False
    code, out, _ = run(capsys, "server", "status")
    assert "not running" in out


def test_node_serve_missing_store(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    message = one_line_error(capsys, "node", "serve", "--model-dir", str(tmp_path / "none"))
    assert "does not exist" in message


# ------------------------------------------------------------- one spelling of the flags


def test_old_and_new_flag_spellings_parse_alike(capsys: pytest.CaptureFixture[str]) -> None:
    from pollinate.cli import build_parser
    from pollinate.deploy.flags import serve_address

    parser = build_parser()
    new = parser.parse_args(["node", "serve", "--model-dir", "m", "--serve", "0.0.0.0:9000",
                             "--user", "bob"])  # fmt: skip
    assert capsys.readouterr().err == ""
    old = parser.parse_args(["node", "serve", "--model-dir", "m", "--host", "0.0.0.0",
                             "--port", "9000", "--user-id", "bob"])  # fmt: skip
    notes = capsys.readouterr().err.splitlines()
    assert notes == [
        "note: --host is deprecated; use --serve HOST:PORT",
        "note: --port is deprecated; use --serve HOST:PORT",
        "note: --user-id is deprecated; use --user",
    ]
    for args in (new, old):
        assert serve_address(args, allow_none=False) == ("0.0.0.0", 9000) and args.user == "bob"
    start = parser.parse_args(["node", "start", "--server", "h:1", "--data", "d.csv",
                               "--user-id", "ann", "--serve", "none"])  # fmt: skip
    assert start.user == "ann" and serve_address(start, allow_none=True) is None
    pred = parser.parse_args(["predict", "in.csv", "-o", "o.csv", "--model-dir", "m",
                              "--user-id", "ann"])  # fmt: skip
    assert pred.user == "ann"
    # The hidden spellings stay out of --help.
    for argv in (["node", "serve", "--help"], ["node", "start", "--help"]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
        text = capsys.readouterr().out
        assert "--serve HOST:PORT" in text and "--user ID" in text
        assert "--user-id" not in text and "--host" not in text and "--port" not in text


def test_node_serve_accepts_one_users_folder(tmp_path: Path) -> None:
    import httpx

    from pollinate.client.store import ModelStore
    from pollinate.models import create_model

    model = create_model("mlp", in_features=4, num_classes=2, hidden=8, seed=0)
    store = ModelStore(tmp_path / "models")
    for kind in ("global", "personal"):
        store.save("alice", kind, spec=model.spec, state_dict=model.state_dict(), round=2)
    folder = tmp_path / "models" / "alice"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pollinate",
            "node",
            "serve",
            "--model-dir",
            str(folder),
            "--serve",
            f"127.0.0.1:{port}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                r = httpx.post(f"http://127.0.0.1:{port}/predict", json={"row": [0, 1, 2, 3]})
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout
                time.sleep(0.2)
        assert r.status_code == 200, r.text
        assert r.json()["user"] == "alice" and r.json()["version"]["round"] == 2
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    # A different user than the folder's is a one-line error.
    from pollinate.client import PredictError, load_model

    assert load_model(folder, "global").user == "alice"
    with pytest.raises(PredictError, match="holds the models of user 'alice' only"):
        load_model(folder, "global", user="bob")
