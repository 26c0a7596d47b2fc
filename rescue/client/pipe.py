"""``beach-rescue connect``: netcat through the relay, end-to-end encrypted.

Standard input goes to the other peer and the other peer's messages go to standard output,
byte for byte. With ``--exec CMD`` (host side) the command's output is streamed instead and
what participants send becomes its input, so a person can watch a shell's output from
another machine. End of input half-closes the channel; the command exits when the other
side finished too (or, with ``--exec``, when the command ended and its output was
acknowledged). When the other side finished and standard input is a terminal, the command
exits at once (a person watching, as with ssh); a pipe or a file is sent to its end first.

A host refuses a participant whose pre-shared secret differs (that participant exits with
status 3), says so on standard error and keeps waiting for a participant with the right
secret. Pipes and sockets are read and written by the event loop; files, ``/dev/null`` and
terminals through a thread (uvloop cannot watch them)."""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import os
import stat
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import uvloop

from rescue import keys, tokens
from rescue.client.backoff import BackoffPolicy
from rescue.client.channel import Channel, ChannelEvent, ChannelOptions, connect
from rescue.client.e2e import Suite
from rescue.client.errors import ChannelError
from rescue.client.grants import ControlPlaneTokens, StaticToken, TokenSource
from rescue.client.peering import StreamLimits

_CHUNK = 32 << 10
EXIT_FAILED = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``connect`` command's flags."""
    parser.add_argument("--url", help="relay WebSocket URL, e.g. ws://127.0.0.1:9443/ws "
                                      "(default: the control plane's relay_url)")
    parser.add_argument("--session", required=True, help="session id")
    parser.add_argument("--role", required=True, choices=("host", "participant"))
    parser.add_argument("--psk-file", required=True, metavar="PATH",
                        help="the session's pre-shared secret (at least 16 bytes; one "
                             "trailing newline is ignored)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--token", help="relay token (its `sid` must be the session)")
    source.add_argument("--control-plane", metavar="URL",
                        help="fetch tokens from this control plane's /v1/fallback/token")
    source.add_argument("--keys", metavar="DIR",
                        help="mint tokens locally with the private key in DIR (development)")
    parser.add_argument("--service-key", help="bearer service key for --control-plane")
    parser.add_argument("--service-key-file", metavar="PATH",
                        help="file whose first line is the service key")
    parser.add_argument("--peer-id", help="stable peer id (default: random per run)")
    parser.add_argument("--exec", dest="exec_cmd", metavar="CMD",
                        help="host only: run CMD in a shell and stream its output")
    parser.add_argument("--cipher", choices=("aes-256-gcm", "chacha20-poly1305"),
                        default="aes-256-gcm", help="host's cipher suite")
    parser.add_argument("--give-up-after", type=float, default=120.0, metavar="S",
                        help="stop reconnecting after S seconds without a connection")


def read_psk(path: str) -> bytes:
    """The PSK file's bytes with one trailing newline removed; ValueError when too short."""
    data = Path(path).read_bytes()
    if data.endswith(b"\n"):
        data = data[:-1]
    if len(data) < 16:
        raise ValueError(f"{path}: a pre-shared secret needs at least 16 bytes")
    return data


def _token_source(args: argparse.Namespace, audience: str, state_dir: Path) -> TokenSource:
    if args.control_plane:
        key = args.service_key
        if args.service_key_file:
            key = Path(args.service_key_file).read_text().splitlines()[0].strip()
        if not key:
            raise ValueError("--control-plane needs --service-key or --service-key-file")
        return ControlPlaneTokens(args.control_plane, key, args.session)
    if args.token:
        return StaticToken(args.token)
    key_dir = Path(args.keys) if args.keys else keys.ensure_dev_keys(state_dir)
    signing_key = keys.load_signing_key(key_dir, None)
    token = tokens.mint_token(signing_key, session_id=args.session, now=time.time(),
                              ttl_s=300, cohort="public", caps=(tokens.CAP_FALLBACK_WS,),
                              issuer="beach-rescue-connect", audience=audience)
    return StaticToken(token)


def _is_stream(fd: int) -> bool:
    """True for a pipe or a socket: what the event loop can watch (uvloop aborts on files)."""
    mode = os.fstat(fd).st_mode
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def _same_file(fd: int, other: int) -> bool:
    """True when two descriptors are the same pipe or file (e.g. ``2>&1``)."""
    try:
        a, b = os.fstat(fd), os.fstat(other)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


async def _stdin_chunks() -> AsyncIterator[bytes]:
    """Standard input in chunks until its end, without blocking the event loop.

    A pipe or socket is read by the loop; anything else (a file, ``/dev/null``, a
    terminal) by a daemon thread, which an exit never waits for.
    """
    if sys.stdin is None:
        return
    fd = sys.stdin.fileno()
    loop = asyncio.get_running_loop()
    if _is_stream(fd):
        reader = asyncio.StreamReader(limit=_CHUNK * 2)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while chunk := await reader.read(_CHUNK):
            yield chunk
        return
    chunks: asyncio.Queue[bytes] = asyncio.Queue(maxsize=4)

    def read_blocking() -> None:
        while True:
            try:
                chunk = os.read(fd, _CHUNK)
            except OSError:
                chunk = b""
            try:
                asyncio.run_coroutine_threadsafe(chunks.put(chunk), loop).result()
            except (RuntimeError, concurrent.futures.CancelledError):
                return  # the loop is gone
            if not chunk:
                return

    threading.Thread(target=read_blocking, name="stdin", daemon=True).start()
    while chunk := await chunks.get():
        yield chunk


class _Flushed(asyncio.streams.FlowControlMixin):
    """A write-pipe protocol that says when the pipe is closed (everything written)."""

    def __init__(self) -> None:
        super().__init__()
        self.closed = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if not self.closed.done():
            self.closed.set_result(None)


class _Stdout:
    """Standard output for the peer's bytes: a pipe is written with backpressure by the
    loop (a stalled reader stops the channel's reading, not its heartbeats); a file or a
    terminal is written directly."""

    def __init__(self, writer: asyncio.StreamWriter | None, flushed: _Flushed | None) -> None:
        self._writer = writer
        self._flushed = flushed

    @classmethod
    async def open(cls) -> _Stdout:
        """Wrap this process's standard output."""
        out = sys.stdout.buffer
        if not _is_stream(out.fileno()) or _same_file(out.fileno(), sys.stderr.fileno()):
            return cls(None, None)  # non-blocking stdout would make stderr writes fail too
        loop = asyncio.get_running_loop()
        transport, protocol = await loop.connect_write_pipe(_Flushed, out)
        return cls(asyncio.StreamWriter(transport, protocol, None, loop), protocol)

    async def write(self, data: bytes) -> None:
        """Write ``data``; waits while the pipe's reader lags behind."""
        if self._writer is None:
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
            return
        self._writer.write(data)
        await self._writer.drain()

    async def close(self) -> None:
        """Flush what is buffered and close; idempotent."""
        if self._writer is not None and self._flushed is not None:
            self._writer.close()
            await self._flushed.closed


async def _pump_stdin(channel: Channel) -> None:
    async for chunk in _stdin_chunks():
        await channel.send(chunk)
    await channel.wait_ready()  # a finish before the handshake would close nothing
    await channel.finish("end of input")


async def _pump_to(channel: Channel, write: asyncio.StreamWriter | _Stdout) -> None:
    async for data in channel:
        if isinstance(write, _Stdout):
            await write.write(data)
        else:
            write.write(data)
            await write.drain()
    if isinstance(write, _Stdout):
        await write.close()
    else:
        write.close()


async def _run_exec(channel: Channel, command: str) -> int:
    proc = await asyncio.create_subprocess_shell(
        command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    assert proc.stdout is not None and proc.stdin is not None
    feeder = asyncio.get_running_loop().create_task(_pump_to(channel, proc.stdin))
    try:
        while chunk := await proc.stdout.read(_CHUNK):
            await channel.send(chunk)
        status = await proc.wait()
        await channel.finish(f"exit {status}")
        return status
    finally:
        feeder.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await feeder


def _report_refusal(event: ChannelEvent) -> None:
    """Tell the host's user about a participant it refused; the host carries on waiting."""
    if event.name == "peer.refused":
        print(f"beach-rescue: participant {event.fields.get('peer')} refused: "
              f"{event.fields.get('detail') or 'handshake failed'}; still waiting for a "
              "participant with this session's secret", file=sys.stderr, flush=True)


async def run_connect(args: argparse.Namespace, audience: str, state_dir: Path) -> int:
    """Run one ``connect``; returns the exit status (the command's with ``--exec``)."""
    psk = read_psk(args.psk_file)
    options = ChannelOptions(
        peer_id=args.peer_id, limits=StreamLimits(),
        suite=Suite.CHACHA20_POLY1305 if args.cipher == "chacha20-poly1305"
        else Suite.AES_256_GCM,
        backoff=BackoffPolicy(give_up_after_s=args.give_up_after))
    channel = connect(args.url, session_id=args.session, role=args.role, psk=psk,
                      tokens=_token_source(args, audience, state_dir), options=options,
                      on_event=_report_refusal)
    async with channel:
        if args.exec_cmd:
            return await _run_exec(channel, args.exec_cmd)
        sender = asyncio.get_running_loop().create_task(_pump_stdin(channel))
        try:
            await _pump_to(channel, await _Stdout.open())
            if sys.stdin is not None and sys.stdin.isatty():
                sender.cancel()  # a person at a terminal: the other side ended, so do we
            await asyncio.wait([sender])
            if not sender.cancelled():
                sender.result()  # its failure, if it failed
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
    return 0


def main(args: argparse.Namespace, audience: str, state_dir: Path) -> int:
    """Entry point from ``rescue.cli``: errors become a message and exit status 3 (2 for usage)."""
    if args.exec_cmd and args.role != "host":
        print("beach-rescue: --exec is for the host side", file=sys.stderr)
        return 2
    try:
        return uvloop.run(run_connect(args, audience, state_dir))
    except (ValueError, OSError) as e:
        print(f"beach-rescue: {e}", file=sys.stderr)
        return 2
    except ChannelError as e:
        print(f"beach-rescue: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
