"""The enrollment token store and the Enroller, without a SuperLink (a fake registry)."""

from __future__ import annotations

import multiprocessing
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from cli.certs import generate_node_keys
from cli.enrollment import Enroller, EnrollmentRefused, TokenRefused, TokenStore, check_name, parse_duration, token_hash
from cli.node_registry import EnrolledNode, NodeRegistry, RegistryError
from cli.local_superlink import free_port


@pytest.fixture
def store(tmp_path) -> TokenStore:
    return TokenStore.in_home(tmp_path / "coordinator")


def test_tokens_are_kept_only_as_hashes(store):
    token = store.issue(name="hospital-a", valid_for=3600)
    raw = store.path.read_bytes()
    assert token.encode() not in raw and token_hash(token).encode() in raw
    assert len(token) >= 43  # 256 random bits, URL-safe
    assert store.path.stat().st_mode & 0o077 == 0


def test_a_token_is_spent_once(store):
    token = store.issue(name="hospital-a", valid_for=3600)
    assert store.redeem(token) == "hospital-a"
    with pytest.raises(TokenRefused, match="'hospital-a' was already used"):
        store.redeem(token)


def _redeem_in_process(path: str, token: str, barrier) -> bool:
    barrier.wait()
    try:
        TokenStore(path=Path(path)).redeem(token)
        return True
    except TokenRefused:
        return False


def test_racing_redemptions_spend_a_token_exactly_once(store):
    token = store.issue(name="contested", valid_for=3600)
    barrier, wins = threading.Barrier(12), []

    def redeem() -> None:
        barrier.wait()  # all at once, each on its own connection
        try:
            store.redeem(token)
            wins.append(1)
        except TokenRefused:
            pass

    threads = [threading.Thread(target=redeem) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(wins) == 1

    token = store.issue(name="contested-across-processes", valid_for=3600)
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        shared = manager.Barrier(4)
        with context.Pool(4) as pool:
            results = pool.starmap(_redeem_in_process, [(str(store.path), token, shared)] * 4)
    assert sorted(results) == [False, False, False, True]


def test_unknown_and_expired_tokens_are_refused(store):
    with pytest.raises(TokenRefused, match="unknown enrollment token"):
        store.redeem("forged-" + "x" * 40)
    token = store.issue(name="late", valid_for=60, now=time.time() - 61)
    with pytest.raises(TokenRefused, match="'late' expired at"):
        store.redeem(token)
    assert store.pending() == []


def test_a_token_for_another_name_is_refused_and_left_unused(store):
    token = store.issue(name="hospital-a", valid_for=3600)
    with pytest.raises(TokenRefused, match="admits 'hospital-a', not 'hospital-b'"):
        store.redeem(token, expect="hospital-b")
    assert store.redeem(token, expect="hospital-a") == "hospital-a"


def test_release_reopens_a_token_until_it_enrolled_someone(store):
    token = store.issue(name="n", valid_for=3600)
    store.redeem(token)
    store.release(token)
    store.redeem(token)
    store.settle(token, node_id=2**64 - 1)  # Flower's node IDs are uint64
    store.release(token)  # a settled token stays spent
    with pytest.raises(TokenRefused):
        store.redeem(token)


def test_cancel_removes_only_unused_invitations_and_pending_lists_them(store):
    used, unused = store.issue(name="n", valid_for=3600), store.issue(name="n", valid_for=3600)
    store.issue(name="other", valid_for=3600)
    store.redeem(used)
    assert sorted(i.name for i in store.pending()) == ["n", "other"]
    assert store.cancel("n") == 1
    with pytest.raises(TokenRefused, match="unknown"):
        store.redeem(unused)
    assert [i.name for i in store.pending()] == ["other"]
    with sqlite3.connect(store.path) as db:  # the spent one is kept: it records who enrolled
        assert db.execute("SELECT COUNT(*) FROM invitations WHERE name = 'n'").fetchone() == (1,)


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("30m", 1800), ("24h", 86400), ("7d", 604800)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["0h", "24", "2 weeks", "-1h", "1.5h", ""])
def test_bad_durations_are_named(text):
    with pytest.raises(ValueError, match=repr(text).replace("(", r"\(")):
        parse_duration(text)


@pytest.mark.parametrize("name", ["bad name", "", "-x", "a" * 65, "ä"])
def test_bad_node_names_are_named(name):
    with pytest.raises(ValueError, match="must be 1-64"):
        check_name(name)


class BrokenRegistry:
    def register(self, *, name: str, public_key: bytes) -> int:
        raise RegistryError("registering: the SuperLink's Control API at 127.0.0.1:1 does not answer")

    def nodes(self) -> list[EnrolledNode]:
        return []


def test_a_failed_registration_leaves_the_token_usable(store, tmp_path):
    token = store.issue(name="n", valid_for=3600)
    key = generate_node_keys(tmp_path).public.read_text()
    with pytest.raises(EnrollmentRefused) as refused:
        Enroller(store=store, registry=BrokenRegistry()).enroll(token=token, public_key=key, peer="p")
    assert refused.value.status == 502 and "does not answer" in refused.value.reason
    assert store.redeem(token) == "n"


def test_the_registry_names_an_address_that_does_not_answer(pki):
    address = f"127.0.0.1:{free_port()}"
    with pytest.raises(RegistryError, match=address):
        NodeRegistry(address=address, ca=pki.ca_cert).nodes()


def test_no_token_starts_with_a_dash(monkeypatch):
    # a token "-x..." is read by argparse as an option: `enroll --token -x...` failed to parse
    import secrets

    from cli import enrollment

    drawn = iter(["-AAAA", "-BBBB", "CCCC"])
    monkeypatch.setattr(secrets, "token_urlsafe", lambda n: next(drawn))
    assert enrollment.new_token() == "CCCC"
