"""TLS certificates for the coordinator and authentication keys for devices.

``pollinate certs create DIR`` makes a private certificate authority and a server
certificate signed by it::

    DIR/ca.crt       # give this to every device (node start --root-cert)
    DIR/ca.key       # keep it secret: it can sign more server certificates (0600)
    DIR/server.pem   # the coordinator's certificate, valid for the given hosts
    DIR/server.key   # its private key (0600)

``pollinate node keygen DIR`` makes a device's identity: an ECDSA P-384 key pair in the
OpenSSH formats that ``flower-supernode --auth-supernode-private-key`` and ``flwr supernode
register`` load (``DIR/NAME`` private, 0600; ``DIR/NAME.pub`` public, one line
``ecdsa-sha2-nistp384 AAAA... comment``).

Private keys are created with mode 0600 by ``os.open`` (never chmod-ed after the fact) and
written atomically, so no other user can ever read them, not even briefly.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
CA_DAYS = 3650
SERVER_DAYS = 825  # the longest lifetime browsers and most TLS stacks still accept


class DeployError(ValueError):
    """Bad deployment input (paths, keys, addresses); the message says how to fix it."""


@dataclass(frozen=True)
class CertPaths:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def in_dir(cls, directory: str | os.PathLike[str]) -> CertPaths:
        d = Path(directory)
        return cls(d / "ca.crt", d / "ca.key", d / "server.pem", d / "server.key")


@dataclass(frozen=True)
class NodeKeyPaths:
    private: Path
    public: Path
    fingerprint: str


# ----------------------------------------------------------------------------- files


def write_private(path: Path, data: bytes) -> None:
    """Atomically write ``data`` to ``path`` as a file created with mode 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # A fresh name in the target folder, created 0600 from the start (O_EXCL: never an
    # existing file someone else prepared), then renamed over the target.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# ----------------------------------------------------------------------- certificates


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host.strip("[]"))))
        except ValueError:
            if not host or any(c in host for c in " /:@"):
                raise DeployError(
                    f"--host {host!r} is neither a host name nor an IP address"
                ) from None
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _tls_key() -> ec.EllipticCurvePrivateKey:
    # P-256: the server signs every TLS handshake with this key, and a P-256 signature costs
    # ~0.02 ms of CPU against P-384's ~0.8 ms (a whole handshake, server side: 0.26 vs
    # 1.07 ms). A server with a thousand devices makes handshakes all the time (idle
    # connections close after 5 s), so the curve shows in its CPU. 128-bit security, as
    # most of the web's TLS.
    return ec.generate_private_key(ec.SECP256R1())


def _node_key() -> ec.EllipticCurvePrivateKey:
    # P-384, as Flower's docs make node keys. The SuperLink verifies a device's signature
    # once per signature, not once per request (flower_compat/node_auth_cache.py).
    return ec.generate_private_key(ec.SECP384R1())


def _signing_hash(key: ec.EllipticCurvePrivateKey) -> hashes.SHA256 | hashes.SHA384:
    """The hash that matches ``key``'s curve (a CA made before P-256 is P-384)."""
    return hashes.SHA384() if key.curve.key_size > 256 else hashes.SHA256()


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _make_ca(now: dt.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _tls_key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Pollinate"),
            x509.NameAttribute(NameOID.COMMON_NAME, "Pollinate federation CA"),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        _builder(name, name, key, now, CA_DAYS)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(signs_certificates=True), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, _signing_hash(key))
    )
    return key, cert


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    now: dt.datetime,
    days: int,
) -> x509.CertificateBuilder:
    """A certificate for ``key`` valid from a few minutes ago (clock skew) for ``days``."""
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
    )


def _key_usage(*, signs_certificates: bool) -> x509.KeyUsage:
    """A CA key signs certificates and CRLs; an ECDHE server key agrees keys. Both sign."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not signs_certificates,
        key_cert_sign=signs_certificates,
        crl_sign=signs_certificates,
        encipher_only=False,
        decipher_only=False,
    )


def _load_ca(paths: CertPaths) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    try:
        cert = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
        key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), password=None)
    except (ValueError, TypeError) as err:
        raise DeployError(
            f"{paths.ca_cert.parent} holds an unreadable CA ({err}); "
            "remove ca.crt and ca.key to make a new CA"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise DeployError(f"{paths.ca_key} is not an EC key made by pollinate certs create")
    return key, cert


def create_certs(
    directory: str | os.PathLike[str], hosts: list[str] | None = None
) -> tuple[CertPaths, bool]:
    """A CA (reused if DIR already has one) and a server certificate for ``hosts``.

    Returns the paths and whether the CA is new. Reusing the CA means devices that already
    trust ``ca.crt`` keep working after the server certificate is re-issued (e.g. for a new
    host name).
    """
    hosts = list(dict.fromkeys(hosts or DEFAULT_HOSTS))
    san = _san(hosts)
    paths = CertPaths.in_dir(directory)
    now = dt.datetime.now(dt.timezone.utc)
    if paths.ca_cert.exists() and paths.ca_key.exists():
        ca_key, ca_cert = _load_ca(paths)
        new_ca = False
    else:
        ca_key, ca_cert = _make_ca(now)
        new_ca = True
    key = _tls_key()
    cn = hosts[0]
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    cert = (
        _builder(subject, ca_cert.subject, key, now, SERVER_DAYS)
        .add_extension(san, critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(signs_certificates=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, _signing_hash(ca_key))
    )
    if new_ca:
        write_private(paths.ca_key, _pem_key(ca_key))
        write_public(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    write_private(paths.server_key, _pem_key(key))
    write_public(paths.server_cert, cert.public_bytes(serialization.Encoding.PEM))
    return paths, new_ca


def certificate_hosts(path: Path) -> list[str]:
    """The subjectAltNames of a PEM certificate, as strings."""
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(v) for v in san.get_values_for_type(x509.DNSName)] + [
        str(v) for v in san.get_values_for_type(x509.IPAddress)
    ]


# ------------------------------------------------------------------------- node keys


def public_key_fingerprint(public_openssh: bytes) -> str:
    """``SHA256:...`` as ``ssh-keygen -l`` prints it."""
    parts = public_openssh.split()
    if len(parts) < 2:
        raise DeployError("not an OpenSSH public key line")
    digest = hashlib.sha256(base64.b64decode(parts[1])).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def key_fingerprint(public_key: bytes) -> str:
    """The ``SHA256:...`` fingerprint of a PEM or OpenSSH public key (what keygen prints)."""
    if public_key.startswith(b"-----BEGIN"):
        key = serialization.load_pem_public_key(public_key)
        public_key = key.public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    return public_key_fingerprint(public_key)


def private_key_fingerprint(path: Path) -> str:
    """The fingerprint of a node private key's public half ('?' if unreadable)."""
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
        public = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    except (OSError, ValueError, TypeError):
        return "?"
    return public_key_fingerprint(public)


def create_node_key(
    directory: str | os.PathLike[str], name: str = "node", *, force: bool = False
) -> NodeKeyPaths:
    """An ECDSA P-384 key pair: ``DIR/NAME`` (OpenSSH private, 0600), ``DIR/NAME.pub``."""
    if not name or "/" in name or name.startswith("."):
        raise DeployError(f"--name {name!r} must be a plain file name, e.g. device-1")
    private = Path(directory) / name
    public = private.with_name(f"{name}.pub")
    if not force and (private.exists() or public.exists()):
        raise DeployError(
            f"{private} already exists: it is a device identity, so it is not replaced; "
            "pick another --name, or pass --force to replace it"
        )
    key = _node_key()
    private_bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public_bytes = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    public_line = public_bytes + f" pollinate-{name}\n".encode()
    write_private(private, private_bytes)
    write_public(public, public_line)
    return NodeKeyPaths(private, public, public_key_fingerprint(public_line))


def load_node_public_key(path: str | os.PathLike[str]) -> bytes:
    """The OpenSSH public key line in ``path``, checked to be an EC key on a NIST curve."""
    p = Path(path)
    if not p.is_file():
        raise DeployError(f"public key file '{p}' does not exist")
    data = p.read_bytes()
    if b"PRIVATE KEY" in data:
        raise DeployError(f"'{p}' is a private key; register the .pub file next to it")
    try:
        key = serialization.load_ssh_public_key(data.strip())
    except (ValueError, TypeError, Exception) as err:  # UnsupportedAlgorithm too
        raise DeployError(
            f"'{p}' is not an OpenSSH public key ({err}); make one with pollinate node keygen"
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise DeployError(
            f"'{p}' is a {type(key).__name__}, but Flower node keys must be ECDSA "
            "(pollinate node keygen makes P-384 keys)"
        )
    return data.strip() + b"\n"


def check_node_private_key(path: str | os.PathLike[str]) -> Path:
    """The absolute path of a usable node private key; a one-line error otherwise."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DeployError(
            f"node key '{p}' does not exist; make one with: pollinate node keygen DIR"
        )
    data = p.read_bytes()
    if data.startswith(b"ecdsa-") or data.startswith(b"ssh-"):
        raise DeployError(f"'{p}' is a public key; --key takes the private key (without .pub)")
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except (ValueError, TypeError, Exception) as err:
        raise DeployError(
            f"'{p}' is not an unencrypted OpenSSH private key ({err}); "
            "make one with pollinate node keygen DIR"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise DeployError(f"'{p}' is not an ECDSA key; make one with pollinate node keygen DIR")
    mode = p.stat().st_mode & 0o077
    if mode:
        raise DeployError(
            f"node key '{p}' is readable by other users (mode {oct(p.stat().st_mode & 0o777)}); "
            f"run: chmod 600 {p}"
        )
    return p.resolve()
