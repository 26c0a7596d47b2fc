"""``beach-rescue connect`` as real processes through a real relay: --exec, netcat, wrong PSK.

Each side is ``python -m rescue connect`` run as an asyncio subprocess; tokens are minted by
the test's relay fixture (``--token``) or by the CLI itself from the test key directory
(``--keys``). Every wait is bounded; a process still running at the end is killed.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import pty
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from tests.support.relay import RelayProcess

PSK = b"cli connect integration test psk\n"
WAIT_S = 60.0
Proc = asyncio.subprocess.Process
Spawn = Callable[..., Awaitable[Proc]]


def sid() -> str:
    return f"cli-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def psk_file(tmp_path: Path) -> Path:
    path = tmp_path / "psk"
    path.write_bytes(PSK)
    return path


@pytest.fixture
async def spawn(relay: RelayProcess, psk_file: Path,
                tmp_path: Path) -> AsyncIterator[Spawn]:
    """Start ``connect`` for a role; processes still running at teardown are killed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BEACH_RESCUE_")}
    env["BEACH_RESCUE_STATE_DIR"] = str(tmp_path / "state")
    started: list[Proc] = []

    async def start(session: str, role: str, *extra: str,
                    stdin: int = asyncio.subprocess.PIPE,
                    psk: Path = psk_file, keys: Path | None = None) -> Proc:
        source = ["--keys", str(keys)] if keys is not None else ["--token", relay.mint(session)]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "rescue", "connect", "--url",
            f"ws://127.0.0.1:{relay.port}/ws", "--session", session, "--role", role,
            "--psk-file", str(psk), "--give-up-after", "10", *source, *extra,
            stdin=stdin, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=env)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def run_pair(host: Proc, part: Proc, host_input: bytes | None = None,
                   part_input: bytes | None = None,
                   ) -> tuple[tuple[bytes, bytes], tuple[bytes, bytes]]:
    """Feed both sides, wait for both to exit; ((host out, err), (participant out, err))."""
    async with asyncio.timeout(WAIT_S):
        host_io, part_io = await asyncio.gather(host.communicate(host_input),
                                                part.communicate(part_input))
    return host_io, part_io


@pytest.mark.parametrize(("command", "output", "status"), [
    ("printf 'line1\\nline2\\n'; echo done", b"line1\nline2\ndone\n", 0),
    ("echo partial; exit 7", b"partial\n", 7),
])
async def test_exec_streams_the_commands_output_to_the_participant(
        spawn: Spawn, command: str, output: bytes, status: int) -> None:
    session = sid()
    host = await spawn(session, "host", "--exec", command, stdin=asyncio.subprocess.DEVNULL)
    part = await spawn(session, "participant", stdin=asyncio.subprocess.DEVNULL)
    (host_out, host_err), (part_out, part_err) = await run_pair(host, part)
    assert part_out == output, part_err
    assert (host.returncode, part.returncode) == (status, 0), (host_err, part_err)
    assert host_out == b""  # the command's output goes to the participant only


@pytest.mark.parametrize(("given", "output"), [
    (b"hello from the other machine\n", b"HELLO FROM THE OTHER MACHINE\nend\n"),
    (b"", b"end\n"),  # an input that ends before the handshake still ends the command's
])
async def test_exec_gets_the_participants_input(spawn: Spawn, given: bytes,
                                                output: bytes) -> None:
    """The participant's stdin is the command's stdin; its end of input ends the command."""
    session = sid()
    host = await spawn(session, "host", "--exec", "tr a-z A-Z; echo end",
                       stdin=asyncio.subprocess.DEVNULL)
    part = await spawn(session, "participant")
    (_, host_err), (part_out, part_err) = await run_pair(host, part, part_input=given)
    assert part_out == output, part_err
    assert (host.returncode, part.returncode) == (0, 0), (host_err, part_err)


async def test_a_participant_at_a_terminal_exits_when_the_command_ends(
        spawn: Spawn) -> None:
    """Watching a shell from a terminal: its end ends the watcher, no Ctrl-D needed."""
    session = sid()
    controller, terminal = pty.openpty()
    try:
        host = await spawn(session, "host", "--exec", "echo watched; exit 0",
                           stdin=asyncio.subprocess.DEVNULL)
        part = await spawn(session, "participant", stdin=terminal)
        (_, host_err), (part_out, part_err) = await run_pair(host, part)
    finally:
        os.close(terminal)
        os.close(controller)
    assert part_out == b"watched\n", part_err
    assert (host.returncode, part.returncode) == (0, 0), (host_err, part_err)


async def test_netcat_both_ways_delivers_every_byte(spawn: Spawn) -> None:
    session = sid()
    to_host, to_part = os.urandom(1 << 20), os.urandom(100 << 10)
    host = await spawn(session, "host")
    part = await spawn(session, "participant")
    (host_out, host_err), (part_out, part_err) = await run_pair(
        host, part, host_input=to_part, part_input=to_host)
    assert (host.returncode, part.returncode) == (0, 0), (host_err, part_err)
    assert (len(host_out), len(part_out)) == (len(to_host), len(to_part))
    assert hashlib.sha256(host_out).digest() == hashlib.sha256(to_host).digest()
    assert hashlib.sha256(part_out).digest() == hashlib.sha256(to_part).digest()


async def test_tokens_minted_from_a_key_directory(spawn: Spawn, key_dir: Path) -> None:
    session = sid()
    host = await spawn(session, "host", keys=key_dir)
    part = await spawn(session, "participant", keys=key_dir)
    (host_out, host_err), (part_out, part_err) = await run_pair(
        host, part, host_input=b"from host", part_input=b"from participant")
    assert (host.returncode, part.returncode) == (0, 0), (host_err, part_err)
    assert (host_out, part_out) == (b"from participant", b"from host")


async def read_stderr_until(proc: Proc, needle: bytes) -> bytes:
    """Lines of ``proc``'s stderr up to and including the first that contains ``needle``."""
    assert proc.stderr is not None
    seen = b""
    async with asyncio.timeout(WAIT_S):
        while needle not in seen:
            line = await proc.stderr.readline()
            assert line, f"stderr ended without {needle!r}: {seen!r}"
            seen += line
    return seen


async def test_a_wrong_psk_fails_the_participant_and_the_host_keeps_waiting(
        spawn: Spawn, tmp_path: Path) -> None:
    """The participant exits 3; the host says so on stderr and waits for another
    participant, which (with the right secret) then gets through."""
    session = sid()
    wrong = tmp_path / "wrong-psk"
    wrong.write_bytes(b"not the session's pre-shared secret\n")
    host = await spawn(session, "host")
    intruder = await spawn(session, "participant", stdin=asyncio.subprocess.DEVNULL, psk=wrong)
    async with asyncio.timeout(WAIT_S):
        intruder_out, intruder_err = await intruder.communicate()
    assert intruder.returncode == 3
    assert intruder_out == b""
    assert b"WrongPskError: wrong PSK" in intruder_err, intruder_err

    notice = await read_stderr_until(host, b"refused")
    assert b"wrong PSK" in notice and b"still waiting" in notice, notice
    assert host.returncode is None  # still running

    part = await spawn(session, "participant")
    (host_out, host_err), (part_out, part_err) = await run_pair(
        host, part, host_input=b"for the right one", part_input=b"right secret")
    assert (host.returncode, part.returncode) == (0, 0), (host_err, part_err)
    assert (host_out, part_out) == (b"right secret", b"for the right one")
