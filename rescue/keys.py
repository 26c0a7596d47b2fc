"""Ed25519 key files for relay tokens: generate, load and rotate them.

A key directory holds pairs named by key id (``kid``): ``<kid>.key`` is the private
key (PKCS#8 PEM, unencrypted, mode 0600) that the control plane signs with, and
``<kid>.pub`` is the public key (SubjectPublicKeyInfo PEM) that relays trust. Rotation
is adding a pair (new tokens use the newest key) and, once the old tokens have expired,
removing the old ``.pub``.

Files are created so that readers never see a partial file: each is written under a
temporary name that no glob here matches, created with its final mode, then renamed
into place. The ``.pub`` of a pair appears before its ``.key``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

PRIVATE_SUFFIX = ".key"
PUBLIC_SUFFIX = ".pub"
DEV_KEY_DIR_NAME = "keys"

_KID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")


class KeyStoreError(Exception):
    """A key file or directory could not be read or written; the message names it."""


@dataclass(frozen=True)
class SigningKey:
    """A private key and the id (``kid``) that tokens signed with it carry in their header."""

    kid: str
    private_key: Ed25519PrivateKey


def is_valid_kid(kid: str) -> bool:
    """Return whether ``kid`` is 1-128 characters of ``A-Z a-z 0-9 . _ -`` (and not a dot path)."""
    return _KID_RE.fullmatch(kid) is not None and kid not in (".", "..")


def _make_kid(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    day = time.strftime("%Y%m%d", time.gmtime())
    return f"k{day}-{hashlib.sha256(raw).hexdigest()[:8]}"


def _make_dir(path: Path) -> None:
    """Create ``path`` (mode 0700 for the directories created) unless it exists."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise KeyStoreError(f"cannot create key directory {path}: {e.strerror}") from e
    if not path.is_dir():
        raise KeyStoreError(f"key directory {path} is not a directory")


def _write_new_file(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to the new file ``path``, created with ``mode``; never replace a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            # link() refuses to replace an existing file, unlike rename().
            os.link(tmp, path)
        except OSError as e:
            if e.errno == errno.EEXIST or path.exists():
                raise
            os.rename(tmp, path)  # a file system without hard links
    except OSError as e:
        raise KeyStoreError(f"cannot write key file {path}: {e.strerror}") from e
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def generate_keypair(out_dir: Path) -> str:
    """Write a new Ed25519 pair ``<kid>.pub`` (0644) and ``<kid>.key`` (0600) into ``out_dir``.

    Creates ``out_dir`` with mode 0700 if missing. Returns the new key id. Raises
    :class:`KeyStoreError` if a file cannot be written.
    """
    out_dir = Path(out_dir)
    _make_dir(out_dir)
    private_key = Ed25519PrivateKey.generate()
    public_key = private_key.public_key()
    kid = _make_kid(public_key)
    public_pem = public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    private_pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    _write_new_file(out_dir / f"{kid}{PUBLIC_SUFFIX}", public_pem, 0o644)
    _write_new_file(out_dir / f"{kid}{PRIVATE_SUFFIX}", private_pem, 0o600)
    return kid


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise KeyStoreError(f"cannot read key file {path}: {e.strerror}") from e


def _files(key_dir: Path, suffix: str) -> list[Path]:
    if not key_dir.is_dir():
        raise KeyStoreError(f"key directory {key_dir} does not exist or is not a directory")
    try:
        return sorted(p for p in key_dir.iterdir()
                      if p.name.endswith(suffix) and not p.name.startswith("."))
    except OSError as e:
        raise KeyStoreError(f"cannot list key directory {key_dir}: {e.strerror}") from e


def _kid_of(path: Path) -> str:
    kid = path.name[: -len(path.suffix)]
    if not is_valid_kid(kid):
        raise KeyStoreError(
            f"key file {path}: name is not a valid key id (1-128 of A-Z a-z 0-9 . _ -)")
    return kid


def load_public_keys(key_dir: Path) -> dict[str, Ed25519PublicKey]:
    """Return every ``<kid>.pub`` in ``key_dir`` as ``{kid: public key}``.

    Raises :class:`KeyStoreError` if the directory is missing, holds no ``.pub`` file,
    or a file is unreadable or not an Ed25519 public key in PEM.
    """
    key_dir = Path(key_dir)
    paths = _files(key_dir, PUBLIC_SUFFIX)
    if not paths:
        raise KeyStoreError(f"key directory {key_dir} holds no public key (*{PUBLIC_SUFFIX})")
    out: dict[str, Ed25519PublicKey] = {}
    for path in paths:
        kid = _kid_of(path)
        try:
            key = serialization.load_pem_public_key(_read(path))
        except (ValueError, TypeError, UnsupportedAlgorithm) as e:
            raise KeyStoreError(f"key file {path} is not a PEM public key: {e}") from e
        if not isinstance(key, Ed25519PublicKey):
            raise KeyStoreError(
                f"key file {path} holds a {type(key).__name__}, not an Ed25519 public key")
        out[kid] = key
    return out


def _load_private(path: Path, kid: str) -> SigningKey:
    try:
        key = serialization.load_pem_private_key(_read(path), password=None)
    except TypeError as e:  # encrypted
        raise KeyStoreError(f"key file {path} is encrypted; an unencrypted key is needed") from e
    except (ValueError, UnsupportedAlgorithm) as e:
        raise KeyStoreError(f"key file {path} is not a PEM private key: {e}") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyStoreError(
            f"key file {path} holds a {type(key).__name__}, not an Ed25519 private key")
    return SigningKey(kid, key)


def load_signing_key(key_dir: Path, kid: str | None = None) -> SigningKey:
    """Load ``<kid>.key`` from ``key_dir``, or the newest ``*.key`` (by mtime, then name).

    Raises :class:`KeyStoreError` if there is no such key or it is unreadable or not
    an Ed25519 private key.
    """
    key_dir = Path(key_dir)
    if kid is not None:
        if not is_valid_kid(kid):
            raise KeyStoreError(
                f"invalid key id {kid!r}: use 1-128 characters of A-Z a-z 0-9 . _ -")
        if not key_dir.is_dir():
            raise KeyStoreError(f"key directory {key_dir} does not exist or is not a directory")
        path = key_dir / f"{kid}{PRIVATE_SUFFIX}"
        if not path.is_file():
            raise KeyStoreError(f"no private key {path}")
        return _load_private(path, kid)
    newest: tuple[int, str, Path] | None = None
    for path in _files(key_dir, PRIVATE_SUFFIX):
        try:
            mtime = path.stat().st_mtime_ns
        except OSError as e:
            raise KeyStoreError(f"cannot read key file {path}: {e.strerror}") from e
        if newest is None or (mtime, path.name) > newest[:2]:
            newest = (mtime, path.name, path)
    if newest is None:
        raise KeyStoreError(f"key directory {key_dir} holds no private key (*{PRIVATE_SUFFIX})")
    return _load_private(newest[2], _kid_of(newest[2]))


def _has_private_key(key_dir: Path) -> bool:
    try:
        return any(p.name.endswith(PRIVATE_SUFFIX) and not p.name.startswith(".")
                   for p in key_dir.iterdir())
    except FileNotFoundError:
        return False
    except OSError as e:
        raise KeyStoreError(f"cannot list key directory {key_dir}: {e.strerror}") from e


def ensure_dev_keys(state_dir: Path) -> Path:
    """Return ``state_dir/"keys"``, first generating one key pair there if it has no ``.key``.

    Processes racing here end up sharing one pair: the pair is generated in a private
    temporary directory that is renamed to ``keys`` in one step, and a process that
    loses the rename uses the winner's keys. Raises :class:`KeyStoreError` on I/O errors.
    """
    state_dir = Path(state_dir)
    key_dir = state_dir / DEV_KEY_DIR_NAME
    if _has_private_key(key_dir):
        return key_dir
    _make_dir(state_dir)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{DEV_KEY_DIR_NAME}-", dir=state_dir))
    except OSError as e:
        raise KeyStoreError(f"cannot create a directory in {state_dir}: {e.strerror}") from e
    try:
        generate_keypair(staging)
        try:
            # Atomic: succeeds if `keys` is missing or empty, fails if another process
            # already put its keys there.
            os.rename(staging, key_dir)
            return key_dir
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise KeyStoreError(
                    f"cannot create key directory {key_dir}: {e.strerror}") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not _has_private_key(key_dir):
        # `keys` exists and holds other files but no private key: add a pair to it.
        if not key_dir.is_dir():
            raise KeyStoreError(f"key directory {key_dir} is not a directory")
        generate_keypair(key_dir)
    return key_dir
