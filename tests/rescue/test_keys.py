"""Tests for rescue.keys: key pair files, their modes, loading, rotation and dev keys."""

from __future__ import annotations

import hashlib
import os
import re
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from rescue import keys
from rescue.keys import (
    KeyStoreError,
    ensure_dev_keys,
    generate_keypair,
    load_public_keys,
    load_signing_key,
)

KID_RE = re.compile(r"k\d{8}-[0-9a-f]{8}")


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# --- generate_keypair ---------------------------------------------------------------------

@pytest.mark.usefixtures("umask_022")
def test_generate_writes_a_matching_pair_with_strict_modes(tmp_path: Path) -> None:
    out = tmp_path / "new" / "keys"
    kid = generate_keypair(out)

    assert KID_RE.fullmatch(kid)
    assert listing(out) == [f"{kid}.key", f"{kid}.pub"]
    assert mode_of(out) == 0o700
    assert mode_of(out / f"{kid}.key") == 0o600
    assert mode_of(out / f"{kid}.pub") == 0o644
    assert (out / f"{kid}.key").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert (out / f"{kid}.pub").read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")

    signing = load_signing_key(out, kid)
    public = load_public_keys(out)[kid]
    assert raw_public(signing.private_key.public_key()) == raw_public(public)
    assert kid.endswith(hashlib.sha256(raw_public(public)).hexdigest()[:8])


def test_generate_leaves_an_existing_directory_mode_alone(tmp_path: Path) -> None:
    out = tmp_path / "shared"
    out.mkdir()
    out.chmod(0o750)
    generate_keypair(out)
    assert mode_of(out) == 0o750


def test_private_key_is_created_0600_exclusively_and_never_chmodded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[tuple[str, int, int]] = []
    real_open = os.open

    def spy_open(path: Any, flags: int, mode: int = 0o777, **kw: Any) -> int:
        opened.append((os.fspath(path), flags, mode))
        return real_open(path, flags, mode, **kw)

    def no_chmod(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("key files must be created with their mode, not chmodded")

    monkeypatch.setattr(os, "open", spy_open)
    monkeypatch.setattr(os, "chmod", no_chmod)
    monkeypatch.setattr(os, "fchmod", no_chmod)
    kid = generate_keypair(tmp_path)

    key_opens = [(p, f, m) for p, f, m in opened if f".{kid}.key." in p]
    assert len(key_opens) == 1
    _, flags, mode = key_opens[0]
    assert flags & (os.O_CREAT | os.O_EXCL | os.O_WRONLY) == os.O_CREAT | os.O_EXCL | os.O_WRONLY
    assert mode == 0o600
    assert listing(tmp_path) == [f"{kid}.key", f"{kid}.pub"]  # no temporary files left


def test_generate_twice_gives_two_distinct_pairs(tmp_path: Path) -> None:
    first, second = generate_keypair(tmp_path), generate_keypair(tmp_path)
    assert first != second
    assert set(load_public_keys(tmp_path)) == {first, second}


def test_generate_never_replaces_an_existing_key(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keys, "_make_kid", lambda public_key: "fixed")
    generate_keypair(tmp_path)
    before = (tmp_path / "fixed.key").read_bytes()
    with pytest.raises(KeyStoreError, match=r"fixed\.pub"):
        generate_keypair(tmp_path)
    assert (tmp_path / "fixed.key").read_bytes() == before
    assert listing(tmp_path) == ["fixed.key", "fixed.pub"]


def test_generate_into_a_path_that_is_a_file_fails_clearly(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(KeyStoreError, match="file"):
        generate_keypair(target)


# --- load_public_keys ---------------------------------------------------------------------

def test_load_public_keys_returns_every_pub_by_kid_and_ignores_others(tmp_path: Path) -> None:
    a, b = generate_keypair(tmp_path), generate_keypair(tmp_path)
    (tmp_path / "README").write_text("not a key")
    (tmp_path / f".{a}.pub.123.tmp").write_text("half-written")
    loaded = load_public_keys(tmp_path)
    assert set(loaded) == {a, b}
    assert all(isinstance(k, Ed25519PublicKey) for k in loaded.values())


def test_load_public_keys_refuses_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(KeyStoreError, match="does not exist"):
        load_public_keys(tmp_path / "absent")


def test_load_public_keys_refuses_a_directory_without_pub_files(tmp_path: Path) -> None:
    (tmp_path / "only.key").write_text("x")
    with pytest.raises(KeyStoreError, match="no public key"):
        load_public_keys(tmp_path)


def test_load_public_keys_names_a_file_that_is_not_pem(tmp_path: Path) -> None:
    generate_keypair(tmp_path)
    (tmp_path / "broken.pub").write_text("hello")
    with pytest.raises(KeyStoreError, match=r"broken\.pub.*not a PEM public key"):
        load_public_keys(tmp_path)


def test_load_public_keys_names_a_non_ed25519_key(tmp_path: Path) -> None:
    ec_public = ec.generate_private_key(ec.SECP256R1()).public_key()
    (tmp_path / "ec.pub").write_bytes(ec_public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(KeyStoreError, match=r"ec\.pub.*not an Ed25519 public key"):
        load_public_keys(tmp_path)


def test_load_public_keys_refuses_a_file_name_that_is_no_kid(tmp_path: Path) -> None:
    kid = generate_keypair(tmp_path)
    (tmp_path / f"{kid}.pub").rename(tmp_path / "bad name.pub")
    with pytest.raises(KeyStoreError, match=r"bad name\.pub.*not a valid key id"):
        load_public_keys(tmp_path)


# --- load_signing_key ---------------------------------------------------------------------

def test_load_signing_key_by_kid(tmp_path: Path) -> None:
    a, b = generate_keypair(tmp_path), generate_keypair(tmp_path)
    assert load_signing_key(tmp_path, a).kid == a
    assert load_signing_key(tmp_path, b).kid == b
    assert isinstance(load_signing_key(tmp_path, a).private_key, Ed25519PrivateKey)


def test_load_signing_key_defaults_to_the_newest_by_mtime(tmp_path: Path) -> None:
    a, b = generate_keypair(tmp_path), generate_keypair(tmp_path)
    os.utime(tmp_path / f"{a}.key", ns=(2_000_000_000_000_000_000,) * 2)
    os.utime(tmp_path / f"{b}.key", ns=(1_000_000_000_000_000_000,) * 2)
    assert load_signing_key(tmp_path).kid == a
    os.utime(tmp_path / f"{b}.key", ns=(3_000_000_000_000_000_000,) * 2)
    assert load_signing_key(tmp_path).kid == b


def test_load_signing_key_breaks_mtime_ties_by_name(tmp_path: Path) -> None:
    kids = [generate_keypair(tmp_path) for _ in range(3)]
    for kid in kids:
        os.utime(tmp_path / f"{kid}.key", ns=(1_500_000_000_000_000_000,) * 2)
    assert load_signing_key(tmp_path).kid == max(kids)


def test_load_signing_key_errors(tmp_path: Path) -> None:
    with pytest.raises(KeyStoreError, match="does not exist"):
        load_signing_key(tmp_path / "absent")
    with pytest.raises(KeyStoreError, match="no private key"):
        load_signing_key(tmp_path)
    generate_keypair(tmp_path)
    with pytest.raises(KeyStoreError, match=r"no private key .*other\.key"):
        load_signing_key(tmp_path, "other")
    with pytest.raises(KeyStoreError, match="invalid key id"):
        load_signing_key(tmp_path, "../etc/passwd")


def test_load_signing_key_refuses_bad_key_files(tmp_path: Path) -> None:
    (tmp_path / "garbage.key").write_text("not pem")
    with pytest.raises(KeyStoreError, match=r"garbage\.key.*not a PEM private key"):
        load_signing_key(tmp_path, "garbage")

    ec_key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "ec.key").write_bytes(ec_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    with pytest.raises(KeyStoreError, match=r"ec\.key.*not an Ed25519 private key"):
        load_signing_key(tmp_path, "ec")

    (tmp_path / "locked.key").write_bytes(Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    with pytest.raises(KeyStoreError, match=r"locked\.key.*encrypted"):
        load_signing_key(tmp_path, "locked")


# --- ensure_dev_keys ----------------------------------------------------------------------

@pytest.mark.usefixtures("umask_022")
def test_ensure_dev_keys_generates_once(tmp_path: Path) -> None:
    state = tmp_path / "state"
    key_dir = ensure_dev_keys(state)
    assert key_dir == state / "keys"
    first = listing(key_dir)
    assert len(first) == 2
    assert mode_of(key_dir) == 0o700
    assert ensure_dev_keys(state) == key_dir
    assert listing(key_dir) == first
    assert listing(state) == ["keys"]  # no staging directory left behind
    kid = load_signing_key(key_dir).kid
    assert set(load_public_keys(key_dir)) == {kid}


def test_ensure_dev_keys_keeps_existing_keys(tmp_path: Path) -> None:
    kid = generate_keypair(tmp_path / "keys")
    ensure_dev_keys(tmp_path)
    assert listing(tmp_path / "keys") == [f"{kid}.key", f"{kid}.pub"]


def test_ensure_dev_keys_fills_an_existing_directory_without_private_key(
        tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "README").write_text("dev keys")
    key_dir = ensure_dev_keys(tmp_path)
    assert load_signing_key(key_dir).kid in load_public_keys(key_dir)
    assert listing(tmp_path) == ["keys"]


def test_ensure_dev_keys_tolerates_losing_the_race(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    winner = generate_keypair(tmp_path / "keys")
    real_check = keys._has_private_key
    calls = []

    def stale_first_check(key_dir: Path) -> bool:
        # The first look happened before the other process finished writing.
        calls.append(key_dir)
        return False if len(calls) == 1 else real_check(key_dir)

    monkeypatch.setattr(keys, "_has_private_key", stale_first_check)
    assert ensure_dev_keys(tmp_path) == tmp_path / "keys"
    assert len(calls) == 2
    assert listing(tmp_path / "keys") == [f"{winner}.key", f"{winner}.pub"]
    assert listing(tmp_path) == ["keys"]


def test_ensure_dev_keys_racing_threads_share_one_pair(tmp_path: Path) -> None:
    racers = 8
    barrier = threading.Barrier(racers, timeout=10)
    results: list[Path] = []
    errors: list[BaseException] = []

    def race() -> None:
        try:
            barrier.wait()
            results.append(ensure_dev_keys(tmp_path))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=race) for _ in range(racers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert errors == []
    assert results == [tmp_path / "keys"] * racers
    assert len([n for n in listing(tmp_path / "keys") if n.endswith(".key")]) == 1
    assert listing(tmp_path) == ["keys"]


def test_ensure_dev_keys_reports_an_unusable_state_dir(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.write_text("a file, not a directory")
    with pytest.raises(KeyStoreError, match="state"):
        ensure_dev_keys(state)
