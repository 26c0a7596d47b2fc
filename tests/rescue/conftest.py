"""Fixtures for the unit tests of rescue/: a fresh token signing key and its verifier."""

from __future__ import annotations

from pathlib import Path

import pytest

from rescue.keys import SigningKey, generate_keypair, load_public_keys, load_signing_key
from rescue.tokens import TokenVerifier


@pytest.fixture
def fresh_key_dir(tmp_path: Path) -> Path:
    """A key directory with one new keypair, for this test alone (it may add or remove keys)."""
    generate_keypair(tmp_path / "keys")
    return tmp_path / "keys"


@pytest.fixture
def key(fresh_key_dir: Path) -> SigningKey:
    """The signing key of :func:`fresh_key_dir`."""
    return load_signing_key(fresh_key_dir)


@pytest.fixture
def verifier(fresh_key_dir: Path) -> TokenVerifier:
    """A default :class:`TokenVerifier` trusting the keys of :func:`fresh_key_dir`."""
    return TokenVerifier(load_public_keys(fresh_key_dir))
