"""Tests for supervisor.notify: sd_notify datagrams, received on a real AF_UNIX socket."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.notify import Notifier

RECV_TIMEOUT_S = 2.0
ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests run under whatever environment pytest got (maybe a systemd unit): clear it."""
    for name in ENV:
        monkeypatch.delenv(name, raising=False)


def receiver(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(RECV_TIMEOUT_S)
    return sock


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """A datagram socket bound to a file in tmp_path, like systemd's."""
    address = str(tmp_path / "notify")
    assert len(address) < 100, "AF_UNIX paths are limited to 108 bytes"
    sock = receiver(address)
    yield address, sock
    sock.close()


@pytest.fixture
def abstract_socket() -> Iterator[tuple[str, socket.socket]]:
    """A datagram socket in the abstract namespace; NOTIFY_SOCKET spells it ``@name``."""
    name = f"beach-rescue-test-{uuid.uuid4().hex}"
    sock = receiver("\0" + name)
    yield "@" + name, sock
    sock.close()


@pytest.fixture
def notifier(monkeypatch: pytest.MonkeyPatch, path_socket: tuple[str, socket.socket]
             ) -> Iterator[Notifier]:
    monkeypatch.setenv("NOTIFY_SOCKET", path_socket[0])
    n = Notifier()
    yield n
    n.close()


def received(sock: socket.socket) -> str:
    return sock.recv(65536).decode()


def assert_nothing_more(sock: socket.socket) -> None:
    """No datagram is queued (datagrams to a local socket are queued by sendto itself)."""
    sock.setblocking(False)
    try:
        with pytest.raises(BlockingIOError):
            sock.recv(65536)
    finally:
        sock.settimeout(RECV_TIMEOUT_S)


# --- not under systemd -------------------------------------------------------------------------
def test_without_notify_socket_everything_is_a_no_op() -> None:
    n = Notifier()
    assert not n.enabled
    assert n.address == ""
    assert n.watchdog_s is None
    assert n.ready("up") is False
    assert n.reloading() is False
    assert n.stopping() is False
    assert n.status("x") is False
    assert n.watchdog() is False
    assert n._sock is None  # no socket was even opened
    n.close()


def test_an_explicit_empty_address_wins_over_the_environment(
        monkeypatch: pytest.MonkeyPatch, path_socket: tuple[str, socket.socket]) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", path_socket[0])
    n = Notifier(address="")
    assert not n.enabled
    assert n.ready() is False
    assert_nothing_more(path_socket[1])


# --- the datagrams -------------------------------------------------------------------------------
def test_ready(notifier: Notifier, path_socket: tuple[str, socket.socket]) -> None:
    assert notifier.enabled
    assert notifier.ready() is True
    assert received(path_socket[1]) == "READY=1"
    assert notifier.ready("4/4 workers serving") is True
    assert received(path_socket[1]) == "READY=1\nSTATUS=4/4 workers serving"
    assert_nothing_more(path_socket[1])


def test_reloading_carries_the_monotonic_time(notifier: Notifier,
                                              path_socket: tuple[str, socket.socket]) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading() is True
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = received(path_socket[1]).split("\n")
    assert first == "RELOADING=1"
    key, _, value = second.partition("=")
    assert key == "MONOTONIC_USEC"
    assert value.isdigit()
    assert before <= int(value) <= after


def test_stopping_status_and_watchdog(notifier: Notifier,
                                      path_socket: tuple[str, socket.socket]) -> None:
    sock = path_socket[1]
    assert notifier.stopping() is True
    assert received(sock) == "STOPPING=1"
    assert notifier.status("2/4 workers serving, 10 connections") is True
    assert received(sock) == "STATUS=2/4 workers serving, 10 connections"
    assert notifier.watchdog() is True
    assert received(sock) == "WATCHDOG=1"
    assert_nothing_more(sock)


def test_an_abstract_address(monkeypatch: pytest.MonkeyPatch,
                             abstract_socket: tuple[str, socket.socket]) -> None:
    address, sock = abstract_socket
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    n = Notifier()
    try:
        assert n.ready("up") is True
        assert received(sock) == "READY=1\nSTATUS=up"
        assert n.watchdog() is True
        assert received(sock) == "WATCHDOG=1"
    finally:
        n.close()


def test_an_explicit_address_wins_over_the_environment(
        monkeypatch: pytest.MonkeyPatch, path_socket: tuple[str, socket.socket],
        abstract_socket: tuple[str, socket.socket]) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", path_socket[0])
    n = Notifier(address=abstract_socket[0])
    try:
        assert n.stopping() is True
        assert received(abstract_socket[1]) == "STOPPING=1"
        assert_nothing_more(path_socket[1])
    finally:
        n.close()


def test_an_unreachable_socket_is_reported_not_raised(tmp_path: Path) -> None:
    n = Notifier(address=str(tmp_path / "nobody-listens"))
    try:
        assert n.enabled
        assert n.ready() is False
        assert n.watchdog() is False
    finally:
        n.close()


def test_close_then_send_reopens(notifier: Notifier,
                                 path_socket: tuple[str, socket.socket]) -> None:
    assert notifier.status("a") is True
    notifier.close()
    assert notifier._sock is None
    notifier.close()  # idempotent
    assert notifier.status("b") is True
    assert [received(path_socket[1]), received(path_socket[1])] == ["STATUS=a", "STATUS=b"]


def test_the_socket_is_opened_once_and_not_inherited(
        notifier: Notifier, path_socket: tuple[str, socket.socket]) -> None:
    notifier.status("one")
    sock = notifier._sock
    assert sock is not None
    assert not sock.get_inheritable()
    assert os.get_inheritable(sock.fileno()) is False
    notifier.status("two")
    assert notifier._sock is sock
    assert [received(path_socket[1]), received(path_socket[1])] == ["STATUS=one", "STATUS=two"]


# --- watchdog -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("usec", "pid", "expected"), [
    pytest.param("3000000", None, 3.0, id="usec"),
    pytest.param("500", None, 0.0005, id="tiny"),
    pytest.param("20000000", "self", 20.0, id="pid-is-us"),
    pytest.param("20000000", "other", None, id="pid-is-another"),
    pytest.param("", None, None, id="empty"),
    pytest.param("abc", None, None, id="garbage"),
    pytest.param("-5", None, None, id="negative"),
    pytest.param("1.5", None, None, id="fraction"),
    pytest.param("0", None, None, id="zero"),
    pytest.param("0", "self", None, id="zero-pid-is-us"),
    pytest.param("000", None, None, id="zeros"),
    pytest.param("²", None, None, id="superscript-digit"),  # str.isdigit() says yes
    pytest.param("٣", None, None, id="arabic-indic-digit"),  # int() would take it as 3
    pytest.param("3000000²", None, None, id="digits-then-superscript"),
])
def test_watchdog_interval_from_the_environment(monkeypatch: pytest.MonkeyPatch, usec: str,
                                                pid: str | None, expected: float | None
                                                ) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid is not None:
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() if pid == "self"
                                               else os.getpid() + 1))
    watchdog_s = Notifier().watchdog_s
    if expected is None:
        assert watchdog_s is None
    else:
        assert watchdog_s == expected


def test_no_watchdog_without_watchdog_usec(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert Notifier().watchdog_s is None


def test_watchdog_zero_disables_petting(monkeypatch: pytest.MonkeyPatch) -> None:
    """systemd treats WATCHDOG_USEC=0 as "no watchdog"; the arbiter pets only when truthy."""
    monkeypatch.setenv("WATCHDOG_USEC", "0")
    assert Notifier().watchdog_s is None
