"""Carrying out a chaos plan's faults against a real relay node and its Redis.

Each fault is done at its planned time (seconds after the run's start) and logged with
the time it really happened, so the verdict can line up what the clients saw with what
was done: a worker SIGKILLed, a worker stopped (SIGSTOP) and continued (SIGCONT), Redis
SIGKILLed and restarted on the same port.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from dataclasses import dataclass, field

from tests.support.chaos_plan import ChaosPlan, RedisOutage, WorkerKill, WorkerStall
from tests.support.observe import wait_until
from tests.support.processes import worker_processes
from tests.support.redis import RedisServer
from tests.support.relay import RelayProcess

WORKER_WAIT_S = 20.0


@dataclass
class FaultLog:
    """What was done and when (loop time), in order."""

    events: list[tuple[float, str, dict[str, object]]] = field(default_factory=list)

    def add(self, at: float, what: str, **details: object) -> None:
        """Record one step of a fault."""
        self.events.append((at, what, details))

    def times(self, what: str) -> list[float]:
        """Loop times of every step named ``what``."""
        return [at for at, name, _ in self.events if name == what]

    def named(self, what: str) -> list[dict[str, object]]:
        """The details of every step named ``what``."""
        return [details for _, name, details in self.events if name == what]


async def worker_pid(relay: RelayProcess, slot: int) -> int:
    """The pid of the live worker in ``slot`` (waits while the slot restarts)."""

    async def find() -> int | None:
        for pid, (s, _gen) in worker_processes(relay).items():
            if s == slot:
                return pid
        return None

    pid: int = await wait_until(find, f"a worker in slot {slot}", WORKER_WAIT_S)
    return pid


async def kill_worker(relay: RelayProcess, fault: WorkerKill, log: FaultLog) -> None:
    """SIGKILL the worker of ``fault.slot``."""
    pid = await worker_pid(relay, fault.slot)
    os.kill(pid, signal.SIGKILL)
    log.add(asyncio.get_running_loop().time(), "worker.killed", slot=fault.slot, pid=pid)


async def stall_worker(relay: RelayProcess, fault: WorkerStall, log: FaultLog) -> None:
    """SIGSTOP the worker of ``fault.slot`` and SIGCONT it ``fault.for_s`` later."""
    loop = asyncio.get_running_loop()
    pid = await worker_pid(relay, fault.slot)
    os.kill(pid, signal.SIGSTOP)
    log.add(loop.time(), "worker.stopped", slot=fault.slot, pid=pid)
    try:
        await asyncio.sleep(fault.for_s)  # the length of the stall is the fault itself
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
        log.add(loop.time(), "worker.continued", slot=fault.slot, pid=pid)


async def redis_outage(redis: RedisServer, fault: RedisOutage, log: FaultLog) -> None:
    """SIGKILL Redis, wait ``fault.for_s``, start it again on the same port (empty)."""
    loop = asyncio.get_running_loop()
    await asyncio.to_thread(redis.kill)
    log.add(loop.time(), "redis.killed", port=redis.port)
    try:
        await asyncio.sleep(fault.for_s)  # the length of the outage is the fault itself
    finally:
        await asyncio.to_thread(redis.restart)
        log.add(loop.time(), "redis.restarted", port=redis.port)


async def run_faults(plan: ChaosPlan, relay: RelayProcess, redis: RedisServer,
                     started_at: float, log: FaultLog) -> None:
    """Do every fault of ``plan`` at its time after ``started_at`` (loop time)."""
    loop = asyncio.get_running_loop()

    async def at(when_s: float) -> None:
        delay = started_at + when_s - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)  # the plan's schedule

    async def kill(fault: WorkerKill) -> None:
        await at(fault.at_s)
        await kill_worker(relay, fault, log)

    async def stall(fault: WorkerStall) -> None:
        await at(fault.at_s)
        await stall_worker(relay, fault, log)

    async def outage(fault: RedisOutage) -> None:
        await at(fault.at_s)
        await redis_outage(redis, fault, log)

    async with asyncio.TaskGroup() as group:  # a failing step cancels (and undoes) the rest
        for k in plan.kills:
            group.create_task(kill(k))
        for s in plan.stalls:
            group.create_task(stall(s))
        for o in plan.outages:
            group.create_task(outage(o))
