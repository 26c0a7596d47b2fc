"""Where a relay's memory per idle connection goes: RSS per connection and, with ``--trace``,
Python allocations per connection by allocation site (tracemalloc).

``python benches/memory_profile.py [--relay rescue|naive] [--connections 2000] [--runs 3]
[--trace FRAMES] [--top 40] [--data BYTES] [--json PATH]``

Each run starts the relay in a child process: ``rescue`` is the real worker
(:func:`rescue.server.worker.run_worker`, on sockets made the way the supervisor makes them,
one worker, tokens required), ``naive`` is :mod:`naive_relay`. A second child holds the
clients (picows): one warm-up session opened and closed, then the baseline is taken, then
N connections (N/2 sessions, host + participant, hello done, one heartbeat echoed each; with
``--data`` the host also sends one data frame of that size to its participant), a settle
pause, and the held state is taken. Reported per connection: RSS growth and, with
``--trace``, the growth of traced Python memory grouped by the innermost frame of each
allocation (the sites table; tracemalloc itself makes RSS meaningless in traced runs).

Before every tracemalloc snapshot the relay runs a full collection, so unreachable cycles are
not counted. A site is where memory was allocated, which is not always who keeps it: a
block recycled through a free list (dict key tables) keeps its first allocation's site.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import gc
import json
import linecache
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

BENCHES = Path(__file__).resolve().parent
ROOT = BENCHES.parent
HEARTBEAT = bytes([1, 2, 0, 8, 0, 0, 0, 0])


# --- the relay child ----------------------------------------------------------------------
def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _say(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def _obey_parent() -> None:
    """Answer ``rss`` and ``snap PATH`` lines on stdin until EOF or ``quit``."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        words = (await reader.readline()).decode().split()
        if not words or words[0] == "quit":
            return
        if words[0] == "snap":
            gc.collect()
            if tracemalloc.is_tracing():
                tracemalloc.take_snapshot().dump(words[1])
            traced = tracemalloc.get_traced_memory()[0] if tracemalloc.is_tracing() else 0
            _say({"rss": _rss(), "traced": traced})
        else:
            _say({"rss": _rss()})


async def _serve_rescue(key_dir: str, state_dir: str) -> None:
    from rescue import control
    from rescue.config import Config
    from rescue.logs import configure_logging
    from rescue.server.app import quiet_aiohttp_server_errors
    from rescue.server.worker import WorkerSockets, run_worker
    from supervisor.sockets import bind_listener

    config = Config(host="127.0.0.1", port=0, workers=1, token_keys=key_dir,
                    state_dir=state_dir, log_level="warning")
    configure_logging(config.log_level)
    quiet_aiohttp_server_errors()
    listener = bind_listener("127.0.0.1", 0)
    inbox_read, inbox_write = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    inbox_read.setblocking(False)
    inbox_write.setblocking(False)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    loop = asyncio.get_running_loop()
    worker = loop.create_task(run_worker(config, WorkerSockets(
        slot=0, slot_ids=(0,), listener=listener, inbox=inbox_read,
        outboxes={0: inbox_write}, control=theirs)))
    while not isinstance(control.decode(await loop.sock_recv(ours, 65536)), control.Ready):
        pass
    ours.send(control.encode(control.Serve()))

    async def swallow_beats() -> None:
        while await loop.sock_recv(ours, 65536):
            pass

    beats = loop.create_task(swallow_beats())
    _say({"port": listener.getsockname()[1], "rss": _rss()})
    await _obey_parent()
    ours.send(control.encode(control.Stop()))
    await asyncio.wait({worker}, timeout=10)
    beats.cancel()


async def _serve_naive() -> None:
    import naive_relay

    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    server = asyncio.get_running_loop().create_task(naive_relay.serve("127.0.0.1", port, 3600))
    await asyncio.sleep(0.5)
    _say({"port": port, "rss": _rss()})
    await _obey_parent()
    server.cancel()


# --- the clients child --------------------------------------------------------------------
async def _hold_clients(url: str, key_dir: str, kid: str) -> None:
    """Open (``open N PREFIX DATA``) and close (``close``) idle pairs as the parent says."""
    from bench_tokens import TokenMinter
    from picows import WSCloseCode, WSListener, WSMsgType, ws_connect

    class Client(WSListener):
        def __init__(self, session_id: str, role: str) -> None:
            loop = asyncio.get_running_loop()
            self.session_id, self.role, self.binaries = session_id, role, 0
            self.hello, self.echo, self.data = (loop.create_future() for _ in range(3))
            self.transport: Any = None

        def on_ws_connected(self, transport: Any) -> None:
            self.transport = transport
            transport.send(WSMsgType.TEXT, json.dumps({
                "type": "client_hello", "session_id": self.session_id, "role": self.role,
                "protocol_version": 1, "compression": ["none"],
                "client_nonce": base64.b64encode(os.urandom(16)).decode(),
                "peer_id": os.urandom(8).hex()}).encode())

        def on_ws_frame(self, transport: Any, frame: Any) -> None:
            kind = frame.msg_type
            if kind is WSMsgType.TEXT:
                if json.loads(frame.get_payload_as_bytes()).get("type") == "server_hello":
                    _settle(self.hello)
            elif kind is WSMsgType.BINARY:
                self.binaries += 1
                _settle(self.echo if self.binaries == 1 else self.data)
            elif kind is WSMsgType.PING:
                transport.send_pong(frame.get_payload_as_bytes())
            elif kind is WSMsgType.CLOSE:
                transport.send_close(WSCloseCode.OK)
                transport.disconnect()

    minter = TokenMinter(key_dir, kid) if key_dir else None
    clients: list[Client] = []

    async def connect(session_id: str, token: str, role: str) -> Client:
        query = f"?session={session_id}" + (f"&token={token}" if token else "")
        _, client = await ws_connect(lambda: Client(session_id, role), url + query,
                                     enable_auto_ping=False, websocket_handshake_timeout=20)
        await asyncio.wait_for(client.hello, 20)
        client.transport.send(WSMsgType.BINARY,
                              HEARTBEAT + time.monotonic_ns().to_bytes(8, "big"))
        await asyncio.wait_for(client.echo, 20)
        return client

    async def open_pair(session_id: str, data_bytes: int, gate: asyncio.Semaphore) -> None:
        token = minter.mint(session_id) if minter else ""
        async with gate:
            host = await connect(session_id, token, "host")
            participant = await connect(session_id, token, "participant")
            clients.extend((host, participant))
            if data_bytes:
                header = bytes([1, 1]) + data_bytes.to_bytes(2, "big") + bytes(4)
                host.transport.send(WSMsgType.BINARY, header + bytes(data_bytes))
                await asyncio.wait_for(participant.data, 20)

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        words = (await reader.readline()).decode().split()
        if not words or words[0] == "quit":
            return
        if words[0] == "open":
            count, prefix, data_bytes = int(words[1]), words[2], int(words[3])
            gate = asyncio.Semaphore(32)
            started = time.monotonic()
            await asyncio.gather(*(open_pair(f"{prefix}-{i}", data_bytes, gate)
                                   for i in range(count // 2)))
            _say({"open": len(clients), "seconds": round(time.monotonic() - started, 2)})
        elif words[0] == "close":
            for client in clients:
                client.transport.send_close(WSCloseCode.OK)
            await asyncio.sleep(1.0)
            for client in clients:
                client.transport.disconnect()
            clients.clear()
            await asyncio.sleep(0.5)
            _say({"closed": True})


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _child_main(role: str, args: list[str]) -> None:
    import uvloop

    sys.path[:0] = [str(ROOT), str(BENCHES)]
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if role == "_relay" and args[0] == "rescue":
        uvloop.run(_serve_rescue(args[1], args[2]))
    elif role == "_relay":
        uvloop.run(_serve_naive())
    else:
        uvloop.run(_hold_clients(*args))


# --- the parent ---------------------------------------------------------------------------
def _ask(proc: subprocess.Popen[str], line: str) -> dict[str, Any]:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(line + "\n")
    proc.stdin.flush()
    answer = proc.stdout.readline()
    if not answer:
        raise RuntimeError(f"no answer to {line.split(maxsplit=1)[0]!r} (see its log)")
    result: dict[str, Any] = json.loads(answer)
    return result


def _child(role: str, args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[str]:
    with open(log, "w") as err:
        return subprocess.Popen([sys.executable, __file__, role, *args], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=err, text=True, env=env,
                                cwd=ROOT)


def one_run(args: argparse.Namespace, work: Path, key_dir: str, kid: str,
            label: str) -> dict[str, Any]:
    """Measure one relay once; with ``--trace`` the two snapshots go to ``work``."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONTRACEMALLOC"}
    relay_env = dict(env, PYTHONTRACEMALLOC=str(args.trace)) if args.trace else env
    relay_args = ([args.relay, key_dir, str(work / "state")] if args.relay == "rescue"
                  else [args.relay])
    relay = _child("_relay", relay_args, relay_env, work / f"{label}-relay.log")
    clients = None
    try:
        assert relay.stdout is not None
        ready = json.loads(relay.stdout.readline() or "{}")
        if "port" not in ready:
            raise RuntimeError(f"the relay did not start; see {work}/{label}-relay.log")
        url = f"ws://127.0.0.1:{ready['port']}/ws"
        tokens = [key_dir, kid] if args.relay == "rescue" else ["", ""]
        clients = _child("_clients", [url, *tokens], env, work / f"{label}-clients.log")
        prefix = f"{label}{time.time_ns()}"
        _ask(clients, f"open 2 {prefix}w 0")
        _ask(clients, "close")
        time.sleep(1.0)
        before = _ask(relay, f"snap {work}/{label}-base.snap")
        opened = _ask(clients, f"open {args.connections} {prefix} {args.data}")
        time.sleep(args.settle)
        held = _ask(relay, f"snap {work}/{label}-held.snap")
        count = opened["open"]
        result = {"relay": args.relay, "connections": count, "open_s": opened["seconds"],
                  "rss_before_mib": round(before["rss"] / 2**20, 2),
                  "rss_per_conn_kib": round((held["rss"] - before["rss"]) / count / 1024, 3)}
        if args.trace:
            result["traced_per_conn_b"] = round((held["traced"] - before["traced"]) / count)
        _ask(clients, "close")
        return result
    finally:
        for proc in (clients, relay):
            if proc is not None and proc.stdin is not None:
                try:
                    proc.stdin.write("quit\n")
                    proc.stdin.flush()
                except (BrokenPipeError, ValueError):
                    pass
        for proc in (clients, relay):
            if proc is not None:
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()


def sites(work: Path, label: str, connections: int, top: int) -> list[dict[str, Any]]:
    """Traced growth per connection by innermost frame, largest first."""
    def by_site(path: Path) -> dict[tuple[str, int], list[int]]:
        totals: dict[tuple[str, int], list[int]] = collections.defaultdict(lambda: [0, 0])
        for trace in tracemalloc.Snapshot.load(str(path)).traces:
            frame = trace.traceback[-1] if len(trace.traceback) else None
            key = (frame.filename, frame.lineno) if frame else ("<no Python frame>", 0)
            totals[key][0] += trace.size
            totals[key][1] += 1
        return totals

    base = by_site(work / f"{label}-base.snap")
    held = by_site(work / f"{label}-held.snap")
    rows = []
    for key in set(base) | set(held):
        size = held.get(key, [0, 0])[0] - base.get(key, [0, 0])[0]
        blocks = held.get(key, [0, 0])[1] - base.get(key, [0, 0])[1]
        rows.append({"site": f"{_short(key[0])}:{key[1]}",
                     "code": linecache.getline(key[0], key[1]).strip()[:60],
                     "bytes": round(size / connections), "blocks": round(blocks / connections, 2)})
    rows.sort(key=lambda row: -row["bytes"])
    return rows[:top]


def _short(filename: str) -> str:
    for marker in ("site-packages/", "lib/python3.11/", f"{ROOT}/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


def main() -> int:
    """Run the measurements and print RSS per connection (and the sites table)."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--relay", choices=("rescue", "naive"), default="rescue")
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--trace", type=int, default=0,
                        help="tracemalloc frames to keep (0: RSS only); one traced run")
    parser.add_argument("--top", type=int, default=40, help="sites to print")
    parser.add_argument("--data", type=int, default=0,
                        help="bytes of one data frame each host sends before going idle")
    parser.add_argument("--settle", type=float, default=3.0)
    parser.add_argument("--json", default="", help="also write the results to this file")
    args = parser.parse_args()
    from bench_tokens import generate_keys

    with tempfile.TemporaryDirectory(prefix="memory-profile-") as tmp:
        work = Path(tmp)
        (work / "state").mkdir()
        kid = generate_keys(work / "keys")
        runs = 1 if args.trace else args.runs
        results = [one_run(args, work, str(work / "keys"), kid, f"run{i}") for i in range(runs)]
        out: dict[str, Any] = {"args": vars(args), "runs": results}
        for result in results:
            print(json.dumps(result))
        if not args.trace:
            out["rss_per_conn_kib_median"] = statistics.median(
                r["rss_per_conn_kib"] for r in results)
            print(f"RSS per connection, median of {runs}: {out['rss_per_conn_kib_median']} KiB")
        else:
            out["sites"] = sites(work, "run0", results[0]["connections"], args.top)
            print(f"{'B/conn':>7} {'blk':>6}  site")
            for row in out["sites"]:
                print(f"{row['bytes']:7d} {row['blocks']:6.2f}  {row['site']}  {row['code']}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("_relay", "_clients"):
        _child_main(sys.argv[1], sys.argv[2:])
    else:
        sys.path.insert(0, str(BENCHES))
        sys.exit(main())
