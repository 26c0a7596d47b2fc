"""A real HAProxy in front of test relay nodes, from ``deploy/haproxy``'s test template.

The template is filled with OS-chosen free ports (a start that loses a port race is
retried on new ones), a throwaway self-signed certificate, a stats socket in a private
directory and one ``server`` line per node; ``haproxy -db`` runs in the foreground as a
child process, its output drained by a thread. Server states and counters come from the
stats socket (``show stat``), so tests wait on what HAProxy itself decided.
"""

from __future__ import annotations

import asyncio
import csv
import datetime
import ipaddress
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from string import Template
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from rescue.keys import SigningKey
from rescue.tokens import mint_token
from tests.support.observe import free_port

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
TEMPLATE = ROOT / "deploy" / "haproxy" / "haproxy.test.cfg.template"
START_TIMEOUT_S = 15.0
START_ATTEMPTS = 5
POLL_S = 0.02


def haproxy_binary() -> str | None:
    """The path of ``haproxy`` (PATH or /usr/sbin), or None when it is not installed."""
    return shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/sbin")


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """Write a throwaway certificate for 127.0.0.1/localhost; return (PEM with the key,
    for HAProxy; the certificate alone, for the client to trust)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "beach-rescue test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    bundle, alone = directory / "haproxy.pem", directory / "cert.pem"
    bundle.write_bytes(cert_pem + key_pem)
    bundle.chmod(0o600)
    alone.write_bytes(cert_pem)
    return bundle, alone


def render(template: str, **values: str) -> str:
    """``template`` with its ``${NAME}`` fields filled (every field must be given)."""
    return Template(template).substitute(values)


def show_stat(socket_path: Path, timeout_s: float = 2.0) -> list[dict[str, str]]:
    """``show stat`` over the stats socket, one dict per proxy/server row."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        sock.connect(str(socket_path))
        sock.sendall(b"show stat\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    text = b"".join(chunks).decode().lstrip("# ")
    return list(csv.DictReader(text.splitlines()))


class HAProxy:
    """One ``haproxy -db`` child in front of ``servers`` (name, port) on 127.0.0.1.

    Looks like a relay to the test peers: :meth:`ws_url` and :meth:`mint`.
    """

    def __init__(self, binary: str, servers: Sequence[tuple[str, int]],
                 signing_key: SigningKey) -> None:
        self.binary = binary
        self.servers = list(servers)
        self.signing_key = signing_key
        self.dir = Path(tempfile.mkdtemp(prefix="hap-", dir="/tmp"))  # short socket path
        self.stats_socket = self.dir / "stats.sock"
        self.cert_bundle, self.cert = self_signed_certificate(self.dir)
        self.config_path = self.dir / "haproxy.cfg"
        self.http_port = self.tls_port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.lines: list[str] = []
        self._thread: threading.Thread | None = None

    # --- life ------------------------------------------------------------------------------
    def start(self) -> None:
        """Start on fresh ports; return once every server is UP (or raise)."""
        for _ in range(START_ATTEMPTS):
            self.http_port, self.tls_port = free_port(), free_port()
            self.config_path.write_text(render(
                TEMPLATE.read_text(), STATS_SOCKET=str(self.stats_socket),
                HTTP_PORT=str(self.http_port), TLS_PORT=str(self.tls_port),
                CERT_PEM=str(self.cert_bundle),
                SERVERS="\n    ".join(f"server {name} 127.0.0.1:{port} id {i + 1}"
                                  for i, (name, port) in enumerate(self.servers))))
            self.proc = subprocess.Popen(
                [self.binary, "-db", "-f", str(self.config_path)], stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            self._thread = threading.Thread(target=self._drain, daemon=True)
            self._thread.start()
            if self._wait_up():
                return
        raise RuntimeError(f"haproxy did not start; output: {self.lines[-20:]}")

    def _drain(self) -> None:
        proc = self.proc
        assert proc is not None and proc.stdout is not None
        for raw in proc.stdout:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))

    def _wait_up(self) -> bool:
        """True once every server is UP; False if haproxy exited (a port was taken)."""
        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                if self._thread is not None:
                    self._thread.join(5)
                if self.proc.stdout is not None:
                    self.proc.stdout.close()
                return False
            try:
                if all(status == "UP" for status in self.statuses().values()):
                    return True
            except OSError:
                pass  # the stats socket is not there yet
            time.sleep(POLL_S)
        self.stop()
        raise RuntimeError(f"haproxy servers not all UP within {START_TIMEOUT_S}s: "
                           f"{self.lines[-20:]}")

    def stop(self) -> None:
        """Stop haproxy (SIGTERM, then SIGKILL) and remove its directory."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._thread is not None:
            self._thread.join(5)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # --- what HAProxy thinks ---------------------------------------------------------------
    def rows(self) -> dict[str, dict[str, str]]:
        """The backend's server rows of ``show stat``, by server name."""
        return {row["svname"]: row for row in show_stat(self.stats_socket)
                if row.get("pxname") == "relays" and row["svname"] not in
                ("FRONTEND", "BACKEND")}

    def statuses(self) -> dict[str, str]:
        """Each server's check status (``UP``, ``DOWN``, ``UP 1/2``, ...)."""
        return {name: row["status"] for name, row in self.rows().items()}

    def sessions_total(self, server: str) -> int:
        """Connections HAProxy has sent to ``server`` so far (``stot``; checks excluded)."""
        return int(self.rows()[server]["stot"] or 0)

    async def wait_status(self, server: str, status: str, within_s: float) -> float:
        """Wait until ``server``'s status is ``status``; return the loop time it was seen."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_s
        while True:
            seen = await asyncio.to_thread(self.statuses)
            if seen.get(server) == status:
                return loop.time()
            assert loop.time() < deadline, (f"{server} not {status} within {within_s}s: "
                                            f"{seen}")
            await asyncio.sleep(POLL_S)

    # --- the relay-like face -----------------------------------------------------------------
    def ws_url(self, session: str, token: str | None) -> str:
        """The frontend's plain URL for ``session`` (HAProxy routes on ``session``)."""
        url = f"http://127.0.0.1:{self.http_port}/ws?session={session}"
        return url + (f"&token={token}" if token is not None else "")

    def wss_url(self, session: str, token: str) -> str:
        """The frontend's TLS URL for ``session``."""
        return f"https://127.0.0.1:{self.tls_port}/ws?session={session}&token={token}"

    def client_ssl(self) -> ssl.SSLContext:
        """A client TLS context that trusts the throwaway certificate only."""
        return ssl.create_default_context(cafile=str(self.cert))

    def mint(self, session: str, *, ttl_s: int = 300, **claims: Any) -> str:
        """A token for ``session`` signed by the nodes' test key."""
        return mint_token(self.signing_key, session_id=session, now=time.time(),
                          ttl_s=ttl_s, **claims)
