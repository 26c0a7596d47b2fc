"""Signing keys and relay tokens for the benches (PyJWT, EdDSA), independent of ``rescue``.

Keys come from ``beach-rescue token keygen --out DIR`` (run through the current interpreter);
tokens are minted in-process with the claims the wire contract requires.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key


def generate_keys(directory: Path, timeout: float = 30.0) -> str:
    """Write a key pair into ``directory`` with the relay's own CLI; return its kid."""
    directory.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [sys.executable, "-m", "rescue", "token", "keygen", "--out", str(directory)],
        capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"token keygen failed ({done.returncode}): {done.stderr.strip()}")
    kid = done.stdout.strip().splitlines()[-1].strip() if done.stdout.strip() else ""
    if not (directory / f"{kid}.key").is_file():
        raise RuntimeError(f"token keygen printed {kid!r} but wrote no {kid}.key")
    return kid


class TokenMinter:
    """Mints ``fallback-ws`` tokens for any session with one private key."""

    def __init__(self, key_dir: str, kid: str, lifetime_s: int = 300) -> None:
        pem = (Path(key_dir) / f"{kid}.key").read_bytes()
        key = load_pem_private_key(pem, password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise TypeError(f"{kid}.key is not an Ed25519 private key")
        self._key = key
        self._kid = kid
        self._lifetime_s = lifetime_s

    def mint(self, session_id: str) -> str:
        """Return a token for ``session_id``, valid from now for the configured lifetime."""
        now = int(time.time())
        claims = {"sid": session_id, "iat": now, "nbf": now, "exp": now + self._lifetime_s,
                  "aud": "beach-rescue", "iss": "bench", "cohort": "public",
                  "cap": ["fallback-ws"]}
        return jwt.encode(claims, self._key, algorithm="EdDSA", headers={"kid": self._kid})
