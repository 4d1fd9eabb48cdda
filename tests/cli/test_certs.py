"""TLS material and node keys (cli/certs.py): formats Flower accepts, errors that name the value."""

from __future__ import annotations

import datetime as dt
import stat
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from cli.certs import (
    generate_node_keys,
    generate_tls,
    load_ca,
    load_node_key,
    parse_node_public_key,
    probe,
    split_address,
)
from cli.app import main
from cli.local_superlink import free_port


def test_server_certificate_is_signed_by_the_ca_and_names_host_and_loopback(pki):
    ca = load_ca(pki.ca_cert)
    cert = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["coordinator.example", "localhost"]
    assert {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for key in (pki.ca_key, pki.server_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_probe_verifies_the_server_with_the_ca(pki, tls_address):
    probe(tls_address, ca=pki.ca_cert)  # hostname 127.0.0.1 is in the certificate


def test_probe_with_a_wrong_ca_names_address_and_ca(tls_address, other_ca):
    started = time.monotonic()
    with pytest.raises(ConnectionError) as err:
        probe(tls_address, ca=other_ca)
    assert tls_address in str(err.value) and str(other_ca) in str(err.value) and "not trusted" in str(err.value)
    assert time.monotonic() - started < 5


def test_probe_of_an_address_that_does_not_answer_fails_fast():
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(ConnectionError, match=f"'{address}' does not answer"):
        probe(address, ca=None)
    assert time.monotonic() - started < 5


def test_probe_of_a_silent_server_times_out(pki):
    import socket

    with socket.socket() as listener:  # accepts the TCP connection, never speaks TLS
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(ConnectionError, match=address):
            probe(address, ca=pki.ca_cert, timeout=1.0)
        assert time.monotonic() - started < 5


def test_probe_names_a_missing_ca_file(tmp_path, tls_address):
    with pytest.raises(FileNotFoundError, match="nope.crt"):
        probe(tls_address, ca=tmp_path / "nope.crt")


def test_node_keys_are_in_the_formats_flower_loads(tmp_path):
    from flwr.cli.supernode.register import try_load_public_key

    keys = generate_node_keys(tmp_path / "node")
    private = serialization.load_ssh_private_key(keys.private.read_bytes(), password=None)
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    assert keys.public.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert try_load_public_key(keys.public)  # what `flwr supernode register` sends
    assert stat.S_IMODE(keys.private.stat().st_mode) == 0o600


def test_existing_node_keys_are_kept(tmp_path):
    first = generate_node_keys(tmp_path).private.read_bytes()
    assert generate_node_keys(tmp_path).private.read_bytes() == first


@pytest.mark.parametrize(
    "content, error, needle",
    [
        (None, FileNotFoundError, "does not exist"),
        (b"garbage", ValueError, "not an OpenSSH EC private key"),
        ("ed25519", ValueError, "not an EC"),
    ],
)
def test_bad_node_key_is_named(tmp_path, content, error, needle):
    path = tmp_path / "node.key"
    if content == "ed25519":
        content = ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(error) as err:
        load_node_key(path)
    assert str(path) in str(err.value) and needle in str(err.value)


def test_malformed_ca_is_named(tmp_path):
    path = tmp_path / "ca.crt"
    path.write_text("not a certificate")
    with pytest.raises(ValueError, match="ca.crt"):
        load_ca(path)


@pytest.mark.parametrize("name", ["bad host", "a/b", ""])
def test_invalid_hostname_is_named(tmp_path, name):
    with pytest.raises(ValueError, match=f"hostname {name!r}"):
        generate_tls(tmp_path, hostnames=[name])


@pytest.mark.parametrize("address", ["nohost", "h:99999", ":80", "h:port"])
def test_malformed_address_is_named(address):
    with pytest.raises(ValueError, match=repr(address)):
        split_address(address)


def test_ipv6_address_is_split():
    assert split_address("[::1]:9093") == ("::1", 9093)


def test_certs_command_keeps_existing_certificates_unless_forced(tmp_path, capsys):
    out = tmp_path / "pki"
    assert main(["coordinator", "certs", "--hostname", "coord", "--out", str(out)]) == 0
    first = (out / "ca.crt").read_bytes()
    assert main(["coordinator", "certs", "--hostname", "coord", "--out", str(out)]) == 0
    assert (out / "ca.crt").read_bytes() == first and "keeping" in capsys.readouterr().out
    assert main(["coordinator", "certs", "--hostname", "coord", "--out", str(out), "--force"]) == 0
    assert (out / "ca.crt").read_bytes() != first


def _certificate_naming_only(tmp_path, name: str):
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(key, hashes.SHA256()))
    (tmp_path / "s.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "s.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    return tmp_path / "s.crt", tmp_path / "s.key"


def test_coordinator_refuses_a_certificate_that_does_not_name_loopback(capsys, tmp_path):
    # the front and the SuperLink's own ServerApp runtime verify the SuperLink at 127.0.0.1
    cert, key = _certificate_naming_only(tmp_path, "coord.example")
    code = main(["coordinator", "start", "--host", "127.0.0.1", "--port", str(free_port()), "--home",
                 str(tmp_path / "home"), "--db", f"sqlite:///{tmp_path}/runs.db", "--ca", str(cert), "--cert",
                 str(cert), "--key", str(key)])
    out = capsys.readouterr().out.replace("\n", "")
    assert code == 2 and str(cert) in out and "127.0.0.1" in out and "coord.example" in out, out
    assert not (tmp_path / "home" / "flwr").exists()  # nothing was started


@pytest.mark.parametrize("curve", [ec.SECP256R1(), ec.SECP384R1(), ec.SECP521R1()])
def test_node_public_keys_on_nist_curves_are_accepted(curve):
    key = ec.generate_private_key(curve).public_key()
    text = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    assert parse_node_public_key(text + b"\n", source="k").public_numbers() == key.public_numbers()


def test_node_public_keys_that_flower_would_refuse_are_named():
    ed = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                         serialization.PublicFormat.OpenSSH)
    with pytest.raises(ValueError, match="the key from hospital-a is Ed25519PublicKey"):
        parse_node_public_key(ed, source="the key from hospital-a")
    with pytest.raises(ValueError, match="the key from hospital-a is not an OpenSSH public key"):
        parse_node_public_key(b"ssh-rsa nope", source="the key from hospital-a")
