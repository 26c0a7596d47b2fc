"""Locust entry point for beach-rescue load profiles: options, targets, tokens, the shape.

    locust -f load/locustfile.py --headless --host ws://127.0.0.1:9443 \\
        --shape active_stream --csv out/active --html out/active.html

``--shape`` (env ``BEACH_LOAD_SHAPE``) picks one of the profiles of ``load/shapes.py``; this
file holds Locust's one ``LoadTestShape``, :class:`BeachShape`, which runs the chosen profile
(so no class picker is needed, and the same command works headless, with the web UI and
distributed). Every profile setting is an option (``--idle-sessions``) and an environment
variable (``BEACH_LOAD_IDLE_SESSIONS``); a master passes its options to its workers.
``--run-time`` lowers a profile's time limit; ``-u`` and ``-r`` are ignored (the profile sets
the sessions).

This file also turns the options into the users' :class:`beach_user.ClientConfig`: the relay
URL (a host outside 127.0.0.0/8 is refused unless ``--allow-remote`` is given) and where
tokens come from (minted with ``--token-keys`` or fetched from ``--control-plane``).
"""

from __future__ import annotations

import ipaddress
import logging
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import gevent
import jwt
import requests
from beach_user import (
    DEFAULT_HOST,
    HELLO_TIMEOUT_S,
    USER_CLASSES,
    BeachSession,
    ClientConfig,
    HelloFailed,
    IdleSession,
    MixedSession,
    Reporter,
    StreamSession,
    ms_since,
)
from locust import LoadTestShape, events
from locust.env import Environment
from locust.runners import MasterRunner, Runner, WorkerRunner
from shapes import (
    DEFAULT_PROFILE,
    PROFILES,
    Profile,
    SettingsError,
    all_params,
    build_profile,
    traffic_settings,
    values_from,
)

from rescue import keys, tokens

__all__ = ["BeachShape", "IdleSession", "MixedSession", "StreamSession"]

log = logging.getLogger("beach_load")
STORM_MESSAGE = "beach_storm"
EXIT_REFUSED = 2
LOOPBACK = ipaddress.ip_network("127.0.0.0/8")


class TargetRefused(ValueError):
    """A relay or control-plane address is not allowed (not loopback, or malformed)."""


class TokenKeyError(SettingsError):
    """The signing key for local token minting cannot be loaded."""


def check_loopback(hostname: str, allow_remote: bool, what: str) -> None:
    """Raise :class:`TargetRefused` unless ``hostname`` is in 127.0.0.0/8 (or ``localhost``)
    or ``allow_remote`` is set."""
    if allow_remote or hostname == "localhost":
        return
    try:
        address = ipaddress.ip_address(hostname)
    except ValueError:
        address = None
    if address is None or address.version != 4 or address not in LOOPBACK:
        raise TargetRefused(f"{what} {hostname!r} is not in 127.0.0.0/8; load goes to loopback "
                            "only unless --allow-remote (BEACH_LOAD_ALLOW_REMOTE=1) is given")


def _loopback_netloc(hostname: str, port: int | None) -> str:
    host = "127.0.0.1" if hostname == "localhost" else hostname
    host = f"[{host}]" if ":" in host else host
    return host if port is None else f"{host}:{port}"


def relay_url(host: str | None, allow_remote: bool) -> str:
    """Return the relay's WebSocket URL (path ``/ws`` unless given) from Locust's ``--host``.

    ``http(s)://`` becomes ``ws(s)://``; ``localhost`` becomes 127.0.0.1. Raises
    :class:`TargetRefused` for a malformed or (without ``allow_remote``) non-loopback host.
    """
    if not host:
        raise TargetRefused(f"no --host given; pass the relay, e.g. {DEFAULT_HOST}")
    parts = urlsplit(host if "://" in host else "ws://" + host)
    scheme = {"ws": "ws", "http": "ws", "wss": "wss", "https": "wss"}.get(parts.scheme)
    try:
        port = parts.port
    except ValueError:
        raise TargetRefused(f"--host {host!r} has an invalid port") from None
    if scheme is None or not parts.hostname:
        raise TargetRefused(f"--host {host!r} is not a ws://, wss://, http:// or https:// URL")
    check_loopback(parts.hostname, allow_remote, "relay host")
    path = parts.path if parts.path not in ("", "/") else "/ws"
    return urlunsplit((scheme, _loopback_netloc(parts.hostname, port), path, "", ""))


def control_plane_url(base: str, allow_remote: bool) -> str:
    """Return the token endpoint under ``base``; refuses like :func:`relay_url`."""
    parts = urlsplit(base)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TargetRefused(f"--control-plane {base!r} is not an http:// or https:// URL")
    check_loopback(parts.hostname, allow_remote, "control plane")
    path = parts.path.rstrip("/")
    path = path if path.endswith("/v1/fallback/token") else path + "/v1/fallback/token"
    netloc = _loopback_netloc(parts.hostname, parts.port)
    return urlunsplit((parts.scheme, netloc, path, "", ""))


class TokenSource:
    """Relay tokens for sessions: minted with a local Ed25519 key or fetched from the
    control plane (``POST /v1/fallback/token`` with a bearer service key)."""

    def __init__(self, *, key: keys.SigningKey | None, endpoint: str | None,
                 service_key: str | None, cohort: str) -> None:
        self._key, self._endpoint, self._service_key = key, endpoint, service_key
        self._cohort = cohort
        self._http = requests.Session() if endpoint else None

    def __call__(self, session_id: str, report: Reporter) -> tuple[str, float]:
        """Return a token for ``session_id`` and its expiry (unix seconds); raises
        :class:`HelloFailed` when the control plane gives none (reported as ``token``)."""
        if self._key is not None:
            now = time.time()
            return tokens.mint_token(self._key, session_id=session_id, now=now,
                                     cohort=self._cohort, issuer="beach-rescue-load"), now + 300
        assert self._http is not None and self._endpoint is not None
        body: dict[str, str | bool] = {
            "session_id": session_id, "cohort_id": self._cohort,
            "client_version": "beach-rescue-load", "telemetry_opt_in": False}
        start = time.perf_counter()
        try:
            response = self._http.post(self._endpoint, json=body, timeout=HELLO_TIMEOUT_S,
                                       headers={"Authorization": f"Bearer {self._service_key}"})
            answer = response.json() if response.content else {}
            if response.status_code != 200 or not isinstance(answer.get("token"), str):
                error = answer.get("error", "no token") if isinstance(answer, dict) else "?"
                raise HelloFailed(f"control plane answered {response.status_code} {error}")
            token: str = answer["token"]
            expiry = float(jwt.decode(token, options={"verify_signature": False})["exp"])
        except (requests.RequestException, ValueError, KeyError, HelloFailed) as e:
            failure = e if isinstance(e, HelloFailed) else HelloFailed(f"token: {e}")
            report.fail("token", "control-plane", ms_since(start), failure)
            raise failure from None
        report.ok("token", "control-plane", ms_since(start), len(response.content))
        return token, expiry


_configs: dict[tuple[Any, ...], ClientConfig] = {}


def client_config(environment: Environment, host: str | None) -> ClientConfig:
    """Build (once per distinct setting) the client configuration from Locust's options.

    Raises :class:`TargetRefused`, :class:`SettingsError` (:class:`TokenKeyError` when the
    signing key cannot be read) or ``OSError`` (an unreadable service key file).
    """
    opts = environment.parsed_options

    def get(name: str) -> str | None:
        value = getattr(opts, name, None)
        return None if value is None or value == "" else str(value)

    values = values_from(opts)
    names = ("token_keys", "token_kid", "control_plane", "service_key", "service_key_file",
             "cohort")
    allow_remote = bool(getattr(opts, "allow_remote", False))
    cache_key = (host, allow_remote, *(get(n) for n in names),
                 *sorted((k, str(v)) for k, v in values.items()))
    if cache_key in _configs:
        return _configs[cache_key]
    url = relay_url(host, allow_remote)
    cohort = get("cohort") or "load"
    control_plane, key_file = get("control_plane"), get("service_key_file")
    if control_plane is not None:
        service_key = get("service_key")
        if service_key is None and key_file is not None:
            service_key = Path(key_file).read_text().partition("\n")[0].strip()
        if not service_key:
            raise SettingsError("--control-plane needs --service-key or --service-key-file")
        source = TokenSource(key=None, endpoint=control_plane_url(control_plane, allow_remote),
                             service_key=service_key, cohort=cohort)
    else:
        key_dir = get("token_keys")
        try:
            key = keys.load_signing_key(Path(key_dir) if key_dir else _dev_key_dir(),
                                        get("token_kid"))
        except keys.KeyStoreError as e:
            raise TokenKeyError(f"{e} (pass --token-keys DIR or --control-plane URL)") from None
        source = TokenSource(key=key, endpoint=None, service_key=None, cohort=cohort)
    config = ClientConfig(url, source, traffic_settings(values))
    _configs[cache_key] = config
    return config


def _dev_key_dir() -> Path:
    """The development key directory a relay started without ``--token-keys`` uses."""
    from rescue.config import load_config

    return load_config(None).resolved_state_dir() / keys.DEV_KEY_DIR_NAME


@events.init_command_line_parser.add_listener
def add_options(parser: Any) -> None:
    """Register ``--shape``, the target and token options, and every profile setting."""
    parser.add_argument(
        "--shape", choices=sorted(PROFILES), default=DEFAULT_PROFILE, env_var="BEACH_LOAD_SHAPE",
        help="load profile: " + "; ".join(f"{n}: {c.summary}" for n, c in PROFILES.items()))
    parser.add_argument(
        "--allow-remote", action="store_true", env_var="BEACH_LOAD_ALLOW_REMOTE",
        include_in_web_ui=False,
        help="allow a relay or control plane outside 127.0.0.0/8 (refused by default)")
    parser.add_argument(
        "--token-keys", metavar="DIR", env_var="BEACH_LOAD_TOKEN_KEYS", include_in_web_ui=False,
        help="mint tokens with the newest private key in DIR (default: the development keys "
             "of a relay started without --token-keys)")
    parser.add_argument("--token-kid", env_var="BEACH_LOAD_TOKEN_KID", include_in_web_ui=False,
                        help="key id to sign with (default: the newest key)")
    parser.add_argument(
        "--control-plane", metavar="URL", env_var="BEACH_LOAD_CONTROL_PLANE",
        include_in_web_ui=False,
        help="fetch tokens from this control plane's /v1/fallback/token instead of minting")
    parser.add_argument("--service-key", env_var="BEACH_LOAD_SERVICE_KEY",
                        include_in_web_ui=False, help="bearer service key for --control-plane")
    parser.add_argument("--service-key-file", metavar="PATH",
                        env_var="BEACH_LOAD_SERVICE_KEY_FILE", include_in_web_ui=False,
                        help="file whose first line is the service key")
    parser.add_argument("--cohort", default="load", env_var="BEACH_LOAD_COHORT",
                        include_in_web_ui=False, help="cohort of the tokens (default: load)")
    for param in all_params():
        parser.add_argument(param.option, dest=param.key, metavar="N", env_var=param.env,
                            include_in_web_ui=False,
                            help=f"{param.help} (default {param.default:g}, "
                                 f"{param.lo:g}..{param.hi:g})")


def check_targets(environment: Environment) -> None:
    """Raise :class:`TargetRefused` if ``--host`` or ``--control-plane`` may not be used."""
    opts = environment.parsed_options
    allow_remote = bool(getattr(opts, "allow_remote", False))
    relay_url(environment.host or IdleSession.host, allow_remote)
    control_plane = getattr(opts, "control_plane", None)
    if control_plane:
        control_plane_url(str(control_plane), allow_remote)


def choose_profile(environment: Environment) -> Profile:
    """Build the profile named by ``--shape`` from the options; raises SettingsError."""
    opts = environment.parsed_options
    run_time = getattr(opts, "run_time", None)
    return build_profile(getattr(opts, "shape", DEFAULT_PROFILE), values_from(opts),
                         run_time_s=float(run_time) if run_time else None)


class BeachShape(LoadTestShape):
    """Locust's load shape: the profile chosen with ``--shape``, ticked on Locust's clock.

    Returns the profile's sessions and spawn rate with the user class of its traffic, and
    broadcasts a storm message to every worker when the profile triggers a reconnect storm.
    """

    use_common_options = True  # --run-time caps the profile; -u/-r are reported as ignored

    def __init__(self) -> None:
        super().__init__()
        self.profile: Profile | None = None
        self.storms_sent = 0

    def reset_time(self) -> None:
        """Start over (Locust calls this when a test starts): the profile is built again
        from the options at the first tick, in case they were changed in the web UI."""
        super().reset_time()
        self.profile, self.storms_sent = None, 0

    def tick(self) -> tuple[int, float, list[Any]] | None:
        """The sessions wanted now, or None once the profile is over."""
        if self.profile is None:
            assert self.runner is not None
            self.profile = choose_profile(self.runner.environment)
        step = self.profile.at(self.get_run_time())
        if step is None:
            return None
        while self.storms_sent < step.storms and self.runner is not None:
            self.storms_sent += 1
            log.info("reconnect storm %d", self.storms_sent)
            self.runner.send_message(STORM_MESSAGE, {
                "storm": self.storms_sent,
                "spread_ms": self.profile.p.get("storm_spread_ms", 0)})
        return step.users, step.spawn_rate, [USER_CLASSES[step.traffic]]


def on_storm(environment: Environment, msg: Any, **_kwargs: Any) -> None:
    """Worker side of a storm: drop every session of this process, reconnect with jitter."""
    data = msg.data if isinstance(msg.data, dict) else {}
    spread_s = float(data.get("spread_ms", 0)) / 1000
    runner = environment.runner
    users = [g.args[0] for g in runner.user_greenlets] if runner is not None else []
    hit = sum(user.storm(spread_s) for user in users if isinstance(user, BeachSession))
    log.info("reconnect storm %s: dropped %d sessions", data.get("storm"), hit)


@events.init.add_listener
def on_init(environment: Environment, runner: Runner, **_kwargs: Any) -> None:
    """Register the storm message; on a master or a single process, refuse a non-loopback
    target or a bad setting before anything connects (exit status 2)."""
    if not isinstance(runner, MasterRunner):
        runner.register_message(STORM_MESSAGE, on_storm)
    if isinstance(runner, WorkerRunner):
        return  # workers take the master's options and host with each spawn message
    opts = environment.parsed_options
    try:
        check_targets(environment)
        profile = choose_profile(environment)
    except (TargetRefused, SettingsError) as e:
        log.error("beach-rescue load: %s", e)
        sys.exit(EXIT_REFUSED)
    try:
        client_config(environment, environment.host or IdleSession.host)
    except (SettingsError, OSError) as e:
        if not isinstance(runner, MasterRunner) or not isinstance(e, (TokenKeyError, OSError)):
            log.error("beach-rescue load: %s", e)
            sys.exit(EXIT_REFUSED)
        log.warning("beach-rescue load: %s (the workers need it, the master does not)", e)
    if getattr(opts, "num_users", None) is not None or getattr(opts, "spawn_rate", None):
        log.warning("-u/--users and -r/--spawn-rate are ignored: the %s profile sets the "
                    "sessions (see its BEACH_LOAD_* settings)", profile.name)
    log.info("profile %s: up to %d sessions, stops after %.0f s", profile.name,
             profile.peak_sessions(), profile.duration_s)


@events.test_start.add_listener
def on_test_start(environment: Environment, **_kwargs: Any) -> None:
    """Refuse a host changed after start-up (web UI) to one that is not allowed."""
    if isinstance(environment.runner, WorkerRunner):
        return
    try:
        check_targets(environment)
    except TargetRefused as e:
        log.error("beach-rescue load: %s", e)
        environment.process_exit_code = EXIT_REFUSED
        if environment.runner is not None:
            gevent.spawn(environment.runner.quit)


BeachSession.configure = client_config
