"""Certificates and node keys: permissions, names, and that Flower and TLS accept them."""

from __future__ import annotations

import argparse
import os
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from pollinate.deploy.certs import (
    DeployError,
    certificate_hosts,
    check_node_private_key,
    create_certs,
    create_node_key,
    key_fingerprint,
    load_node_public_key,
    private_key_fingerprint,
    write_private,
)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_certs_have_private_keys_0600_and_the_hosts(tmp_path: Path) -> None:
    old = os.umask(0)  # a careless umask must not leak the keys
    try:
        paths, new_ca = create_certs(tmp_path / "certs", ["localhost", "127.0.0.1", "fl.example"])
    finally:
        os.umask(old)
    assert new_ca
    assert mode(paths.ca_key) == 0o600 and mode(paths.server_key) == 0o600
    assert set(certificate_hosts(paths.server_cert)) == {"localhost", "fl.example", "127.0.0.1"}
    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_a_second_call_keeps_the_ca_and_reissues_the_server_certificate(tmp_path: Path) -> None:
    first, _ = create_certs(tmp_path)
    ca_before = first.ca_cert.read_bytes()
    second, new_ca = create_certs(tmp_path, ["localhost", "10.1.2.3"])
    assert not new_ca and second.ca_cert.read_bytes() == ca_before
    assert "10.1.2.3" in certificate_hosts(second.server_cert)


def test_tls_keys_are_p256_and_a_p384_ca_from_before_still_signs(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import hashes

    from pollinate.deploy import certs

    paths, _ = create_certs(tmp_path / "new")
    for cert_path in (paths.ca_cert, paths.server_cert):
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = cert.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
        assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    # A CA made by an earlier Pollinate (P-384) is reused and signs with SHA-384.
    old = tmp_path / "old"
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = certs._builder(
        x509.Name([]), x509.Name([]), ca_key, certs.dt.datetime.now(certs.dt.timezone.utc), 30
    )
    ca = ca_cert.add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True).sign(
        ca_key, hashes.SHA384()
    )
    old.mkdir()
    write_private(old / "ca.key", certs._pem_key(ca_key))
    (old / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    reissued, new_ca = create_certs(old)
    assert not new_ca
    server = x509.load_pem_x509_certificate(reissued.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    assert isinstance(server.signature_hash_algorithm, hashes.SHA384)


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_tls_handshake_with_the_ca(tmp_path: Path, host: str) -> None:
    paths, _ = create_certs(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(paths.server_cert, paths.server_key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def accept() -> None:
        conn, _ = listener.accept()
        with server_ctx.wrap_socket(conn, server_side=True) as tls:
            tls.sendall(b"ok")

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    client_ctx = ssl.create_default_context(cafile=str(paths.ca_cert))
    with (
        socket.create_connection(("127.0.0.1", port)) as raw,
        client_ctx.wrap_socket(raw, server_hostname=host) as tls,
    ):
        assert tls.recv(2) == b"ok"
    thread.join(5)
    listener.close()


def test_bad_host_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(DeployError, match="neither a host name nor an IP"):
        create_certs(tmp_path, ["bad host/name"])


def test_node_key_is_what_flower_loads(tmp_path: Path) -> None:
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    key = create_node_key(tmp_path, "dev")
    assert mode(key.private) == 0o600
    assert key.public.read_text().startswith("ecdsa-sha2-nistp384 ")
    private = serialization.load_ssh_private_key(key.private.read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    assert try_load_public_key(key.public)  # what `flwr supernode register` reads
    args = argparse.Namespace(
        auth_supernode_private_key=str(key.private), auth_supernode_public_key=None
    )
    loaded = _try_setup_client_authentication(args)  # what flower-supernode reads
    assert loaded is not None
    # The fingerprint of the PEM the SuperLink logs is the one keygen printed.
    pem = loaded[1].public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert key_fingerprint(pem) == key.fingerprint == key_fingerprint(key.public.read_bytes())
    assert private_key_fingerprint(key.private) == key.fingerprint


def test_keygen_never_replaces_an_identity_unless_forced(tmp_path: Path) -> None:
    first = create_node_key(tmp_path, "dev")
    with pytest.raises(DeployError, match=r"already exists.*--force"):
        create_node_key(tmp_path, "dev")
    second = create_node_key(tmp_path, "dev", force=True)
    assert second.fingerprint != first.fingerprint
    with pytest.raises(DeployError, match="plain file name"):
        create_node_key(tmp_path, "../x")


def test_private_key_checks(tmp_path: Path) -> None:
    key = create_node_key(tmp_path, "dev")
    assert check_node_private_key(key.private) == key.private.resolve()
    with pytest.raises(DeployError, match="public key; --key takes the private key"):
        check_node_private_key(key.public)
    with pytest.raises(DeployError, match=r"does not exist.*pollinate node keygen"):
        check_node_private_key(tmp_path / "missing")
    key.private.chmod(0o644)
    with pytest.raises(DeployError, match="chmod 600"):
        check_node_private_key(key.private)


def test_public_key_checks(tmp_path: Path) -> None:
    key = create_node_key(tmp_path, "dev")
    assert load_node_public_key(key.public).startswith(b"ecdsa-sha2-nistp384")
    with pytest.raises(DeployError, match=r"is a private key; register the \.pub"):
        load_node_public_key(key.private)
    other = tmp_path / "ed.pub"
    other.write_bytes(
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    with pytest.raises(DeployError, match="must be ECDSA"):
        load_node_public_key(other)
    junk = tmp_path / "junk.pub"
    junk.write_text("hello")
    with pytest.raises(DeployError, match="not an OpenSSH public key"):
        load_node_public_key(junk)


def test_write_private_replaces_atomically_with_0600(tmp_path: Path) -> None:
    target = tmp_path / "k"
    target.write_text("old")
    target.chmod(0o644)
    write_private(target, b"new")
    assert target.read_bytes() == b"new" and mode(target) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["k"]
