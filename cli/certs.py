"""TLS material for a deployment, made with the ``cryptography`` package (no openssl).

``generate_tls`` writes a private CA and a server certificate signed by it into one
directory (``ca.crt``, ``ca.key``, ``server.crt``, ``server.key``). The server
certificate always names ``localhost``, ``127.0.0.1`` and ``::1`` besides the given
host names: the SuperLink listens on 127.0.0.1, where the coordinator's public front, the
operator's commands and the SuperLink's own ServerApp runtime connect and verify it with
the same CA.

``generate_node_keys`` writes a SuperNode's authentication key pair: an EC P-384
private key in OpenSSH format (what ``flower-supernode --auth-supernode-private-key``
loads) and its OpenSSH public key (what ``flwr supernode register`` sends).

``probe`` makes one TLS handshake and one ``GET /health`` against a coordinator, with
a timeout, so a wrong address or CA is reported in seconds, naming the value.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
# the curves Flower's SuperLink accepts for SuperNode keys (flwr.supercore.primitives.asymmetric)
NIST_CURVES = (ec.SECP192R1, ec.SECP224R1, ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
NODE_KEY = "node.key"
NODE_PUB = "node.pub"


@dataclass(frozen=True, kw_only=True)
class TlsFiles:
    ca_cert: Path
    ca_key: Path | None  # None when the user brings their own certificates
    server_cert: Path
    server_key: Path

    @classmethod
    def in_dir(cls, directory: Path) -> TlsFiles:
        return cls(ca_cert=directory / "ca.crt", ca_key=directory / "ca.key",
                   server_cert=directory / "server.crt", server_key=directory / "server.key")

    def complete(self) -> bool:
        return all(p.is_file() for p in (self.ca_cert, self.server_cert, self.server_key))


@dataclass(frozen=True, kw_only=True)
class NodeKeys:
    private: Path
    public: Path

    @classmethod
    def in_dir(cls, directory: Path) -> NodeKeys:
        return cls(private=directory / NODE_KEY, public=directory / NODE_PUB)


def generate_tls(directory: Path, *, hostnames: list[str], days: int = 825) -> TlsFiles:
    """A new CA and a server certificate for ``hostnames`` (plus loopback) in ``directory``."""
    if days < 1:
        raise ValueError(f"certificate validity must be >= 1 day, got {days}")
    names = list(dict.fromkeys([*hostnames, *LOOPBACK_NAMES]))  # ordered, deduplicated
    for name in names:
        _check_hostname(name)
    directory.mkdir(parents=True, exist_ok=True)
    files = TlsFiles.in_dir(directory)
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)  # tolerate small clock skew
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedlora coordinator CA")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name).public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_san(n) for n in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write(files.ca_key, _pem_key(ca_key), private=True)
    _write(files.server_key, _pem_key(server_key), private=True)
    _write(files.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    _write(files.server_cert, server_cert.public_bytes(serialization.Encoding.PEM))
    return files


def generate_node_keys(directory: Path) -> NodeKeys:
    """A SuperNode key pair in ``directory``; an existing pair is kept (enrolment is by key)."""
    keys = NodeKeys.in_dir(directory)
    if keys.private.exists():
        load_node_key(keys.private)  # refuse to reuse a corrupt key silently
        if not keys.public.exists():
            _write(keys.public, _public_ssh(load_node_key(keys.private)))
        return keys
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    _write(keys.private, private, private=True)
    _write(keys.public, _public_ssh(key))
    return keys


def load_node_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The node's private key, or an error naming the file (missing, or not an EC OpenSSH key)."""
    if not path.is_file():
        raise FileNotFoundError(f"node private key {str(path)!r} does not exist (create it: fedlora client enroll)")
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except (ValueError, UnsupportedAlgorithm, TypeError) as exc:
        raise ValueError(f"node private key {str(path)!r} is not an OpenSSH EC private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"node private key {str(path)!r} is {type(key).__name__}, not an EC (P-384) key")
    return key


def load_node_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    """A node's OpenSSH public key (what ``flwr supernode register`` accepts), or an error naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"public key {str(path)!r} does not exist")
    return parse_node_public_key(path.read_bytes(), source=f"public key {str(path)!r}")


def parse_node_public_key(data: bytes, *, source: str) -> ec.EllipticCurvePublicKey:
    """An OpenSSH EC public key on a NIST curve (what the SuperLink accepts); errors name ``source``."""
    try:
        key = serialization.load_ssh_public_key(data.strip())
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"{source} is not an OpenSSH public key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError(f"{source} is {type(key).__name__}, not an EC (P-384) key")
    if not isinstance(key.curve, NIST_CURVES):
        raise ValueError(f"{source} uses curve {key.curve.name}, not a NIST curve")
    return key


def certificate_names(path: Path) -> list[str]:
    """The DNS names and IP addresses a certificate is valid for."""
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*names.get_values_for_type(x509.DNSName), *map(str, names.get_values_for_type(x509.IPAddress))]


def load_ca(path: Path) -> x509.Certificate:
    """The CA certificate, or an error naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"CA certificate {str(path)!r} does not exist")
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError as exc:
        raise ValueError(f"CA certificate {str(path)!r} is not a PEM certificate: {exc}") from None


def probe(address: str, *, ca: Path | None, tls: bool = True, timeout: float = 5.0) -> None:
    """One TLS handshake and ``GET /health``; errors name the address and the CA.

    With ``ca`` the server certificate is verified against it (what a client does);
    ``tls`` without ``ca`` only checks that the server answers over TLS (readiness of
    our own child process, whose certificate may not name the loopback address).
    """
    host, port = split_address(address)
    context = _client_context(ca) if tls else None
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise ConnectionError(f"coordinator {address!r} does not answer ({_reason(exc)})") from None
    try:
        sock.settimeout(timeout)
        if context is not None:
            try:
                sock = context.wrap_socket(sock, server_hostname=host)
            except ssl.SSLCertVerificationError as exc:
                raise ConnectionError(
                    f"coordinator {address!r} is not trusted by CA certificate {str(ca)!r}: {exc.verify_message}"
                ) from None
            except (ssl.SSLError, OSError) as exc:
                raise ConnectionError(f"TLS handshake with coordinator {address!r} failed: {_reason(exc)}") from None
        _health(sock, host, address)
    finally:
        sock.close()


def _client_context(ca: Path | None) -> ssl.SSLContext:
    if ca is None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    load_ca(ca)  # a missing or malformed file is named before any network call
    return ssl.create_default_context(cafile=str(ca))


def split_address(address: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port); errors name the address."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"coordinator address {address!r} is not of the form HOST:PORT")
    return host, int(port)


def _health(sock: socket.socket, host: str, address: str) -> None:
    request = f"GET /health HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    try:
        sock.sendall(request.encode())
        head = sock.recv(64).decode("latin-1")
    except OSError as exc:
        raise ConnectionError(f"coordinator {address!r} did not answer a health check ({_reason(exc)})") from None
    status = head.splitlines()[0] if head else ""
    if status.split(" ")[1:2] != ["200"]:
        raise ConnectionError(f"coordinator {address!r} is not healthy: {status or 'no answer'!r}")


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _check_hostname(name: str) -> None:
    if not name or any(c.isspace() for c in name) or "/" in name or ":" in name and not _is_ip(name):
        raise ValueError(f"hostname {name!r} is not a DNS name or IP address")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def _san(name: str) -> x509.GeneralName:
    return x509.IPAddress(ipaddress.ip_address(name)) if _is_ip(name) else x509.DNSName(name)


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
        key_agreement=not cert_sign, key_cert_sign=cert_sign, crl_sign=cert_sign, encipher_only=False,
        decipher_only=False,
    )


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _public_ssh(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n"


def _write(path: Path, data: bytes, *, private: bool = False) -> None:
    # private keys are created 0600 from the start, never world-readable for a moment
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
