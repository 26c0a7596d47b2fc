"""Tests for rescue.peek: routing a connection by the ``session`` of its request line.

The reference for "the session the serving worker sees" is aiohttp itself: its request
parser (the one ``aiohttp.web`` uses) turns the bytes into ``request.url``, and
``request.query`` is that URL's query. The brief's simpler reference,
``yarl.URL("/ws?" + q).query``, is checked as well.
"""

from __future__ import annotations

import string
from unittest import mock

import pytest
import yarl
from aiohttp.http_exceptions import BadHttpMessage
from aiohttp.http_parser import HttpRequestParser, HttpRequestParserPy
from hypothesis import example, given, settings
from hypothesis import strategies as st

from rescue.peek import LOCAL, MAX_REQUEST_LINE, NEED_MORE, PeekResult, Route, route_request

PROPERTY = settings(deadline=None, max_examples=400)

SESSION_ALPHABET = string.ascii_letters + string.digits + "._-"
session_ids = st.text(SESSION_ALPHABET, min_size=1, max_size=128)


def verdict(session: str | None) -> PeekResult:
    """What route_request must answer for a request whose query gives ``session``."""
    return PeekResult(Route.SESSION, session) if session else LOCAL


def aiohttp_session(request_line: bytes) -> str | BadHttpMessage | None:
    """``request.query.get("session")`` as aiohttp's server parser computes it.

    Returns the parser's exception when aiohttp refuses the request (it answers 400
    wherever the connection lands, so its route does not matter).
    """
    parser = HttpRequestParser(mock.Mock(), None, 2**16)
    try:
        messages, _, _ = parser.feed_data(request_line + b"Host: relay\r\n\r\n")
    except BadHttpMessage as e:
        return e
    assert len(messages) == 1
    session: str | None = messages[0][0].url.query.get("session")
    return session


def yarl_session(query: str) -> str | None:
    """The brief's reference: yarl's decoding of ``/ws?<query>``."""
    session: str | None = yarl.URL("/ws?" + query).query.get("session")
    return session


# --- query strings for the property -----------------------------------------------------------
printable_ascii = st.sampled_from(
    [c for c in string.printable if c not in string.whitespace] + ["+", "+", "%", "="])
percent_byte = st.builds(lambda b, upper: f"%{b:02X}" if upper else f"%{b:02x}",
                         st.integers(0, 255), st.booleans())
percent_text = st.text(min_size=1, max_size=4).map(
    lambda t: "".join(f"%{b:02X}" for b in t.encode("utf-8", "surrogatepass")))
value_piece = st.one_of(
    st.sampled_from(["+", "%", "%2", "=", "?", "#", "/", "session=", "%26", "%3D", "%2B"]),
    printable_ascii, percent_byte, percent_text, session_ids)
values = st.lists(value_piece, max_size=6).map("".join)
names = st.sampled_from(["session", "session", "session", "token", "v", "", "Session",
                         "sess%69on", "%73ession", "session+", "+session", "session%00"])
pairs = st.one_of(st.builds("{}={}".format, names, values), names, values)
separators = st.sampled_from(["&", "&", "&", ";", "&&"])
structured_queries = st.lists(st.tuples(pairs, separators), max_size=5).map(
    lambda items: "".join(p + sep for p, sep in items)[:-1] if items else "")
# Rarely, characters aiohttp refuses in a request target (raw non-ASCII).
raw_unicode = st.characters(min_codepoint=0x80, exclude_categories=["Cs"])
garbled_queries = st.lists(st.one_of(value_piece, raw_unicode), max_size=8).map("".join)
queries = st.one_of(structured_queries, structured_queries, structured_queries,
                    garbled_queries)


@given(query=queries)
@PROPERTY
@example(query="session=abc")
@example(query="session=a+b%20c")
@example(query="token=t&session=x&session=y")
@example(query="session=&session=y")
@example(query="a=1;session=x")
@example(query="session=x;y=1")
@example(query="session=%E2%82%AC")
@example(query="session=%E2%82")
@example(query="session=%zz%")
@example(query="session=x#frag")
@example(query="#session=x")
@example(query="sess%69on=x")
@example(query="session=é")
def test_session_is_decoded_as_aiohttp_decodes_it(query: str) -> None:
    line = f"GET /ws?{query} HTTP/1.1\r\n".encode()
    routed = route_request(line)
    served = aiohttp_session(line)
    if isinstance(served, BadHttpMessage):
        # aiohttp refuses the request line wherever it lands: the route does not matter,
        # but the decision is still a verdict, never NEED_MORE on a complete line.
        assert routed.route is not Route.NEED_MORE
        return
    assert routed == verdict(served)
    assert routed == verdict(yarl_session(query))


@given(session=session_ids, before=st.sampled_from(["", "token=abc.def&", "v=1&"]),
       after=st.sampled_from(["", "&token=abc", "#x"]), crlf=st.booleans())
@settings(deadline=None, max_examples=60)
def test_every_prefix_of_a_request_line_needs_more(session: str, before: str, after: str,
                                                  crlf: bool) -> None:
    line = f"GET /ws?{before}session={session}{after} HTTP/1.1".encode()
    for end in range(len(line) + 1):
        assert route_request(line[:end]) is NEED_MORE, line[:end]
    if crlf:
        assert route_request(line + b"\r") is NEED_MORE
    full = line + (b"\r\n" if crlf else b"\n")
    assert route_request(full) == PeekResult(Route.SESSION, session)
    # what follows the request line (headers, even a body) never changes the verdict
    assert route_request(full + b"Host: x\r\nUpgrade: websocket\r\n\r\n") == \
        PeekResult(Route.SESSION, session)


def test_a_realistic_upgrade_is_routed() -> None:
    data = (b"GET /ws?session=Ab3.x-Y_9&token=eyJhbGciOiJFZERTQSJ9.e30.sig HTTP/1.1\r\n"
            b"Host: rescue.example\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    assert route_request(data) == PeekResult(Route.SESSION, "Ab3.x-Y_9")


def test_http_1_0_and_absolute_form_are_routed() -> None:
    assert route_request(b"GET /ws?session=s1 HTTP/1.0\r\n") == PeekResult(Route.SESSION, "s1")
    assert route_request(b"GET http://relay/ws?session=s2 HTTP/1.1\r\n") == \
        PeekResult(Route.SESSION, "s2")


@pytest.mark.parametrize("data", [
    pytest.param(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", id="no-query"),
    pytest.param(b"GET /ws?token=abc HTTP/1.1\r\n", id="no-session"),
    pytest.param(b"GET /ws?session= HTTP/1.1\r\n", id="empty-session"),
    pytest.param(b"GET /ws?session HTTP/1.1\r\n", id="session-without-value"),
    pytest.param(b"GET /ws?Session=x HTTP/1.1\r\n", id="other-case"),
    pytest.param(b"GET /ws?x=1#session=abc HTTP/1.1\r\n", id="session-in-fragment"),
    pytest.param(b"GET /ws?session=\xc3\xa9 HTTP/1.1\r\n", id="raw-utf8-in-target"),
    pytest.param(b"GET /ws?session=\xff HTTP/1.1\r\n", id="raw-byte-in-target"),
    pytest.param(b"GET /ws?session=a b HTTP/1.1\r\n", id="space-in-target"),
    pytest.param(b"GET /ws?session=x\r\n", id="http-0.9"),
    pytest.param(b"GET /ws?session=x FTP/1.1\r\n", id="not-http"),
    pytest.param(b"SSH-2.0-OpenSSH_9.6\r\n", id="ssh-banner"),
    pytest.param(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", id="h2-preface"),
    pytest.param(b"\r\n", id="empty-line"),
    pytest.param(b"\x00\x01\x02\n", id="binary"),
])
def test_requests_without_a_usable_session_stay_local(data: bytes) -> None:
    assert route_request(data) is LOCAL


def test_an_overlong_line_without_newline_stays_local() -> None:
    start = b"GET /ws?session=abc&pad="
    assert route_request(start + b"x" * (MAX_REQUEST_LINE - 1 - len(start))) is NEED_MORE
    assert route_request(start + b"x" * (MAX_REQUEST_LINE - len(start))) is LOCAL
    assert route_request(b"\x16\x03\x01" + b"\xab" * MAX_REQUEST_LINE) is LOCAL  # TLS-ish


def test_nothing_yet_needs_more() -> None:
    assert route_request(b"") is NEED_MORE


def test_a_line_just_under_the_limit_is_routed() -> None:
    head, tail = b"GET /ws?session=abc&pad=", b" HTTP/1.1\n"
    line = head + b"x" * (MAX_REQUEST_LINE - len(head) - len(tail)) + tail
    assert len(line) == MAX_REQUEST_LINE
    assert route_request(line) == PeekResult(Route.SESSION, "abc")


def test_a_complete_line_over_the_limit_stays_local() -> None:
    line = b"GET /ws?session=abc&pad=" + b"x" * MAX_REQUEST_LINE + b" HTTP/1.1\r\n"
    assert route_request(line) is LOCAL
    # the boundary: a newline at index MAX_REQUEST_LINE - 1 is within the limit, one
    # byte further is not, whatever follows
    head, tail = b"GET /ws?session=abc&pad=", b" HTTP/1.1\n"
    fits = head + b"x" * (MAX_REQUEST_LINE - len(head) - len(tail)) + tail
    over = head + b"x" * (MAX_REQUEST_LINE + 1 - len(head) - len(tail)) + tail
    assert len(fits) == MAX_REQUEST_LINE and len(over) == MAX_REQUEST_LINE + 1
    assert route_request(fits + b"Host: x\r\n") == PeekResult(Route.SESSION, "abc")
    assert route_request(over) is LOCAL
    assert route_request(over + b"Host: x\r\n\r\n") is LOCAL


def test_a_question_mark_inside_the_fragment_is_not_a_query() -> None:
    """The target is split at the first ``#`` before the query is looked for.

    That is RFC 3986's reading, yarl's, and aiohttp's pure-Python parser's. aiohttp's
    C parser (``HttpRequestParser`` when the extension is built, and what ``aiohttp.web``
    then uses) reads ``/ws#?session=x`` as path ``/ws#`` with query ``session=x``, so
    this one case is checked against the pure-Python parser; such a connection, served
    where it landed, is refused by the relay's ``owns`` check unless it landed on the
    session's owner.
    """
    line = b"GET /ws#?session=x HTTP/1.1\r\n"
    assert yarl.URL("/ws#?session=x").query.get("session") is None
    parser = HttpRequestParserPy(mock.Mock(), None, 2**16)
    messages, _, _ = parser.feed_data(line + b"Host: relay\r\n\r\n")
    assert messages[0][0].url.query.get("session") is None
    assert route_request(line) is LOCAL
    # a '?' before the fragment still starts the query; one after it adds nothing
    assert route_request(b"GET /ws?session=y#?session=x HTTP/1.1\r\n") == \
        PeekResult(Route.SESSION, "y")
    assert route_request(b"GET /ws?v=1#?session=x HTTP/1.1\r\n") is LOCAL
