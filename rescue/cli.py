"""The ``beach-rescue`` command: serve, control-plane, token, probe, connect and config."""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rescue import __version__
from rescue.config import Config, ConfigError, add_arguments, load_config, reference_markdown


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="beach-rescue", description=__doc__)
    parser.add_argument("--version", action="version", version=f"beach-rescue {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the relay (supervisor and workers)")
    add_arguments(serve)
    control_plane = commands.add_parser(
        "control-plane", help="run the token API alone (for a fleet of relay nodes)")
    add_arguments(control_plane)

    token = commands.add_parser("token", help="manage signing keys and mint tokens")
    token_commands = token.add_subparsers(dest="token_command", required=True)
    keygen = token_commands.add_parser("keygen", help="write a new Ed25519 key pair")
    keygen.add_argument("--out", metavar="DIR",
                        help="directory for <kid>.key and <kid>.pub "
                             "(default: the development key directory)")
    mint = token_commands.add_parser("mint", help="print a signed relay token")
    mint.add_argument("--session", required=True, help="session id (the `sid` claim)")
    mint.add_argument("--ttl", type=int, default=300, help="lifetime in seconds (max 300)")
    mint.add_argument("--cohort", default="public", help="cohort claim")
    mint.add_argument("--keys", metavar="DIR",
                      help="directory holding the private key (default: development keys)")
    mint.add_argument("--kid", help="key id to sign with (default: the newest key)")
    mint.add_argument("--cap", action="append",
                      help="capability claim, repeatable (default: fallback-ws)")
    mint.add_argument("--issuer", default="beach-rescue-cli", help="`iss` claim")

    probe = commands.add_parser(
        "probe", help="check a relay end to end (exit 0 ok, 3 no token, 4 refused, "
                      "5 protocol failure, 6 timeout)")
    probe.add_argument("--url", help="relay WebSocket URL, e.g. ws://127.0.0.1:9443/ws "
                                     "(default: the control plane's relay_url)")
    source = probe.add_mutually_exclusive_group()
    source.add_argument("--token", help="use this token (its `sid` is the session)")
    source.add_argument("--keys", metavar="DIR",
                        help="mint a token with the private key in DIR "
                             "(default: the development keys)")
    source.add_argument("--control-plane", metavar="URL",
                        help="get a token from this control plane's /v1/fallback/token")
    probe.add_argument("--kid", help="key id to sign with, with --keys (default: newest)")
    probe.add_argument("--service-key", help="bearer service key for --control-plane")
    probe.add_argument("--service-key-file", metavar="PATH",
                       help="file whose first line is the service key")
    probe.add_argument("--cohort", default="probe", help="cohort of the probe's tokens")
    probe.add_argument("--session", help="session id (default: probe-<random>)")
    probe.add_argument("--frames", type=int, default=10,
                       help="data frames and heartbeats each way (default 10)")
    probe.add_argument("--timeout", type=float, default=10.0,
                       help="seconds to wait for each answer (default 10)")
    probe_output = probe.add_mutually_exclusive_group()
    probe_output.add_argument("--json", action="store_true", help="print the result as JSON")
    probe_output.add_argument("--push-text", action="store_true",
                              help="print the result as Prometheus text (for a Pushgateway)")
    probe.add_argument("--metrics-file", metavar="PATH",
                       help="write the result as a Prometheus textfile-collector file")

    connect = commands.add_parser(
        "connect", help="netcat through the relay, end-to-end encrypted (exit 3 on a "
                        "channel failure)")
    from rescue.client.pipe import add_arguments as add_connect_arguments

    add_connect_arguments(connect)

    config = commands.add_parser("config", help="inspect the configuration")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    config_commands.add_parser("docs", help="print the Markdown configuration reference")
    check = config_commands.add_parser("check", help="validate settings and print them")
    add_arguments(check)
    return parser


_SECRET_SETTINGS = frozenset({"admin_key", "metrics_key", "service_keys"})
_URL_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^@/\s]+@")


def printable_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` with credentials replaced: the API keys, and passwords inside URLs."""
    out: dict[str, Any] = {}
    for name, value in settings.items():
        if name in _SECRET_SETTINGS and value:
            out[name] = "[redacted]"
        elif isinstance(value, str):
            out[name] = _URL_PASSWORD.sub(r"\1[redacted]@", value)
        else:
            out[name] = value
    return out


def _dev_key_dir(config: Config) -> Path:
    return config.resolved_state_dir() / "keys"


def _cmd_token(args: argparse.Namespace, config: Config) -> int:
    """Run ``token keygen`` or ``token mint``; key and argument errors exit with status 2."""
    from rescue import keys, tokens

    try:
        if args.token_command == "keygen":
            out = Path(args.out) if args.out else _dev_key_dir(config)
            print(keys.generate_keypair(out))
            return 0
        key_dir = (Path(args.keys) if args.keys
                   else keys.ensure_dev_keys(config.resolved_state_dir()))
        signing_key = keys.load_signing_key(key_dir, args.kid)
        token = tokens.mint_token(
            signing_key, session_id=args.session, now=time.time(), ttl_s=args.ttl,
            cohort=args.cohort, caps=tuple(args.cap or (tokens.CAP_FALLBACK_WS,)),
            issuer=args.issuer, audience=config.token_audience)
    except (keys.KeyStoreError, ValueError) as e:
        print(f"beach-rescue: {e}", file=sys.stderr)
        return 2
    print(token)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the process exit status."""
    args = _parser().parse_args(argv)
    try:
        config = load_config(args if args.command in ("serve", "control-plane", "config")
                             else None)
        if args.command == "serve":
            # Before anything imports prometheus_client: workers inherit the directory.
            from rescue.multiproc import (
                DirectoryBusy,
                claim_multiprocess_dir,
                prepare_multiprocess_dir,
            )

            try:
                claim_multiprocess_dir(config.resolved_metrics_dir())
            except DirectoryBusy as e:
                print(f"beach-rescue: {e}", file=sys.stderr)
                return 2
            prepare_multiprocess_dir(config.resolved_metrics_dir())
            from supervisor.main import serve

            return serve(config, lambda: load_config(args))
        if args.command == "control-plane":
            from rescue.controlplane.service import serve_control_plane

            return serve_control_plane(config)
        if args.command == "token":
            return _cmd_token(args, config)
        if args.command == "connect":
            from rescue.client.pipe import main as connect_main

            return connect_main(args, config.token_audience, config.resolved_state_dir())
        if args.command == "probe":
            from rescue.probe import run_command

            return run_command(args, config)
        if args.config_command == "docs":
            sys.stdout.write(reference_markdown())
            return 0
        import msgspec

        shown = printable_settings(msgspec.to_builtins(config))
        sys.stdout.write(msgspec.json.format(msgspec.json.encode(shown)).decode() + "\n")
        return 0
    except ConfigError as e:
        print(f"beach-rescue: {e}", file=sys.stderr)
        return 2
