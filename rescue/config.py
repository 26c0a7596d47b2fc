"""The relay's configuration: one typed struct, the single source of truth.

Every setting is a field of :class:`Config`. Its default, its constraints and its
description live on the field; from them come the environment variable
(``BEACH_RESCUE_<NAME>``), the CLI flag (``--<name-with-dashes>``), the TOML key
(``<name>``), the validation message and the generated reference in
``docs/configuration.md``. Precedence, lowest first: defaults, TOML file,
environment, command line.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

ENV_PREFIX = "BEACH_RESCUE_"
CONFIG_FILE_ENV = ENV_PREFIX + "CONFIG"


def _m(description: str, **constraints: Any) -> msgspec.Meta:
    return msgspec.Meta(description=description, **constraints)


class Config(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """All settings of a relay node. Construct with :func:`load_config`."""

    # --- listeners -------------------------------------------------------------------
    host: Annotated[str, _m("Address the public WebSocket listener binds to.")] = "127.0.0.1"
    port: Annotated[int, _m("Port of the public WebSocket listener (0: any free port).",
                            ge=0, le=65535)] = 9443
    workers: Annotated[int, _m(
        "Worker processes (one event loop each); 0 means one per CPU core.",
        ge=0, le=256)] = 0
    admin_host: Annotated[str, _m("Address of the admin listener (/debug/stats).")] = "127.0.0.1"
    admin_port: Annotated[int, _m("Port of the admin listener; 0 disables it.",
                                  ge=0, le=65535)] = 0
    metrics_key: Annotated[str, _m(
        "Bearer key `/metrics` on the admin listener requires; empty: `/metrics` is open "
        "to whoever reaches the admin listener (loopback by default).")] = ""
    metrics_dir: Annotated[str, _m(
        "Directory for prometheus-client's multiprocess files, emptied at start and locked "
        "(`<dir>.lock`: a second relay on the same directory is refused); empty: "
        "`$PROMETHEUS_MULTIPROC_DIR` if set, else `<state_dir>/metrics`.")] = ""
    admin_key: Annotated[str, _m(
        "Bearer key the admin listener requires; empty: the admin listener refuses every "
        "request.")] = ""

    # --- tokens ------------------------------------------------------------------------
    token_keys: Annotated[str, _m(
        "Directory of trusted Ed25519 public keys (`<kid>.pub`, PEM). Empty: development "
        "keys generated in `<state_dir>/keys`.")] = ""
    state_dir: Annotated[str, _m(
        "Directory for generated state (development keys). Empty: "
        "`$XDG_STATE_HOME/beach-rescue` or `~/.local/state/beach-rescue`.")] = ""
    token_audience: Annotated[str, _m("Required `aud` claim.", min_length=1)] = "beach-rescue"
    token_issuer: Annotated[str, _m("Required `iss` claim; empty accepts any issuer.")] = ""
    token_leeway_s: Annotated[float, _m("Clock leeway for `exp`/`nbf`, seconds.",
                                        ge=0, le=300)] = 30.0
    token_max_lifetime_s: Annotated[int, _m("Largest accepted `exp - iat`, seconds.",
                                            ge=1, le=86400)] = 300
    entitlement_checks: Annotated[bool, _m(
        "Require the `fallback-ws` capability in tokens. Turn off only for "
        "development.")] = True

    # --- sessions ----------------------------------------------------------------------
    max_participants: Annotated[int, _m("Participants allowed per session.",
                                        ge=1, le=1024)] = 8
    max_connections_per_session: Annotated[int, _m(
        "Connections (including ones still in the handshake) allowed per session.",
        ge=2, le=4096)] = 16
    session_grace_s: Annotated[float, _m(
        "How long an empty session's state is kept so a reconnecting peer finds it.",
        ge=0, le=3600)] = 10.0

    # --- messages and liveness ------------------------------------------------------------
    max_message_bytes: Annotated[int, _m(
        "Largest WebSocket message accepted (frame header included).",
        ge=64, le=65544)] = 65544
    handshake_timeout_s: Annotated[float, _m(
        "Time allowed from the upgrade to the client hello.", gt=0, le=120)] = 5.0
    heartbeat_s: Annotated[float, _m(
        "Heartbeat interval announced in the server hello; the liveness sweep runs at "
        "this period.", gt=0, le=600)] = 15.0
    missed_heartbeats: Annotated[int, _m(
        "Silent heartbeat intervals after which a peer is closed (IDLE_TIMEOUT).",
        ge=2, le=100)] = 3
    data_idle_timeout_s: Annotated[float, _m(
        "Close a peer that relayed no data or control frame for this long; 0 disables.",
        ge=0)] = 3600.0
    close_timeout_s: Annotated[float, _m(
        "How long to wait for a peer's close reply before dropping the TCP connection.",
        gt=0, le=60)] = 2.0

    # --- flow control --------------------------------------------------------------------
    write_high_water_bytes: Annotated[int, _m(
        "A receiver's unsent bytes above which its senders stop being read.",
        ge=1024)] = 262144
    write_low_water_bytes: Annotated[int, _m(
        "A paused sender resumes when its receivers drop below this.", ge=0)] = 65536
    slow_consumer_timeout_s: Annotated[float, _m(
        "A receiver above the high-water mark this long is evicted (SLOW_CONSUMER).",
        gt=0, le=600)] = 10.0

    # --- limits ------------------------------------------------------------------------
    rate_messages_per_s: Annotated[float, _m("Sustained messages per second per connection.",
                                             gt=0)] = 500.0
    rate_messages_burst: Annotated[int, _m("Message burst allowed per connection.",
                                           ge=1)] = 1000
    rate_bytes_per_s: Annotated[float, _m("Sustained bytes per second per connection.",
                                          gt=0)] = 2_097_152.0
    rate_bytes_burst: Annotated[int, _m("Byte burst allowed per connection.",
                                        ge=65544)] = 8_388_608
    max_connections: Annotated[int, _m(
        "Open WebSocket connections per worker; past it upgrades get 503 `overloaded`.",
        ge=1)] = 16000
    max_handshakes: Annotated[int, _m(
        "Connections per worker still in their handshake; past it upgrades get 503.",
        ge=1)] = 512

    # --- control plane (token API, guardrails, kill switch) -------------------------------
    control_plane: Annotated[bool, _m(
        "Serve the control-plane API (`/v1/...`) on this node's public port (the "
        "single-machine setup); off when a separate `beach-rescue control-plane` runs."
        )] = True
    redis_url: Annotated[str, _m(
        "Redis for guardrail counters and the kill switch (`redis://host:port/db`); empty: "
        "in-process memory, served by worker slot 0 (one machine only).")] = ""
    redis_timeout_s: Annotated[float, _m("Timeout of each Redis operation and connect.",
                                         gt=0, le=30)] = 0.5
    signing_keys: Annotated[str, _m(
        "Directory of Ed25519 private keys (`<kid>.key`) the token API signs with (the "
        "newest); empty: development keys in `<state_dir>/keys`.")] = ""
    service_keys: Annotated[str, _m(
        "Comma-separated bearer keys allowed to call the token API; empty: every call is "
        "refused (401).")] = ""
    relay_url: Annotated[str, _m(
        "`relay_url` returned with tokens; empty: `ws://<host>:<port>/ws`.")] = ""
    token_ttl_s: Annotated[int, _m("Lifetime of minted relay tokens, seconds.",
                                   ge=10, le=300)] = 300
    guardrail_threshold: Annotated[float, _m(
        "Fallback tokens / sessions per cohort and hour at or above which a token is "
        "marked `soft_breach`.", gt=0, le=1)] = 0.005
    guardrail_hard_threshold: Annotated[float, _m(
        "Ratio at or above which the fallback pauses itself (kill switch on); 0 disables.",
        ge=0, le=1)] = 0.0
    guardrail_hard_min_sessions: Annotated[int, _m(
        "Sessions a cohort must have counted in the hour before its ratio can trip the "
        "hard threshold (a cohort that reports few or no sessions cannot pause the "
        "fallback for everyone).", ge=1)] = 100
    guardrail_exempt_cohorts: Annotated[str, _m(
        "Comma-separated cohorts whose tokens are issued without touching the guardrail "
        "counters (synthetic probes); their tokens count as `exempt` in the metrics.")
        ] = "probe"
    fallback_paused: Annotated[bool, _m(
        "Force the kill switch on, whatever the store says.")] = False
    store_fail_open: Annotated[bool, _m(
        "Issue tokens while the store is unreachable (uncounted, marked in the response) "
        "instead of answering 503 `store_unavailable`.")] = False
    pause_poll_s: Annotated[float, _m(
        "How long a worker caches the kill switch before reading it again.",
        gt=0, le=60)] = 1.0
    entitlement_jwks: Annotated[str, _m(
        "JWKS file of the identity provider; when set, token requests must carry an "
        "`entitlement_proof` JWT granting `rescue:fallback`.")] = ""
    disable_oidc: Annotated[bool, _m(
        "Skip the entitlement proof check (development only; refused with "
        "`production`).")] = False
    production: Annotated[bool, _m(
        "Refuse development shortcuts (disable_oidc, development keys).")] = False
    mint_rate_per_session_per_min: Annotated[float, _m(
        "Tokens one session id may get per minute (burst of the same size).", gt=0)] = 30.0
    mint_rate_per_service_key_per_s: Annotated[float, _m(
        "Token requests one service key may make per second (burst of twice that).",
        gt=0)] = 200.0

    # --- several nodes (registry, routing, load balancer) ----------------------------------
    node_id: Annotated[str, _m(
        "This node's name in the node registry; empty: `<hostname>:<port>`.")] = ""
    node_url: Annotated[str, _m(
        "Public WebSocket URL of this node, handed out by control-plane routing (e.g. "
        "`wss://relay-3.example.net/ws`); empty: `ws://<host>:<port>/ws`.")] = ""
    registry_redis_url: Annotated[str, _m(
        "Redis of the node registry (`redis://host:port/db`). A relay node registers "
        "itself there (URL, state, load, with a TTL); a control plane picks each token's "
        "`relay_url` among the active nodes by rendezvous hash of the session. Empty: no "
        "registry.")] = ""
    registry_ttl_s: Annotated[float, _m(
        "A node's registry entry expires this long after its last refresh (every worker "
        "refreshes it every third of this), so a dead node leaves the active set within "
        "it.", ge=1, le=300)] = 10.0
    drain_notice_s: Annotated[float, _m(
        "When the node stops (SIGTERM), how long it reports not-ready (`/readyz` 503, "
        "registry `draining`, new upgrades 503) while still accepting, before its peers "
        "are told to reconnect; set it above the balancer's time to mark a node down. "
        "Counts against `drain_timeout_s`; 0: drain at once.", ge=0, le=600)] = 0.0
    proxy_protocol: Annotated[bool, _m(
        "Require a PROXY protocol header (v1 or v2, as HAProxy's `send-proxy-v2` sends) "
        "before each connection's request on the public port, and take the client "
        "address from it; connections without one are refused.")] = False

    # --- operations --------------------------------------------------------------------
    drain_timeout_s: Annotated[float, _m(
        "Deadline for a worker's drain (SIGTERM, or the old generation on SIGHUP); peers "
        "still connected then are dropped.", gt=0, le=3600)] = 30.0
    drain_window_s: Annotated[float, _m(
        "Peers of a draining worker are told to reconnect evenly over this window, so "
        "they do not all come back at once.", ge=0, le=3600)] = 5.0
    drain_reconnect_spread_ms: Annotated[int, _m(
        "Each `draining` event carries a `reconnect_after_ms` drawn from 0 to this.",
        ge=0, le=600000)] = 1000
    handoff_hold_s: Annotated[float, _m(
        "A connection handed to a restarting worker waits this long in its inbox before "
        "it is answered 503.", gt=0, le=60)] = 5.0
    worker_liveness_timeout_s: Annotated[float, _m(
        "A worker whose event loop has not reported for this long is killed and replaced.",
        gt=1, le=600)] = 10.0
    otel_endpoint: Annotated[str, _m(
        "OTLP/HTTP collector URL for OpenTelemetry traces (needs the `otel` extra); "
        "a bare `http(s)://host:port` gets `/v1/traces` appended. Empty: tracing off.")] = ""
    otel_service_name: Annotated[str, _m("The `service.name` of exported traces.",
                                         min_length=1)] = "beach-rescue"
    otel_sample_ratio: Annotated[float, _m("Share of traces kept.", ge=0, le=1)] = 1.0
    log_level: Annotated[Literal["debug", "info", "warning", "error"],
                         _m("Lowest log level written (JSON lines on stderr).")] = "info"

    def __post_init__(self) -> None:
        if self.production:
            if self.disable_oidc:
                raise ValueError("disable_oidc is refused when production is set")
            if not self.token_keys:
                raise ValueError("production needs token_keys (development keys are refused)")
            if self.control_plane and not self.signing_keys:
                raise ValueError("production with control_plane needs signing_keys")
        if self.drain_window_s > self.drain_timeout_s:
            raise ValueError(
                "drain_window_s must not exceed drain_timeout_s "
                f"({self.drain_window_s} > {self.drain_timeout_s})")
        if self.max_connections_per_session < self.max_participants + 2:
            raise ValueError(
                "max_connections_per_session must leave room for a full session plus one "
                "reconnecting peer (at least max_participants + 2 = "
                f"{self.max_participants + 2}, got {self.max_connections_per_session})")
        if self.write_low_water_bytes >= self.write_high_water_bytes:
            raise ValueError(
                "write_low_water_bytes must be below write_high_water_bytes "
                f"({self.write_low_water_bytes} >= {self.write_high_water_bytes})")

    def resolved_workers(self) -> int:
        """Return the worker count, applying the one-per-core default."""
        return self.workers or len(os.sched_getaffinity(0)) or 1

    def resolved_metrics_dir(self) -> Path:
        """Return the multiprocess metrics directory, applying the defaults."""
        if self.metrics_dir:
            return Path(self.metrics_dir)
        from_env = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        return Path(from_env) if from_env else self.resolved_state_dir() / "metrics"

    def resolved_state_dir(self) -> Path:
        """Return the state directory, applying the XDG default when unset."""
        if self.state_dir:
            return Path(self.state_dir)
        base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        return Path(base) / "beach-rescue"


class ConfigError(Exception):
    """A setting was refused; the message names the field and where its value came from."""


@dataclass(frozen=True)
class Setting:
    """Everything the loaders and the docs need to know about one field."""

    name: str
    type_name: str
    default: Any
    description: str
    constraints: str

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def is_bool(self) -> bool:
        return self.type_name == "bool"


def _describe(t: msgspec.inspect.Type) -> tuple[str, str, str]:
    description = ""
    if isinstance(t, msgspec.inspect.Metadata):
        description = (t.extra_json_schema or {}).get("description", "")
        t = t.type
    parts = []
    for attr, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"),
                      ("min_length", "length >=")):
        value = getattr(t, attr, None)
        if value is not None:
            parts.append(f"{sym} {value}")
    if isinstance(t, msgspec.inspect.LiteralType):
        type_name = " \\| ".join(repr(v) for v in t.values)
    else:
        type_name = {msgspec.inspect.IntType: "int", msgspec.inspect.FloatType: "float",
                     msgspec.inspect.BoolType: "bool", msgspec.inspect.StrType: "str"
                     }.get(type(t), type(t).__name__)
    return type_name, description, ", ".join(parts)


def settings() -> list[Setting]:
    """Return one :class:`Setting` per field of :class:`Config`, in declaration order."""
    info = msgspec.inspect.type_info(Config)
    assert isinstance(info, msgspec.inspect.StructType)
    out = []
    for f in info.fields:
        type_name, description, constraints = _describe(f.type)
        out.append(Setting(f.name, type_name, f.default, description, constraints))
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per setting (values are parsed later, by :func:`load_config`)."""
    parser.add_argument("--config", metavar="FILE",
                        help=f"TOML file with settings (also {CONFIG_FILE_ENV})")
    for s in settings():
        if s.is_bool:
            parser.add_argument(s.flag, dest=s.name, action=argparse.BooleanOptionalAction,
                                default=None, help=f"{s.description} [{s.env}]")
        else:
            parser.add_argument(s.flag, dest=s.name, default=None, metavar="VALUE",
                                help=f"{s.description} [{s.env}]")


def _from_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from e
    known = {s.name for s in settings()}
    for key in data:
        if key not in known:
            raise ConfigError(f"config file {path}: unknown setting `{key}`")
    return data


def load_config(args: argparse.Namespace | None = None,
                environ: Mapping[str, str] | None = None,
                overrides: Mapping[str, Any] | None = None) -> Config:
    """Build a validated :class:`Config` from defaults, TOML file, environment and flags.

    Raises :class:`ConfigError` naming the offending field and the source of its value.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}

    config_file = getattr(args, "config", None) or environ.get(CONFIG_FILE_ENV)
    if config_file:
        for key, value in _from_toml(config_file).items():
            values[key] = value
            sources[key] = f"config file {config_file}"
    for s in settings():
        if s.env in environ:
            values[s.name] = environ[s.env]
            sources[s.name] = f"environment {s.env}"
        cli_value = getattr(args, s.name, None) if args is not None else None
        if cli_value is not None:
            values[s.name] = cli_value
            sources[s.name] = f"flag {s.flag}"
    for key, value in (overrides or {}).items():
        values[key] = value
        sources[key] = "override"
    unknown = [k for k in environ if k.startswith(ENV_PREFIX) and k != CONFIG_FILE_ENV
               and k[len(ENV_PREFIX):].lower() not in {s.name for s in settings()}]
    try:
        config = msgspec.convert(values, Config, strict=False)
    except msgspec.ValidationError as e:
        raise ConfigError(_explain(str(e), sources)) from None
    if unknown:
        # Not fatal (other tools share the prefix), but a typo should not pass silently.
        logging.getLogger("rescue.config").warning(
            "config.unknown_env", extra={"fields": {"names": sorted(unknown)}})
    return config


def _explain(message: str, sources: Mapping[str, str]) -> str:
    marker = " - at `$."
    if marker in message:
        reason, _, rest = message.partition(marker)
        field = rest.rstrip("`").split(".")[0].split("[")[0]
        source = sources.get(field, "default")
        return f"invalid setting `{field}` (from {source}): {reason}"
    named = [f"`{name}` from {source}" for name, source in sources.items()
             if re.search(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])", message)]
    origin = f" ({'; '.join(named)})" if named else ""
    return f"invalid configuration{origin}: {message}"


def reference_markdown() -> str:
    """Render the configuration reference that ``docs/configuration.md`` holds."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from `rescue/config.py` by `beach-rescue config docs`; do not edit by hand.",
        "",
        "Precedence, lowest first: defaults, the TOML file (`--config FILE` or "
        f"`{CONFIG_FILE_ENV}`), environment variables, command-line flags. A value that does "
        "not validate stops the process at start with a message naming the setting.",
        "",
        "| setting | env / flag | type | default | constraints | meaning |",
        "|---|---|---|---|---|---|",
    ]
    for s in settings():
        lines.append(f"| `{s.name}` | `{s.env}`<br>`{s.flag}` | {s.type_name} | "
                     f"`{s.default!r}` | {s.constraints or '-'} | {s.description} |")
    return "\n".join(lines) + "\n"
