"""Tests for rescue.config: defaults, sources and their precedence, validation messages, docs."""

from __future__ import annotations

import argparse
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
import pytest

from rescue import cli
from rescue.config import (
    CONFIG_FILE_ENV,
    Config,
    ConfigError,
    add_arguments,
    load_config,
    reference_markdown,
    settings,
)

REPO = Path(__file__).resolve().parents[2]
FIELDS = [f.name for f in msgspec.inspect.type_info(Config).fields]  # type: ignore[attr-defined]


def parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def write_toml(path: Path, values: dict[str, Any]) -> Path:
    lines = []
    for key, value in values.items():
        if isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        elif isinstance(value, str):
            lines.append(f"{key} = {json.dumps(value)}")
        else:
            lines.append(f"{key} = {value!r}")
    path.write_text("\n".join(lines) + "\n")
    return path


def config_error(**kwargs: Any) -> str:
    kwargs.setdefault("environ", {})
    with pytest.raises(ConfigError) as info:
        load_config(**kwargs)
    return str(info.value)


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the developer's own BEACH_RESCUE_* variables out of tests that read os.environ."""
    import os

    for name in list(os.environ):
        if name.startswith("BEACH_RESCUE_"):
            monkeypatch.delenv(name)


# --- defaults -----------------------------------------------------------------------------

def test_defaults_load_without_any_source() -> None:
    config = load_config(environ={})
    assert config == Config()
    assert load_config(parse([]), environ={}) == Config()


def test_defaults_match_the_protocol() -> None:
    config = load_config(environ={})
    assert config.max_participants == 8
    assert config.max_message_bytes == 64 * 1024 + 8
    assert config.handshake_timeout_s == 5.0
    assert config.heartbeat_s == 15.0
    assert config.missed_heartbeats == 3
    assert config.token_leeway_s == 30.0
    assert config.token_max_lifetime_s == 300
    assert config.token_audience == "beach-rescue"
    assert config.entitlement_checks is True
    assert config.write_low_water_bytes < config.write_high_water_bytes


def test_settings_cover_every_field_in_order() -> None:
    assert [s.name for s in settings()] == FIELDS
    defaults = Config()
    for s in settings():
        assert s.default == getattr(defaults, s.name)
        assert s.description, f"{s.name} has no description"
        assert s.env == "BEACH_RESCUE_" + s.name.upper()
        assert s.flag == "--" + s.name.replace("_", "-")


# --- environment --------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "raw", "value"), [
    ("port", "8080", 8080),
    ("port", "0", 0),
    ("workers", "4", 4),
    ("token_leeway_s", "1.5", 1.5),
    ("token_leeway_s", "7", 7.0),
    ("session_grace_s", "0", 0.0),
    ("rate_bytes_per_s", "1e6", 1e6),
    ("entitlement_checks", "true", True),
    ("entitlement_checks", "false", False),
    ("entitlement_checks", "1", True),
    ("entitlement_checks", "0", False),
    ("host", "0.0.0.0", "0.0.0.0"),
    ("token_issuer", "control-plane", "control-plane"),
    ("log_level", "debug", "debug"),
])
def test_environment_strings_are_converted(name: str, raw: str, value: object) -> None:
    config = load_config(environ={"BEACH_RESCUE_" + name.upper(): raw})
    assert getattr(config, name) == value
    assert type(getattr(config, name)) is type(value)


@pytest.mark.parametrize(("name", "raw"), [
    ("port", "http"), ("port", "1.5"), ("port", ""), ("workers", "two"),
    ("token_leeway_s", "soon"), ("token_leeway_s", "nan"),
    ("entitlement_checks", "maybe"), ("entitlement_checks", ""), ("entitlement_checks", "2"),
    ("log_level", "loud"), ("log_level", "INFO"),
])
def test_environment_value_of_the_wrong_type_is_refused(name: str, raw: str) -> None:
    env = "BEACH_RESCUE_" + name.upper()
    message = config_error(environ={env: raw})
    assert f"invalid setting `{name}` (from environment {env})" in message


def test_error_message_names_field_and_environment_variable() -> None:
    message = config_error(environ={"BEACH_RESCUE_MAX_PARTICIPANTS": "0"})
    assert message.startswith(
        "invalid setting `max_participants` (from environment BEACH_RESCUE_MAX_PARTICIPANTS)")
    assert ">= 1" in message


def test_unknown_environment_variable_is_logged_not_fatal(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="rescue.config"):
        config = load_config(environ={"BEACH_RESCUE_MAX_PARTICIPANT": "3",
                                      "BEACH_RESCUE_PORT": "1234"})
    assert config.port == 1234
    assert config.max_participants == 8
    records = [r for r in caplog.records if r.getMessage() == "config.unknown_env"]
    assert len(records) == 1
    assert records[0].fields == {"names": ["BEACH_RESCUE_MAX_PARTICIPANT"]}  # type: ignore[attr-defined]


def test_config_file_variable_is_not_reported_as_unknown(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_toml(tmp_path / "c.toml", {"port": 1})
    with caplog.at_level(logging.WARNING, logger="rescue.config"):
        assert load_config(environ={CONFIG_FILE_ENV: str(path)}).port == 1
    assert not [r for r in caplog.records if r.getMessage() == "config.unknown_env"]


# --- TOML file ----------------------------------------------------------------------------

def test_toml_file_from_the_flag(tmp_path: Path) -> None:
    path = write_toml(tmp_path / "relay.toml", {
        "port": 7000, "token_leeway_s": 2.5, "entitlement_checks": False, "log_level": "error",
        "token_issuer": "cp"})
    config = load_config(parse(["--config", str(path)]), environ={})
    assert (config.port, config.token_leeway_s, config.entitlement_checks,
            config.log_level, config.token_issuer) == (7000, 2.5, False, "error", "cp")


def test_toml_file_from_the_environment(tmp_path: Path) -> None:
    path = write_toml(tmp_path / "relay.toml", {"max_participants": 4})
    assert load_config(environ={CONFIG_FILE_ENV: str(path)}).max_participants == 4


def test_config_flag_wins_over_the_config_file_variable(tmp_path: Path) -> None:
    from_env = write_toml(tmp_path / "env.toml", {"max_participants": 4})
    from_flag = write_toml(tmp_path / "flag.toml", {"max_participants": 5})
    config = load_config(parse(["--config", str(from_flag)]),
                         environ={CONFIG_FILE_ENV: str(from_env)})
    assert config.max_participants == 5


def test_toml_integer_for_a_float_setting_is_accepted(tmp_path: Path) -> None:
    path = write_toml(tmp_path / "c.toml", {"heartbeat_s": 20})
    assert load_config(parse(["--config", str(path)]), environ={}).heartbeat_s == 20.0


def test_unknown_toml_key_is_refused_with_the_path(tmp_path: Path) -> None:
    path = write_toml(tmp_path / "c.toml", {"port": 1, "max_participant": 3})
    message = config_error(args=parse(["--config", str(path)]))
    assert str(path) in message
    assert "unknown setting `max_participant`" in message


def test_toml_table_is_refused_as_an_unknown_key(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[server]\nport = 1\n")
    message = config_error(args=parse(["--config", str(path)]))
    assert "unknown setting `server`" in message and str(path) in message


def test_missing_toml_file_is_refused_with_the_path(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    message = config_error(args=parse(["--config", str(path)]))
    assert message.startswith(f"cannot read config file {path}")
    message = config_error(environ={CONFIG_FILE_ENV: str(path)})
    assert str(path) in message


def test_unreadable_toml_path_is_refused_with_the_path(tmp_path: Path) -> None:
    message = config_error(args=parse(["--config", str(tmp_path)]))  # a directory
    assert str(tmp_path) in message
    assert "cannot read config file" in message


@pytest.mark.parametrize("text", ["port = \n", "port = 1\nport = 2\n", "[[\n", "port: 1\n",
                                  "\xff = 1\n"])
def test_invalid_toml_is_refused_with_the_path(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text, encoding="utf-8")
    message = config_error(args=parse(["--config", str(path)]))
    assert f"config file {path} is not valid TOML" in message


def test_toml_value_error_names_the_file(tmp_path: Path) -> None:
    path = write_toml(tmp_path / "c.toml", {"max_participants": "eight"})
    message = config_error(args=parse(["--config", str(path)]))
    assert f"invalid setting `max_participants` (from config file {path})" in message


# --- command line and precedence ----------------------------------------------------------

def test_flags_are_converted() -> None:
    config = load_config(parse(["--port", "1234", "--token-leeway-s", "0.5",
                                "--no-entitlement-checks", "--log-level", "warning",
                                "--max-connections-per-session", "20"]), environ={})
    assert (config.port, config.token_leeway_s, config.entitlement_checks, config.log_level,
            config.max_connections_per_session) == (1234, 0.5, False, "warning", 20)


def test_every_setting_has_a_flag() -> None:
    args = parse([])
    assert args.config is None
    for name in FIELDS:
        assert getattr(args, name) is None  # unset flags do not shadow lower sources


def test_precedence_defaults_toml_env_cli(tmp_path: Path) -> None:
    path = write_toml(tmp_path / "c.toml", {"port": 1000, "workers": 2, "heartbeat_s": 20.0,
                                             "entitlement_checks": False})
    env = {"BEACH_RESCUE_PORT": "2000", "BEACH_RESCUE_WORKERS": "3",
           "BEACH_RESCUE_ENTITLEMENT_CHECKS": "true"}
    config = load_config(parse(["--config", str(path), "--port", "3000"]), environ=env)
    assert config.port == 3000  # flag over environment over file
    assert config.workers == 3  # environment over file
    assert config.heartbeat_s == 20.0  # file over default
    assert config.entitlement_checks is True  # environment over file
    assert config.max_participants == 8  # default
    config = load_config(parse(["--config", str(path)]), environ=env)
    assert config.port == 2000
    config = load_config(parse(["--config", str(path)]), environ={})
    assert (config.port, config.workers, config.entitlement_checks) == (1000, 2, False)


def test_bool_flags_override_the_environment_both_ways() -> None:
    on = {"BEACH_RESCUE_ENTITLEMENT_CHECKS": "true"}
    off = {"BEACH_RESCUE_ENTITLEMENT_CHECKS": "false"}
    assert load_config(parse(["--no-entitlement-checks"]), environ=on).entitlement_checks is False
    assert load_config(parse(["--entitlement-checks"]), environ=off).entitlement_checks is True
    assert load_config(parse([]), environ=off).entitlement_checks is False


def test_overrides_win_over_flags() -> None:
    config = load_config(parse(["--port", "1"]), environ={"BEACH_RESCUE_PORT": "2"},
                         overrides={"port": 3})
    assert config.port == 3
    assert "(from override)" in config_error(overrides={"port": -1})


def test_source_named_is_the_one_whose_value_won(tmp_path: Path) -> None:
    path = write_toml(tmp_path / "c.toml", {"port": 70000})
    env = {"BEACH_RESCUE_PORT": "80000"}
    assert "(from flag --port)" in config_error(
        args=parse(["--config", str(path), "--port", "90000"]), environ=env)
    assert "(from environment BEACH_RESCUE_PORT)" in config_error(
        args=parse(["--config", str(path)]), environ=env)
    assert f"(from config file {path})" in config_error(args=parse(["--config", str(path)]))


# --- every invalid value names its field and source ---------------------------------------

def _bounds(name: str) -> tuple[msgspec.inspect.Type, dict[str, Any]]:
    info = msgspec.inspect.type_info(Config)
    assert isinstance(info, msgspec.inspect.StructType)
    field = next(f for f in info.fields if f.name == name)
    t = field.type
    if isinstance(t, msgspec.inspect.Metadata):
        t = t.type
    attrs = ("ge", "gt", "le", "lt", "min_length", "max_length")
    return t, {a: getattr(t, a) for a in attrs if getattr(t, a, None) is not None}


def invalid_values(name: str) -> list[Any]:
    """Typed values that break ``name``'s declared type or constraints, independently derived."""
    t, bounds = _bounds(name)
    out: list[Any] = []
    if isinstance(t, msgspec.inspect.IntType):
        out += ["many", 1.5]
        step: float = 1
    elif isinstance(t, msgspec.inspect.FloatType):
        out += ["soon", float("nan")]
        step = 0.5
    elif isinstance(t, msgspec.inspect.BoolType):
        out += ["maybe", 7]
    elif isinstance(t, msgspec.inspect.LiteralType):
        out += ["nope", 3]
    if "ge" in bounds:
        out.append(bounds["ge"] - step)
    if "gt" in bounds:
        out.append(bounds["gt"])
    if "le" in bounds:
        out.append(bounds["le"] + step)
    if "lt" in bounds:
        out.append(bounds["lt"])
    if "min_length" in bounds:
        out.append("")
    return out


@pytest.mark.parametrize("name", FIELDS)
def test_every_invalid_value_names_field_and_source(name: str, tmp_path: Path) -> None:
    setting = next(s for s in settings() if s.name == name)
    bad_values = invalid_values(name)
    if not bad_values:
        assert setting.type_name == "str" and not setting.constraints
        assert getattr(load_config(environ={setting.env: "any text"}), name) == "any text"
        return
    for i, value in enumerate(bad_values):
        raw = str(value).lower() if isinstance(value, bool) else str(value)
        message = config_error(environ={setting.env: raw})
        assert f"invalid setting `{name}` (from environment {setting.env})" in message, value
        path = write_toml(tmp_path / f"bad{i}.toml", {name: value})  # TOML has nan too
        message = config_error(args=parse(["--config", str(path)]))
        assert f"invalid setting `{name}` (from config file {path})" in message, value
        if not setting.is_bool:
            message = config_error(args=parse([setting.flag, raw]))
            assert f"invalid setting `{name}` (from flag {setting.flag})" in message, value


# --- cross-field checks -------------------------------------------------------------------

@pytest.mark.parametrize("low", [262144, 300000])
def test_low_water_at_or_above_high_water_is_refused(low: int) -> None:
    message = config_error(environ={"BEACH_RESCUE_WRITE_LOW_WATER_BYTES": str(low)})
    assert "write_low_water_bytes" in message and "write_high_water_bytes" in message


def test_low_water_just_below_high_water_is_accepted() -> None:
    config = load_config(environ={"BEACH_RESCUE_WRITE_HIGH_WATER_BYTES": "4096",
                                  "BEACH_RESCUE_WRITE_LOW_WATER_BYTES": "4095"})
    assert (config.write_low_water_bytes, config.write_high_water_bytes) == (4095, 4096)


def test_drain_window_longer_than_the_drain_deadline_is_refused() -> None:
    message = config_error(environ={"BEACH_RESCUE_DRAIN_TIMEOUT_S": "3",
                                    "BEACH_RESCUE_DRAIN_WINDOW_S": "3.5"})
    assert "drain_window_s" in message and "drain_timeout_s" in message
    config = load_config(environ={"BEACH_RESCUE_DRAIN_TIMEOUT_S": "3",
                                  "BEACH_RESCUE_DRAIN_WINDOW_S": "3"})
    assert config.drain_window_s == config.drain_timeout_s == 3.0


def test_cross_field_check_applies_to_toml_values(tmp_path: Path) -> None:
    path = write_toml(tmp_path / "c.toml", {"write_high_water_bytes": 2048,
                                             "write_low_water_bytes": 4096})
    message = config_error(args=parse(["--config", str(path)]))
    assert "write_low_water_bytes" in message


def test_cross_field_error_names_the_source() -> None:
    message = config_error(environ={"BEACH_RESCUE_WRITE_LOW_WATER_BYTES": "300000"})
    assert "environment BEACH_RESCUE_WRITE_LOW_WATER_BYTES" in message
    assert "`write_low_water_bytes` from environment BEACH_RESCUE_WRITE_LOW_WATER_BYTES" in message
    assert "(300000 >= 262144)" in message


def test_cross_field_error_names_every_source_that_took_part(tmp_path: Path) -> None:
    path = write_toml(tmp_path / "c.toml", {"write_high_water_bytes": 2048})
    message = config_error(args=parse(["--config", str(path), "--write-low-water-bytes",
                                       "4096"]))
    assert f"`write_high_water_bytes` from config file {path}" in message
    assert "`write_low_water_bytes` from flag --write-low-water-bytes" in message


def test_connection_limit_must_leave_room_for_a_reconnect() -> None:
    # A full session (host + 8 participants) plus one reconnect's handshake needs 10 slots.
    message = config_error(environ={"BEACH_RESCUE_MAX_PARTICIPANTS": "8",
                                    "BEACH_RESCUE_MAX_CONNECTIONS_PER_SESSION": "9"})
    assert "max_connections_per_session" in message
    assert "max_participants + 2 = 10, got 9" in message
    assert ("`max_connections_per_session` from environment "
            "BEACH_RESCUE_MAX_CONNECTIONS_PER_SESSION") in message
    assert "`max_participants` from environment BEACH_RESCUE_MAX_PARTICIPANTS" in message
    # The participant limit must be reachable with the default connection limit too.
    message = config_error(environ={"BEACH_RESCUE_MAX_PARTICIPANTS": "1024"})
    assert "max_participants + 2 = 1026, got 16" in message
    config = load_config(environ={"BEACH_RESCUE_MAX_PARTICIPANTS": "8",
                                  "BEACH_RESCUE_MAX_CONNECTIONS_PER_SESSION": "10"})
    assert config.max_connections_per_session == config.max_participants + 2


def test_cross_field_error_names_only_the_settings_involved() -> None:
    message = config_error(environ={"BEACH_RESCUE_MAX_CONNECTIONS_PER_SESSION": "9",
                                    "BEACH_RESCUE_MAX_CONNECTIONS": "100"})
    assert "`max_connections_per_session` from environment" in message
    assert "`max_connections` from" not in message


# --- reference docs -----------------------------------------------------------------------

def test_reference_lists_every_setting() -> None:
    text = reference_markdown()
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(rows) == len(FIELDS)
    defaults = Config()
    for row, s in zip(rows, settings(), strict=True):
        assert row.startswith(f"| `{s.name}` |")
        assert f"`{s.env}`" in row
        assert f"`{s.flag}`" in row
        assert f"`{getattr(defaults, s.name)!r}`" in row
        assert s.description in row
    assert CONFIG_FILE_ENV in text


def test_reference_shows_constraints() -> None:
    rows = {line.split("`")[1]: line for line in reference_markdown().splitlines()
            if line.startswith("| `")}
    assert ">= 0, <= 65535" in rows["port"]
    assert "> 0" in rows["handshake_timeout_s"]
    for level in ("debug", "info", "warning", "error"):
        assert f"'{level}'" in rows["log_level"]


def table_cells(row: str) -> list[str]:
    """Split a GitHub-flavoured Markdown table row on its unescaped pipes."""
    return [c.strip() for c in re.split(r"(?<!\\)\|", row.strip())[1:-1]]


def test_table_header_has_six_columns() -> None:
    header = next(line for line in reference_markdown().splitlines() if line.startswith("| "))
    assert table_cells(header) == ["setting", "env / flag", "type", "default", "constraints",
                                   "meaning"]


def test_every_table_row_has_six_cells() -> None:
    rows = [line for line in reference_markdown().splitlines() if line.startswith("| `")]
    assert rows
    for row in rows:
        assert len(table_cells(row)) == 6, row
    log_level = next(row for row in rows if row.startswith("| `log_level` |"))
    assert table_cells(log_level)[2] == r"'debug' \| 'error' \| 'info' \| 'warning'"


def test_docs_configuration_md_is_the_generated_reference() -> None:
    path = REPO / "docs" / "configuration.md"
    assert path.read_text(encoding="utf-8") == reference_markdown(), (
        "docs/configuration.md is stale: run `beach-rescue config docs > docs/configuration.md`")


# --- beach-rescue config check / docs -----------------------------------------------------

def test_config_check_refuses_a_bad_port(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["config", "check", "--port", "99999"]) == 2
    captured = capsys.readouterr()
    assert "invalid setting `port` (from flag --port)" in captured.err
    assert captured.out == ""


def test_config_check_prints_the_effective_settings(capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BEACH_RESCUE_WORKERS", "3")
    assert cli.main(["config", "check", "--port", "8080"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["port"] == 8080
    assert printed["workers"] == 3
    assert set(printed) == set(FIELDS)


def test_config_check_reports_a_bad_environment_value(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BEACH_RESCUE_HEARTBEAT_S", "-1")
    assert cli.main(["config", "check"]) == 2
    assert "(from environment BEACH_RESCUE_HEARTBEAT_S)" in capsys.readouterr().err


def test_config_docs_prints_the_reference(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["config", "docs"]) == 0
    assert capsys.readouterr().out == reference_markdown()
