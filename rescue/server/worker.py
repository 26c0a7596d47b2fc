"""A relay worker process: runs after fork, on sockets the supervisor made.

The supervisor gives each worker its slot's listening socket, the hand-off inboxes, and
a control channel. The worker sets up aiohttp and its intake, reports :class:`Ready`,
starts intake on :class:`Serve`, beats every second from its event loop (so a stuck
loop is noticed), and on :class:`Drain` stops intake and moves its peers away at the
pace of :class:`~rescue.drain.Drainer` before it exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import setproctitle
import uvloop
from aiohttp import web

from rescue import control, metrics, tracing
from rescue.cluster.registration import Registration, registration_for
from rescue.cluster.titles import worker_title
from rescue.codes import CloseCode
from rescue.config import Config
from rescue.controlplane import service as controlplane
from rescue.controlplane.api import PauseCache
from rescue.controlplane.store import Pause, read_pause
from rescue.drain import Drainer, Phase
from rescue.hello import encode_draining
from rescue.logs import configure_logging, log_event
from rescue.ring import Ring
from rescue.server.acceptor import Acceptor
from rescue.server.admin import admin_app
from rescue.server.app import (
    HeaderDeadline,
    build_app,
    load_verifier,
    quiet_aiohttp_server_errors,
)
from rescue.server.export import WorkerExport
from rescue.server.relay import Relay
from rescue.server.sweeper import run_sweeper

log = logging.getLogger("rescue.worker")

BEAT_INTERVAL_S = 1.0
DRAIN_TICK_S = 0.05
CANCEL_RETRY_S = 1.0  # at exit, how long a cancelled background task gets before another cancel


@dataclass
class WorkerSockets:
    """Everything a worker inherits from the supervisor."""

    slot: int
    slot_ids: tuple[int, ...]
    listener: socket.socket
    inbox: socket.socket | None
    outboxes: dict[int, socket.socket]
    control: socket.socket
    admin: socket.socket | None = None
    inherited: list[socket.socket] = field(default_factory=list)


class ControlChannel:
    """The worker's end of its control socketpair, read by the event loop."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.messages: asyncio.Queue[control.Message | None] = asyncio.Queue()
        sock.setblocking(False)
        asyncio.get_running_loop().add_reader(sock.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        while True:
            try:
                packet = self.sock.recv(control.MAX_PACKET)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                packet = b""
            if not packet:  # the supervisor is gone
                asyncio.get_running_loop().remove_reader(self.sock.fileno())
                self.messages.put_nowait(None)
                return
            try:
                self.messages.put_nowait(control.decode(packet))
            except msgspec.DecodeError:
                log_event(log, "control.bad_packet", level=logging.ERROR)

    def send(self, message: control.Message) -> None:
        """Send one message; a full or closed channel is logged, never raised."""
        try:
            self.sock.send(control.encode(message), socket.MSG_DONTWAIT)
        except OSError as e:
            log_event(log, "control.send_failed", level=logging.WARNING, error=str(e))


async def drain_peers(relay: Relay, drainer: Drainer) -> bool:
    """Tell peers to reconnect at the drainer's pace; True if all left by the deadline."""
    loop = asyncio.get_running_loop()
    relay.draining = True
    drainer.start(loop.time(), len(relay.peers))
    log_event(log, "drain.started", peers=len(relay.peers), window_s=drainer.window_s)
    while True:
        step = drainer.step(loop.time(), relay.connections, len(relay.peers))
        # Sessions together: both sides of a session reconnect at about the same time.
        for peer in sorted(relay.peers, key=lambda p: p.session.session_id)[:step.notify]:
            peer.write_text(encode_draining(drainer.reconnect_after_ms()))
            relay.stats.drain_notified += 1
            peer.close(CloseCode.SERVER_SHUTDOWN, "draining")
        if step.finished:
            break
        await asyncio.sleep(DRAIN_TICK_S)
    completed = step.phase is Phase.DRAINED
    metrics.DRAINS.labels("drained" if completed else "deadline").inc()
    log_event(log, "drain.completed" if completed else "drain.deadline",
              level=logging.INFO if completed else logging.WARNING, left=relay.connections)
    return completed


async def watch_pause(relay: Relay, cache: PauseCache | None, interval_s: float) -> None:
    """Keep ``relay.pause`` current: from the store, or from slot 0 via the supervisor."""
    while True:
        if cache is not None:
            relay.set_pause(await cache.get())
        else:
            home = next((w for w in relay.cluster if w.get("slot") == 0
                         and w.get("state") == "serving"), None)
            if home is not None and home.get("pause") in Pause._value2member_map_:
                relay.set_pause(Pause(home["pause"]))
            else:
                relay.set_pause(relay.pause)  # keep the last known state
        await asyncio.sleep(interval_s)


def _watch_gc_pauses(threshold_s: float = 0.05) -> None:
    """Log full garbage collections that stall the event loop longer than ``threshold_s``."""
    started = 0.0

    def callback(phase: str, info: dict[str, int]) -> None:
        nonlocal started
        if info.get("generation") != 2:
            return
        if phase == "start":
            started = time.perf_counter()
        elif (took := time.perf_counter() - started) > threshold_s:
            log_event(log, "gc.pause", level=logging.WARNING, seconds=round(took, 3),
                      collected=info.get("collected", 0))

    gc.callbacks.append(callback)


async def _leave_and_drain(relay: Relay, acceptor: Acceptor, channel: ControlChannel,
                           config: Config, message: control.Drain | None, *, leaving: bool,
                           registration: Registration | None) -> bool:
    """Drain this worker; when the node is ``leaving`` (a stop, not a reload) first say so.

    Leaving: ``/readyz`` answers 503 and new upgrades 503 ``draining`` at once, the
    registry record turns ``draining`` (awaited, so no peer is told to move before the
    registry says where not to go), and intake stays open for ``drain_notice_s`` so the
    balancer's checks see the 503 and stop routing here. Then intake stops and the peers
    are told to reconnect at the drainer's pace; the notice counts against the deadline.
    """
    window = message.window_s if message else config.drain_window_s
    deadline_s = message.deadline_s if message else config.drain_timeout_s
    window = min(window, deadline_s)
    notice_s = min(config.drain_notice_s, deadline_s - window) if leaving else 0.0
    if leaving:
        relay.draining = True
        if registration is not None:
            await registration.leave()
        if notice_s > 0:
            log_event(log, "drain.notice", notice_s=notice_s)
            await asyncio.sleep(notice_s)
    acceptor.stop()
    channel.send(control.IntakeStopped())
    return await drain_peers(relay, Drainer(
        window_s=window, deadline_s=deadline_s - notice_s,
        spread_ms=config.drain_reconnect_spread_ms))


async def _obey(channel: ControlChannel, acceptor: Acceptor, relay: Relay,
                config: Config, *, registration: Registration | None = None) -> None:
    """Follow the supervisor's orders until the worker must exit.

    A drain runs as a task so that a Stop (a second TERM, or INT) still gets through.
    """
    draining: asyncio.Task[bool] | None = None
    while True:
        get = asyncio.ensure_future(channel.messages.get())
        waiting: set[asyncio.Future[Any]] = {get} if draining is None else {get, draining}
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if draining is not None and draining.done():
            get.cancel()
            return
        message = get.result()
        if isinstance(message, control.Serve) and draining is None:
            acceptor.start()
            log_event(log, "worker.serving", slot=acceptor.slot)
        elif isinstance(message, control.Cluster):
            relay.cluster = message.workers
        elif (isinstance(message, control.Drain) or message is None) and draining is None:
            # A reload leaves the node in the cluster (its new generation serves); a stop,
            # or a supervisor gone, takes it out.
            leaving = message is None or message.final
            if not leaving:
                acceptor.stop()  # at once: the new generation takes the listeners over
            draining = asyncio.get_running_loop().create_task(_leave_and_drain(
                relay, acceptor, channel, config, message, leaving=leaving,
                registration=registration))
        elif isinstance(message, control.Stop):
            if draining is not None:
                draining.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await draining
            acceptor.stop()
            relay.draining = True
            relay.abort_handshakes()
            for peer in list(relay.peers):
                peer.close(CloseCode.GOING_AWAY, "closed")
            return


def _serve_socket(relay: Relay, deadline: HeaderDeadline, factory: Callable[[], Any],
                  timeout_s: float) -> Callable[[socket.socket, float], None]:
    loop = asyncio.get_running_loop()

    async def adopt(conn: socket.socket, accepted_at: float) -> None:
        remaining = timeout_s - (time.monotonic() - accepted_at)
        try:
            await loop.connect_accepted_socket(
                lambda: deadline.protocol(factory, remaining), sock=conn)
        except OSError:
            conn.close()

    def serve(conn: socket.socket, accepted_at: float) -> None:
        relay.spawn(adopt(conn, accepted_at))

    return serve


async def _cancel_until_done(*tasks: asyncio.Task[Any]) -> None:
    """Cancel ``tasks`` and wait until they are done, cancelling again any that went on.

    A cancel can be lost inside a library (the kill-switch poll has been seen to go on
    after one while Redis was unreachable, inside redis-py's reconnect): a plain cancel
    and await would then keep the worker from ever exiting.
    """
    pending = {t for t in tasks if not t.done()}
    while pending:
        for task in pending:
            task.cancel()
        _done, pending = await asyncio.wait(pending, timeout=CANCEL_RETRY_S)
    for task in tasks:
        if not task.cancelled():
            task.result()  # a task that had failed raises its error, as awaiting it would


async def run_worker(config: Config, sockets: WorkerSockets, generation: int = 1) -> int:
    """Serve as the worker of ``sockets.slot`` until drained or stopped; return exit status."""
    loop = asyncio.get_running_loop()
    channel = ControlChannel(sockets.control)
    ring = Ring(sockets.slot_ids)
    slot = sockets.slot
    relay = Relay(config, load_verifier(config), owns=lambda sid: ring.owner(sid) == slot)
    relay.worker_slot = slot
    deadline = HeaderDeadline(config.handshake_timeout_s, relay)
    # Without Redis the control plane's state lives in slot 0's memory, so slot 0 serves
    # /v1 and the other workers learn the kill switch from the supervisor's broadcasts.
    memory_mode = not config.redis_url
    control_slot = 0 if memory_mode else None
    store = controlplane.make_store(config) if (config.redis_url or slot == 0) else None
    api = (controlplane.build(config, store, sockets.listener.getsockname()[1])
           if config.control_plane and store is not None else None)
    app = build_app(relay, deadline.request_started, api,
                    control_elsewhere=config.control_plane and api is None)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, keepalive_timeout=15,
                           shutdown_timeout=config.close_timeout_s)
    await runner.setup()
    assert runner.server is not None
    acceptor = Acceptor(slot=slot, ring=ring, listener=sockets.listener, inbox=sockets.inbox,
                        outboxes=sockets.outboxes,
                        serve=_serve_socket(relay, deadline, runner.server,
                                            config.handshake_timeout_s),
                        peek_timeout_s=config.handshake_timeout_s,
                        hold_s=config.handoff_hold_s, control_slot=control_slot,
                        proxy_protocol=config.proxy_protocol)
    relay.intake = acceptor.stats
    admin_runner = None
    if sockets.admin is not None:
        admin_runner = web.AppRunner(admin_app(relay), access_log=None, handle_signals=False)
        await admin_runner.setup()
        assert admin_runner.server is not None
        await loop.create_server(admin_runner.server, sock=sockets.admin)
    sweeper = loop.create_task(run_sweeper(relay))
    if not config.redis_url:  # the saved switch, until slot 0's state comes round
        relay.set_pause(read_pause(controlplane.pause_file(config)))
    pause_cache = (api.pause if api is not None else
                   PauseCache(store, config.pause_poll_s, config.fallback_paused)
                   if store is not None else None)
    pause_watch = loop.create_task(watch_pause(relay, pause_cache, config.pause_poll_s))

    export = WorkerExport(relay)
    registration = registration_for(config, sockets.listener.getsockname()[1], generation,
                                    lambda: (relay.connections, len(relay.registry)))

    def beat() -> None:
        channel.send(control.Beat(stats=relay.beat_stats()))
        try:
            export.fold(acceptor.stats)
        except Exception:  # metrics must never take a worker down
            log.exception("metrics.fold_failed")

    async def beats() -> None:
        while True:
            beat()
            await asyncio.sleep(BEAT_INTERVAL_S)

    beater = loop.create_task(beats())
    loop.add_signal_handler(signal.SIGTERM, channel.messages.put_nowait,
                            control.Drain(window_s=config.drain_window_s,
                                          deadline_s=config.drain_timeout_s))
    loop.add_signal_handler(signal.SIGQUIT, channel.messages.put_nowait, control.Stop())
    gc.freeze()  # the worker's own setup is long-lived too; sweeps skip it from now on
    # Connections are long-lived object graphs that die by reference counting: a full
    # collection finds little, and its pause grows with the number of connections.
    # Consider one after 100 middle-generation collections instead of 10.
    gen0, gen1, _ = gc.get_threshold()
    gc.set_threshold(gen0, gen1, 100)
    _watch_gc_pauses()
    if registration is not None:  # listed before ready: a reload never unlists the node
        await registration.begin()
    channel.send(control.Ready())
    await _obey(channel, acceptor, relay, config, registration=registration)
    beat()  # the last numbers, so nothing counted since the previous beat is lost
    await _cancel_until_done(beater, sweeper, pause_watch)
    await relay.close_all_wait(config.close_timeout_s + 1)
    if admin_runner is not None:
        await admin_runner.cleanup()
    await runner.cleanup()
    if store is not None:
        await store.close()
    if api is not None:
        await api.close()
    if registration is not None:  # last: the node stays listed while anything is open
        await registration.withdraw()
        await registration.registry.close()
    log_event(log, "worker.exiting", slot=slot)
    return 0


def worker_main(config: Config, sockets: WorkerSockets, generation: int) -> int:
    """The body of a forked worker process; returns the exit status for ``os._exit``."""
    setproctitle.setproctitle(worker_title(sockets.slot, generation))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor owns Ctrl-C
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    for sig in (signal.SIGTERM, signal.SIGQUIT, signal.SIGCHLD, signal.SIGTTIN,
                signal.SIGTTOU, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_DFL)
    configure_logging(config.log_level)
    quiet_aiohttp_server_errors()
    try:
        tracing.setup_tracing(config.otel_endpoint, config.otel_service_name,
                              sample_ratio=config.otel_sample_ratio,
                              resource_attributes={"beach_rescue.worker_slot": sockets.slot})
        return uvloop.run(run_worker(config, sockets, generation))
    except Exception:
        log.exception("worker.crashed")
        return 1
    finally:
        tracing.shutdown_tracing()
