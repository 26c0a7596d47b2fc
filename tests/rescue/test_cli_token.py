"""Tests for ``beach-rescue token keygen|mint`` (rescue.cli), run in-process."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import jwt
import pytest

from rescue.cli import main
from rescue.keys import generate_keypair, load_public_keys
from rescue.tokens import CAP_FALLBACK_WS, CAP_TELEMETRY, TokenClaims, TokenVerifier


@pytest.fixture
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in list(os.environ):
        if name.startswith("BEACH_RESCUE_"):
            monkeypatch.delenv(name)
    state = tmp_path / "state"
    monkeypatch.setenv("BEACH_RESCUE_STATE_DIR", str(state))
    return state


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["token", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def verify(token: str, key_dir: Path, session_id: str, *,
           require_capability: bool = True) -> TokenClaims:
    verifier = TokenVerifier(load_public_keys(key_dir), require_capability=require_capability)
    return verifier.verify(token, session_id, time.time())


@pytest.mark.usefixtures("state_dir")
def test_keygen_prints_the_kid_of_the_pair_it_wrote(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "keygen", "--out", str(tmp_path / "k"))
    kid = out.strip()
    assert (code, err) == (0, "")
    assert out == kid + "\n"
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == [f"{kid}.key", f"{kid}.pub"]
    assert stat.S_IMODE((tmp_path / "k" / f"{kid}.key").stat().st_mode) == 0o600


def test_keygen_defaults_to_the_dev_key_directory(
        state_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "keygen")
    assert code == 0
    assert (state_dir / "keys" / f"{out.strip()}.key").is_file()


@pytest.mark.usefixtures("state_dir")
def test_mint_with_a_key_directory_prints_a_token_that_verifies(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    kid = generate_keypair(tmp_path / "k")
    code, out, err = run(capsys, "mint", "--session", "s-1", "--keys", str(tmp_path / "k"),
                         "--ttl", "60", "--cohort", "beta")
    assert (code, err) == (0, "")
    token = out.strip()
    assert out == token + "\n"
    claims = verify(token, tmp_path / "k", "s-1")
    assert (claims.kid, claims.cohort, claims.cap) == (kid, "beta", (CAP_FALLBACK_WS,))
    assert claims.exp - claims.iat == 60
    assert claims.iss == "beach-rescue-cli"
    assert claims.aud == "beach-rescue"


@pytest.mark.usefixtures("state_dir")
def test_mint_with_caps_and_a_chosen_kid(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    first = generate_keypair(tmp_path / "k")
    generate_keypair(tmp_path / "k")
    code, out, _ = run(capsys, "mint", "--session", "s", "--keys", str(tmp_path / "k"),
                       "--kid", first, "--cap", CAP_TELEMETRY, "--cap", "debug")
    assert code == 0
    assert jwt.get_unverified_header(out.strip())["kid"] == first
    claims = verify(out.strip(), tmp_path / "k", "s", require_capability=False)
    assert claims.cap == (CAP_TELEMETRY, "debug")


def test_mint_without_keys_creates_and_reuses_dev_keys(
        state_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tokens = []
    for _ in range(2):
        code, out, err = run(capsys, "mint", "--session", "dev")
        assert (code, err) == (0, "")
        tokens.append(out.strip())
    key_dir = state_dir / "keys"
    assert len(list(key_dir.glob("*.key"))) == 1
    kids = {verify(t, key_dir, "dev").kid for t in tokens}
    assert kids == set(load_public_keys(key_dir))


def test_mint_audience_follows_the_configuration(
        state_dir: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("BEACH_RESCUE_TOKEN_AUDIENCE", "relay-eu")
    code, out, _ = run(capsys, "mint", "--session", "s")
    assert code == 0
    assert jwt.decode(out.strip(), options={"verify_signature": False})["aud"] == "relay-eu"
    assert state_dir.is_dir()


@pytest.mark.usefixtures("state_dir")
@pytest.mark.parametrize(("argv", "message"), [
    (["mint", "--session", "s", "--ttl", "0"], "lifetime"),
    (["mint", "--session", "s", "--ttl", "301"], "lifetime"),
    (["mint", "--session", "bad id"], "invalid session id"),
    (["mint", "--session", "s", "--kid", "nope"], "no private key"),
    (["mint", "--session", "s", "--kid", "../x"], "invalid key id"),
])
def test_mint_errors_exit_2_with_a_message(capsys: pytest.CaptureFixture[str],
                                           argv: list[str], message: str) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    assert err.startswith("beach-rescue: ")
    assert message in err
    assert "Traceback" not in err


@pytest.mark.usefixtures("state_dir")
def test_key_store_errors_exit_2_and_name_the_path(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing"
    code, out, err = run(capsys, "mint", "--session", "s", "--keys", str(missing))
    assert (code, out) == (2, "")
    assert err == f"beach-rescue: key directory {missing} does not exist or is not a directory\n"

    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run(capsys, "keygen", "--out", str(blocker))
    assert code == 2
    assert err.startswith("beach-rescue: ") and str(blocker) in err


def test_console_script_runs_keygen(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("beach-rescue")
    assert script.is_file(), f"console script missing next to {sys.executable}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BEACH_RESCUE_")}
    result = subprocess.run([str(script), "token", "keygen", "--out", str(tmp_path / "k")],
                            capture_output=True, text=True, timeout=60, env=env, check=False)
    assert result.returncode == 0, result.stderr
    kid = result.stdout.strip()
    assert set(load_public_keys(tmp_path / "k")) == {kid}
