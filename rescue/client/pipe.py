"""``beach-rescue connect``: netcat through the relay, end-to-end encrypted.

Standard input goes to the other peer and the other peer's messages go to standard output,
byte for byte. With ``--exec CMD`` (host side) the command's output is streamed instead and
what participants send becomes its input, so a person can watch a shell's output from
another machine. End of input half-closes the channel; the command exits when the other
side finished too (or, with ``--exec``, when the command ended and its output was
acknowledged).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from pathlib import Path

import uvloop

from rescue import keys, tokens
from rescue.client.backoff import BackoffPolicy
from rescue.client.channel import Channel, ChannelOptions, connect
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


async def _pump_stdin(channel: Channel) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=_CHUNK * 2)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while chunk := await reader.read(_CHUNK):
        await channel.send(chunk)
    await channel.finish("end of input")


async def _pump_to(channel: Channel, write: asyncio.StreamWriter | None) -> None:
    out = sys.stdout.buffer
    async for data in channel:
        if write is not None:
            write.write(data)
            await write.drain()
        else:
            out.write(data)
            out.flush()
    if write is not None:
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


async def run_connect(args: argparse.Namespace, audience: str, state_dir: Path) -> int:
    """Run one ``connect``; returns the exit status (the command's with ``--exec``)."""
    psk = read_psk(args.psk_file)
    options = ChannelOptions(
        peer_id=args.peer_id, limits=StreamLimits(),
        suite=Suite.CHACHA20_POLY1305 if args.cipher == "chacha20-poly1305"
        else Suite.AES_256_GCM,
        backoff=BackoffPolicy(give_up_after_s=args.give_up_after))
    channel = connect(args.url, session_id=args.session, role=args.role, psk=psk,
                      tokens=_token_source(args, audience, state_dir), options=options)
    async with channel:
        if args.exec_cmd:
            return await _run_exec(channel, args.exec_cmd)
        sender = asyncio.get_running_loop().create_task(_pump_stdin(channel))
        try:
            await _pump_to(channel, None)
            await sender
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
