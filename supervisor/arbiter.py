"""The arbiter: forks one relay worker per slot and keeps them running.

In the spirit of gunicorn's arbiter. Nothing (no event loop, no thread, no Redis client)
runs in this process before or after a fork; it sleeps in ``select`` on a wake-up pipe
and the workers' control sockets. Signal handlers only queue the signal and wake the
loop; the loop dispatches each to a ``handle_<name>`` method:

- **HUP**: re-read the configuration (keep the old one, and say why, if the new one is
  invalid), start a new generation of workers, and once every new worker is ready tell
  the old generation to drain; the new generation starts serving when the old one has
  stopped its intake. Slots keep their ids, so sessions keep their home.
- **TERM**: drain every worker and exit 0 when they are gone (or at the deadline).
  A second TERM, or **INT** / **QUIT**, stops fast.
- **TTIN** / **TTOU**: reload with one worker more / less.
- **CHLD**: reap; a worker that died unasked is restarted in its slot with backoff
  (see :mod:`supervisor.slots`).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import select
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

import msgspec

from rescue import control, metrics
from rescue.config import Config, ConfigError
from rescue.logs import log_event
from rescue.server.worker import WorkerSockets
from supervisor.notify import Notifier
from supervisor.slots import BootLoop, SlotTable, Worker, WorkerState
from supervisor.sockets import SocketSet, bind_listener

log = logging.getLogger("rescue.supervisor")

SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD,
           signal.SIGTTIN, signal.SIGTTOU)
TICK_S = 0.5
BOOT_TIMEOUT_S = 30.0
FAST_STOP_GRACE_S = 3.0
STATUS_EVERY_S = 2.0

WorkerMain = Callable[[Config, Any, int], int]


class Arbiter:
    """The supervisor process: slot table, signal queue, control channels."""

    def __init__(self, config: Config, reload_config: Callable[[], Config],
                 worker_main: WorkerMain, notifier: Notifier | None = None) -> None:
        self.config = config
        self.reload_config = reload_config
        self.worker_main = worker_main
        self.notifier = notifier or Notifier()
        self.workers_wanted = config.resolved_workers()
        self.table = SlotTable(self.workers_wanted)
        self.sockets = SocketSet(config.host, config.port)
        self.controls: dict[int, socket.socket] = {}
        self.intake_open: set[int] = set()
        self.sig_queue: list[int] = []
        self.stopping = False
        self.fast = False
        self.stop_deadline: float | None = None
        self.announced = False
        self.reloading = False
        self.exit_status = 0
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._last_status = 0.0
        self._last_watchdog = 0.0
        self._last_cluster = 0.0

    # --- setup -----------------------------------------------------------------------
    def bind(self) -> None:
        """Create listeners, inboxes and the admin listener (before any fork)."""
        self.sockets.ensure_slots(self.workers_wanted)
        if self.config.admin_port:
            self.sockets.admin = bind_listener(self.config.admin_host, self.config.admin_port)

    def _install_signals(self) -> None:
        def queue_signal(signum: int, _frame: object) -> None:
            self.sig_queue.append(signum)
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b".")

        for sig in SIGNALS:
            signal.signal(sig, queue_signal)

    # --- main loop -------------------------------------------------------------------
    def run(self) -> int:
        """Run until the node is stopped; return the process exit status."""
        self._install_signals()
        try:
            while True:
                self._maintain()
                if self.stopping and not self.table.workers:
                    break
                self._sleep()
                self._dispatch_signals()
                self._reap()
        except BootLoop as e:
            log_event(log, "supervisor.boot_loop", level=logging.CRITICAL, detail=str(e))
            self._kill_all(signal.SIGKILL)
            self._reap_blocking(5.0)
            self.exit_status = 3
        finally:
            self.notifier.stopping()
            self.sockets.close()
            for sock in self.controls.values():
                sock.close()
        log_event(log, "supervisor.exited", status=self.exit_status)
        return self.exit_status

    def _sleep(self) -> None:
        timeout = TICK_S
        deadline = self.table.next_deadline()
        if deadline is not None:
            timeout = max(0.0, min(timeout, deadline - time.monotonic()))
        if self.notifier.watchdog_s:
            due = self._last_watchdog + self.notifier.watchdog_s / 2
            timeout = max(0.0, min(timeout, due - time.monotonic()))
        readers: list[int | socket.socket] = [self._wake_r, *self.controls.values()]
        try:
            ready, _, _ = select.select(readers, [], [], timeout)
        except InterruptedError:
            return
        for r in ready:
            if r == self._wake_r:
                try:
                    while os.read(self._wake_r, 512):
                        pass
                except BlockingIOError:
                    pass
            else:
                assert isinstance(r, socket.socket)
                self._read_control(r)

    def _dispatch_signals(self) -> None:
        while self.sig_queue:
            signum = self.sig_queue.pop(0)
            name = signal.Signals(signum).name.lower()
            handler = getattr(self, f"handle_{name[3:]}", None)
            if handler is not None:
                handler()

    # --- signal handlers -------------------------------------------------------------
    def handle_chld(self) -> None:
        """Children are reaped after every wake-up; nothing more to do here."""

    def handle_hup(self) -> None:
        """Reload: new configuration, new generation, drain the old one."""
        if self.stopping:
            return
        try:
            new_config = self.reload_config()
        except ConfigError as e:
            metrics.RELOADS.labels("refused").inc()
            log_event(log, "reload.refused", level=logging.ERROR,
                      detail=f"keeping the running configuration: {e}")
            return
        self._reload(new_config, new_config.resolved_workers())

    def handle_ttin(self) -> None:
        """Add one worker (a reload with one more slot)."""
        if not self.stopping:
            self._reload(self.config, self.workers_wanted + 1)

    def handle_ttou(self) -> None:
        """Remove one worker (a reload with one slot fewer); never below one."""
        if not self.stopping and self.workers_wanted > 1:
            self._reload(self.config, self.workers_wanted - 1)

    def handle_term(self) -> None:
        """Drain the node and exit 0; a second TERM stops fast."""
        if self.stopping:
            self.handle_int()
            return
        self.stopping = True
        self.notifier.stopping()
        deadline_s = self.config.drain_timeout_s
        self.stop_deadline = time.monotonic() + deadline_s + 5.0
        log_event(log, "supervisor.draining", workers=len(self.table.workers),
                  deadline_s=deadline_s)
        for worker in list(self.table.workers.values()):
            if worker.state is not WorkerState.DRAINING:
                self._send(worker, control.Drain(window_s=self.config.drain_window_s,
                                                 deadline_s=deadline_s, final=True))
                worker.state = WorkerState.DRAINING

    def handle_int(self) -> None:
        """Stop fast: every worker closes its peers now and exits."""
        self.stopping = True
        self.fast = True
        self.stop_deadline = time.monotonic() + FAST_STOP_GRACE_S
        log_event(log, "supervisor.stopping_fast", workers=len(self.table.workers))
        for worker in list(self.table.workers.values()):
            self._send(worker, control.Stop())
            worker.state = WorkerState.STOPPING

    handle_quit = handle_int

    # --- reload ----------------------------------------------------------------------
    def _reload(self, config: Config, workers: int) -> None:
        self.notifier.reloading()
        try:
            self.sockets.ensure_slots(workers)
        except OSError as e:
            log_event(log, "reload.refused", level=logging.ERROR,
                      detail=f"cannot bind listeners for {workers} workers: {e}")
            self.notifier.ready()
            return
        self.config = config
        self.workers_wanted = workers
        self.reloading = True
        generation = self.table.new_generation(workers, time.monotonic())
        log_event(log, "reload.started", generation=generation, workers=workers)

    # --- maintenance -----------------------------------------------------------------
    def _maintain(self) -> None:
        now = time.monotonic()
        if not self.stopping:
            for slot_id in self.table.due_starts(now):
                self._spawn(slot_id, now)
            for worker in self.table.stuck(now, self.config.worker_liveness_timeout_s):
                log_event(log, "worker.stuck", level=logging.ERROR, slot=worker.slot,
                          worker_pid=worker.pid, silent_s=round(now - worker.last_beat, 1))
                self._kill(worker, signal.SIGKILL)
            for worker in self.table.booting_too_long(now, BOOT_TIMEOUT_S):
                log_event(log, "worker.boot_timeout", level=logging.ERROR, slot=worker.slot)
                self._kill(worker, signal.SIGKILL)
            self._advance_generations()
            if now - self._last_cluster >= 1.0:
                self._last_cluster = now
                self.broadcast_cluster()
        elif self.stop_deadline is not None and now >= self.stop_deadline:
            log_event(log, "supervisor.stop_deadline", level=logging.WARNING,
                      left=len(self.table.workers))
            self._kill_all(signal.SIGKILL)
            self.stop_deadline = None
        self._notify_systemd(now)

    def _advance_generations(self) -> None:
        current = self.table.current_workers()
        all_ready = self.table.all_current_in(WorkerState.READY, WorkerState.SERVING)
        old = self.table.old_workers()
        if all_ready:
            for worker in old:
                if worker.state in (WorkerState.BOOTING, WorkerState.READY,
                                    WorkerState.SERVING):
                    self._send(worker, control.Drain(
                        window_s=self.config.drain_window_s,
                        deadline_s=self.config.drain_timeout_s))
                    worker.state = WorkerState.DRAINING
        old_intake = any(w.pid in self.intake_open for w in old)
        if not old_intake:
            for worker in current:
                if worker.state is WorkerState.READY:
                    self._send(worker, control.Serve())
                    worker.state = WorkerState.SERVING
                    self.intake_open.add(worker.pid)
        if self.table.all_current_in(WorkerState.SERVING):
            if not old and self.reloading:
                self.reloading = False
                self.sockets.drop_slots_from(self.workers_wanted)
                metrics.RELOADS.labels("completed").inc()
                log_event(log, "reload.completed", generation=self.table.generation)
                self.notifier.ready(self._status_line())
            if not self.announced:
                self.announced = True
                log_event(log, "relay.listening", host=self.config.host,
                          port=self.sockets.port, workers=self.workers_wanted,
                          admin_port=(self.sockets.admin.getsockname()[1]
                                      if self.sockets.admin else None),
                          supervisor_pid=os.getpid())
                self.notifier.ready(self._status_line())

    def _status_line(self) -> str:
        workers = self.table.current_workers()
        serving = sum(w.state is WorkerState.SERVING for w in workers)
        conns = sum(int(w.stats.get("connections", 0)) for w in self.table.workers.values())
        sessions = sum(int(w.stats.get("sessions", 0)) for w in self.table.workers.values())
        draining = len(self.table.old_workers()) + (len(workers) if self.stopping else 0)
        return (f"{serving}/{self.workers_wanted} workers serving, {conns} connections, "
                f"{sessions} sessions" + (f", {draining} draining" if draining else ""))

    def _notify_systemd(self, now: float) -> None:
        if not self.notifier.enabled:
            return
        if now - self._last_status >= STATUS_EVERY_S:
            self._last_status = now
            self.notifier.status(self._status_line())
        interval = self.notifier.watchdog_s
        if interval and now - self._last_watchdog >= interval / 2 and not self.table.stuck(
                now, self.config.worker_liveness_timeout_s):
            self._last_watchdog = now
            self.notifier.watchdog()

    # --- workers ---------------------------------------------------------------------
    def _spawn(self, slot_id: int, now: float) -> None:
        # Everything imported so far is immortal: keep the collector (and its writes to
        # object headers, which would un-share copy-on-write pages) away from it.
        gc.freeze()
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        generation = self.table.generation
        pid = os.fork()
        if pid == 0:  # the worker
            status = 1
            try:
                parent_end.close()
                status = self._become_worker(slot_id, child_end, generation)
            finally:
                os._exit(status)
        child_end.close()
        parent_end.setblocking(False)
        self.controls[pid] = parent_end
        self.table.spawned(slot_id, pid, now)
        metrics.WORKER_RESTARTS.labels(str(slot_id))  # the series exists from 0 on
        log_event(log, "worker.spawned", slot=slot_id, worker_pid=pid, generation=generation)

    def _become_worker(self, slot_id: int, control_sock: socket.socket,
                       generation: int) -> int:
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        os.close(self._wake_r)
        os.close(self._wake_w)
        self.notifier.close()
        for sock in self.controls.values():
            sock.close()
        mine = self.sockets.slots[slot_id]
        keep = {mine.listener, mine.inbox_read, control_sock,
                *(s.inbox_write for s in self.sockets.slots.values())}
        if self.sockets.admin is not None:
            keep.add(self.sockets.admin)
        for sock in self.sockets.all():
            if sock not in keep:
                sock.close()
        slot_ids = tuple(range(self.workers_wanted))
        sockets = WorkerSockets(
            slot=slot_id, slot_ids=slot_ids, listener=mine.listener,
            inbox=mine.inbox_read,
            outboxes={s: self.sockets.slots[s].inbox_write for s in slot_ids},
            control=control_sock, admin=self.sockets.admin)
        return self.worker_main(self.config, sockets, generation)

    def _send(self, worker: Worker, message: control.Message) -> None:
        sock = self.controls.get(worker.pid)
        if sock is None:
            return
        try:
            sock.send(control.encode(message))
        except OSError as e:
            log_event(log, "control.send_failed", level=logging.WARNING, worker_pid=worker.pid,
                      error=str(e))

    def _read_control(self, sock: socket.socket) -> None:
        pid = next((p for p, s in self.controls.items() if s is sock), None)
        if pid is None:
            return
        while True:
            try:
                packet = sock.recv(control.MAX_PACKET)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                packet = b""
            if not packet:
                self.controls.pop(pid).close()
                self.intake_open.discard(pid)
                return
            try:
                message = control.decode(packet)
            except msgspec.DecodeError:
                log_event(log, "control.bad_packet", level=logging.ERROR, worker_pid=pid)
                continue
            self._on_message(pid, message)

    def _on_message(self, pid: int, message: control.Message) -> None:
        worker = self.table.workers.get(pid)
        if worker is None:
            return
        now = time.monotonic()
        if isinstance(message, control.Beat):
            self.table.beat(pid, now, message.stats)
        elif isinstance(message, control.Ready):
            self.table.beat(pid, now)
            if worker.state is WorkerState.BOOTING:
                worker.state = WorkerState.READY
        elif isinstance(message, control.IntakeStopped):
            self.intake_open.discard(pid)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._on_exit(pid, status)

    def _on_exit(self, pid: int, status: int) -> None:
        self.intake_open.discard(pid)
        sock = self.controls.pop(pid, None)
        if sock is not None:
            sock.close()
        code = os.waitstatus_to_exitcode(status)
        worker = self.table.workers.get(pid)
        asked = worker is not None and worker.state in (WorkerState.DRAINING,
                                                         WorkerState.STOPPING)
        self.table.exited(pid, time.monotonic(), restart=not self.stopping)
        metrics.mark_dead(pid)
        if worker is not None and not asked and not self.stopping:
            metrics.WORKER_RESTARTS.labels(str(worker.slot)).inc()
        if worker is not None:
            log_event(log, "worker.exited", level=logging.INFO if asked else logging.ERROR,
                      slot=worker.slot, worker_pid=pid, generation=worker.generation,
                      exit_code=code, asked=asked)

    def _kill(self, worker: Worker, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, sig)

    def _kill_all(self, sig: int) -> None:
        for worker in list(self.table.workers.values()):
            self._kill(worker, sig)

    def _reap_blocking(self, timeout_s: float) -> None:
        end = time.monotonic() + timeout_s
        while self.table.workers and time.monotonic() < end:
            try:
                pid, _status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                select.select([], [], [], 0.05)
                continue
            self.table.exited(pid, time.monotonic(), restart=False)

    def broadcast_cluster(self) -> None:
        """Send every worker the table of all workers' latest numbers."""
        snapshot = [dict(w.stats, slot=w.slot, pid=w.pid, generation=w.generation,
                         state=w.state.value) for w in self.table.workers.values()]
        for worker in self.table.workers.values():
            self._send(worker, control.Cluster(workers=snapshot))

