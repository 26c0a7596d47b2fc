"""``beach-rescue serve`` as an operator meets it: refusals at start, development keys, health.

Each test runs the installed ``beach-rescue`` entry point in a subprocess with a clean
``BEACH_RESCUE_*`` environment and its own state directory.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from rescue.keys import SigningKey
from tests.support.client import join
from tests.support.probes import assert_refusal, unique_session, upgrade_get
from tests.support.relay import RelayProcess

CLI = str(Path(sys.executable).with_name("beach-rescue"))
REFUSAL_TIMEOUT_S = 20.0


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


def cli_env(state_dir: Path, **settings: str) -> dict[str, str]:
    """The test process's environment without BEACH_RESCUE_*, plus ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BEACH_RESCUE_")}
    env["BEACH_RESCUE_STATE_DIR"] = str(state_dir)
    env.update(settings)
    return env


def run_cli(state_dir: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``beach-rescue args`` to completion (a serve that does not refuse times out)."""
    return subprocess.run([CLI, *args], env=cli_env(state_dir, **env), capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=REFUSAL_TIMEOUT_S,
                          check=False)


def serve_args(*extra: str) -> list[str]:
    return ["serve", "--host", "127.0.0.1", "--port", "0", "--workers", "1", *extra]


def assert_refused_at_start(result: subprocess.CompletedProcess[str], status: int,
                            *needles: str) -> None:
    """Assert the exit ``status`` and one short message on stderr naming every needle."""
    assert result.returncode == status, (result.returncode, result.stderr)
    assert result.stdout == ""
    assert "Traceback" not in result.stderr, result.stderr
    message = result.stderr.strip().splitlines()
    assert message and message[-1].startswith("beach-rescue: "), result.stderr
    for needle in needles:
        assert needle in message[-1], (needle, result.stderr)


# --- configuration refused at start ----------------------------------------------------------


def test_a_port_out_of_range_is_refused(state_dir: Path, key_dir: Path) -> None:
    result = run_cli(state_dir, *serve_args("--token-keys", str(key_dir), "--port", "70000"))
    assert_refused_at_start(result, 2, "`port`", "--port")


def test_zero_participants_from_the_environment_is_refused(state_dir: Path,
                                                           key_dir: Path) -> None:
    result = run_cli(state_dir, *serve_args("--token-keys", str(key_dir)),
                     BEACH_RESCUE_MAX_PARTICIPANTS="0")
    assert_refused_at_start(result, 2, "`max_participants`", "BEACH_RESCUE_MAX_PARTICIPANTS")


def test_a_non_numeric_setting_is_refused(state_dir: Path, key_dir: Path) -> None:
    result = run_cli(state_dir, *serve_args("--token-keys", str(key_dir)),
                     BEACH_RESCUE_HANDSHAKE_TIMEOUT_S="soon")
    assert_refused_at_start(result, 2, "`handshake_timeout_s`")


@pytest.mark.parametrize("via", ["flag", "env"])
def test_an_unknown_key_in_the_config_file_is_refused(state_dir: Path, key_dir: Path,
                                                      tmp_path: Path, via: str) -> None:
    config = tmp_path / "relay.toml"
    config.write_text("max_participants = 4\nmax_participant = 3\n")
    if via == "flag":
        result = run_cli(state_dir, *serve_args("--token-keys", str(key_dir),
                                                "--config", str(config)))
    else:
        result = run_cli(state_dir, *serve_args("--token-keys", str(key_dir)),
                         BEACH_RESCUE_CONFIG=str(config))
    assert_refused_at_start(result, 2, "`max_participant`", str(config))


def test_an_invalid_value_in_the_config_file_names_the_file(state_dir: Path, key_dir: Path,
                                                            tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text('max_participants = 0\n')
    result = run_cli(state_dir, *serve_args("--token-keys", str(key_dir),
                                            "--config", str(config)))
    assert_refused_at_start(result, 2, "`max_participants`", str(config))


def test_an_invalid_worker_count_is_refused(state_dir: Path, key_dir: Path) -> None:
    result = run_cli(state_dir, "serve", "--host", "127.0.0.1", "--port", "0",
                     "--token-keys", str(key_dir), "--workers", "-1")
    assert_refused_at_start(result, 2, "`workers`")


def test_a_second_relay_on_the_same_state_directory_is_refused(
        state_dir: Path, key_dir: Path, signing_key: SigningKey) -> None:
    env = cli_env(state_dir)
    first = subprocess.Popen([CLI, *serve_args("--token-keys", str(key_dir))], env=env,
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    relay = RelayProcess(first, signing_key, {})  # waits until it serves
    try:
        result = run_cli(state_dir, *serve_args("--token-keys", str(key_dir)))
        assert_refused_at_start(result, 2, f"pid {first.pid}", "--state-dir")
        assert first.poll() is None  # the first one is untouched
    finally:
        relay.stop()


def test_a_missing_key_directory_is_refused(state_dir: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-keys"
    result = run_cli(state_dir, *serve_args("--token-keys", str(missing)))
    assert_refused_at_start(result, 1, str(missing), "does not exist")
    assert not missing.exists()  # serve never creates a configured key directory


def test_a_key_directory_without_public_keys_is_refused(state_dir: Path,
                                                        tmp_path: Path) -> None:
    empty = tmp_path / "empty-keys"
    empty.mkdir()
    result = run_cli(state_dir, *serve_args("--token-keys", str(empty)))
    assert_refused_at_start(result, 1, str(empty), "no public key")


# --- development keys ----------------------------------------------------------------------


def start_dev_relay(state_dir: Path, signing_key: SigningKey) -> RelayProcess:
    """Start ``serve`` without ``--token-keys``; wait until it listens.

    ``signing_key`` only serves :meth:`RelayProcess.mint`; this relay does not trust it.
    """
    proc = subprocess.Popen([CLI, *serve_args()], env=cli_env(state_dir),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        return RelayProcess(proc, signing_key, {})
    except BaseException:
        proc.kill()
        proc.wait(5)
        raise


@pytest.fixture
def dev_relay(state_dir: Path, signing_key: SigningKey) -> Iterator[RelayProcess]:
    relay = start_dev_relay(state_dir, signing_key)
    yield relay
    relay.stop()


async def test_serve_without_token_keys_uses_development_keys(
        dev_relay: RelayProcess, state_dir: Path, http: aiohttp.ClientSession) -> None:
    keys = sorted(p.suffix for p in (state_dir / "keys").iterdir())
    assert keys == [".key", ".pub"]
    session_id = unique_session("dev")
    minted = run_cli(state_dir, "token", "mint", "--session", session_id)
    assert minted.returncode == 0, minted.stderr
    token = minted.stdout.strip()

    host = await join(http, dev_relay, session_id, "host", "h", token=token)
    part = await join(http, dev_relay, session_id, "participant", "p", token=token)
    await part.send_frame(b"dev keys work")
    assert (await host.recv_frame()).payload == b"dev keys work"
    await part.close()
    await host.close()

    # A token from any other key is refused: the relay trusts the state dir's key only.
    stranger = dev_relay.mint(session_id)
    assert_refusal(await upgrade_get(http, dev_relay.ws_url(session_id, stranger)),
                   401, "token_invalid")
    assert dev_relay.stop() == 0


async def test_healthz_answers_json(dev_relay: RelayProcess,
                                   http: aiohttp.ClientSession) -> None:
    async with http.get(dev_relay.http_url("/healthz")) as resp:
        assert (resp.status, resp.content_type) == (200, "application/json")
        body = await resp.json()
    assert body["status"] == "ok"
    assert body["connections"] == 0
    assert isinstance(body["version"], str) and body["version"]


async def test_a_restart_keeps_the_development_keys(dev_relay: RelayProcess, state_dir: Path,
                                                    signing_key: SigningKey,
                                                    http: aiohttp.ClientSession) -> None:
    session_id = unique_session("restart")
    token = run_cli(state_dir, "token", "mint", "--session", session_id).stdout.strip()
    before = sorted(p.name for p in (state_dir / "keys").iterdir())
    assert dev_relay.stop() == 0
    again = start_dev_relay(state_dir, signing_key)
    try:
        assert sorted(p.name for p in (state_dir / "keys").iterdir()) == before
        host = await join(http, again, session_id, "host", "h", token=token)
        await host.close()
    finally:
        assert again.stop() == 0
