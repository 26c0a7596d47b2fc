"""``beach-rescue serve``: validate, bind, then hand the process to the arbiter."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

import msgspec
import setproctitle

from rescue import keys, tracing
from rescue.config import Config, ConfigError
from rescue.controlplane import service as controlplane
from rescue.logs import configure_logging, log_event
from rescue.server.app import load_verifier
from rescue.server.worker import worker_main
from supervisor.arbiter import Arbiter
from supervisor.sockets import raise_nofile_limit

log = logging.getLogger("rescue.supervisor")

# File descriptors a worker keeps for listeners, inboxes, control, logs and key files.
FD_RESERVE = 64


def checked(config: Config) -> Config:
    """Validate what the struct cannot (the token keys load) and fit limits to RLIMIT_NOFILE.

    Raises :class:`ConfigError` with a clear message.
    """
    try:
        load_verifier(config)
    except keys.KeyStoreError as e:
        raise ConfigError(f"token keys: {e}") from None
    if config.control_plane:
        controlplane.check(config)
    try:
        tracing.check_tracing(config.otel_endpoint)
    except tracing.TracingError as e:
        raise ConfigError(f"otel_endpoint: {e}") from None
    nofile = raise_nofile_limit()
    if config.max_connections > nofile - FD_RESERVE:
        clamped = max(1, nofile - FD_RESERVE)
        log_event(log, "config.max_connections_clamped", level=logging.WARNING,
                  max_connections=config.max_connections, nofile=nofile, clamped_to=clamped)
        config = msgspec.structs.replace(config, max_connections=clamped)
    return config


def serve(config: Config, reload_config: Callable[[], Config]) -> int:
    """Run the supervisor and its workers with ``config``; return the exit status."""
    configure_logging(config.log_level)
    setproctitle.setproctitle("beach-rescue supervisor")
    try:
        config = checked(config)
    except ConfigError as e:
        print(f"beach-rescue: cannot start: {e}", file=sys.stderr)
        return 1
    arbiter = Arbiter(config, lambda: checked(reload_config()), worker_main)
    try:
        arbiter.bind()
    except OSError as e:
        print(f"beach-rescue: cannot listen on {config.host}:{config.port}: {e.strerror}",
              file=sys.stderr)
        return 1
    return arbiter.run()
