"""A small loopback HTTP proxy that injects faults (503s, connection resets, truncated bodies).

Put it in front of the storage emulator (point STORAGE_EMULATOR_HOST at it) to exercise retries.
The Host header is forwarded unchanged, so URLs the emulator builds (mediaLink, resumable upload
Location) point back at the proxy.
"""

from __future__ import annotations

import http.client
import json
import logging
import random
import socket
import struct
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
MAX_BODY_BYTES = 64 << 20
MAX_CONCURRENT = 16
UPSTREAM_TIMEOUT_S = 30.0
CLIENT_TIMEOUT_S = 30.0
POLL_INTERVAL_S = 0.05
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "content-length",
    }
)


FATES = frozenset({"503", "reset", "truncate"})


@dataclass
class _PlannedFault:
    """fault_next's rule: `fate` for the next `times` requests of `method` (any if None) containing `contains`."""

    fate: str
    method: str | None
    contains: str
    times: int


@dataclass
class FaultStats:
    """What the proxy saw: every request line, and how many of each fault it injected."""

    requests: list[tuple[str, str]] = field(default_factory=list)
    injected_503: int = 0
    injected_resets: int = 0
    injected_truncations: int = 0
    forwarded: int = 0

    def count(self, method: str | None = None, contains: str = "") -> int:
        """Requests (of `method`, whose path contains `contains`) that reached the proxy."""
        return sum(1 for m, p in self.requests if (method is None or m == method) and contains in p)


class FaultProxy:
    """Threaded proxy on 127.0.0.1:<free port> forwarding to `upstream` ("host:port") with seeded faults."""

    def __init__(
        self,
        upstream: str,
        *,
        fail_rate: float = 0.0,
        reset_rate: float = 0.0,
        truncate_rate: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.upstream_host, port = upstream.rsplit(":", 1)
        self.upstream_port = int(port)
        self.fail_rate = fail_rate
        self.reset_rate = reset_rate
        self.truncate_rate = truncate_rate
        self.fail_pattern: bytes | None = None  # always 503 requests whose path or body contains this
        self._planned: list[_PlannedFault] = []
        self.stats = FaultStats()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(MAX_CONCURRENT)
        self._server = _QuietServer((LOOPBACK, 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": POLL_INTERVAL_S},
            name="faultproxy",
            daemon=True,
        )

    @property
    def host(self) -> str:
        """http://127.0.0.1:PORT (what STORAGE_EMULATOR_HOST should be set to)."""
        return f"http://{LOOPBACK}:{self._server.server_address[1]}"

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def set_rates(
        self, *, fail_rate: float = 0.0, reset_rate: float = 0.0, truncate_rate: float = 0.0
    ) -> None:
        with self._lock:
            self.fail_rate, self.reset_rate, self.truncate_rate = fail_rate, reset_rate, truncate_rate

    def fault_next(self, fate: str, *, method: str | None = None, contains: str = "", times: int = 1) -> None:
        """Give the next `times` requests (of `method`, whose path contains `contains`) `fate`: "503", "reset" or
        "truncate" (forwarded, then the answer cut in half); before the random faults."""
        if fate not in FATES:
            raise ValueError(f"fate {fate!r} is not one of {sorted(FATES)}")
        with self._lock:
            self._planned.append(_PlannedFault(fate, method, contains, times))

    def _planned_fate(self, method: str, path: str) -> str | None:
        for planned in self._planned:
            if planned.times > 0 and (planned.method is None or planned.method == method) and planned.contains in path:
                planned.times -= 1
                return planned.fate
        return None

    def _decide(self, method: str, path: str, body: bytes) -> str:
        with self._lock:
            self.stats.requests.append((method, path))
            planned = self._planned_fate(method, path)
            if planned is not None:
                self._count_fault(planned)
                return planned
            pattern = self.fail_pattern
            if pattern is not None and (pattern in path.encode() or pattern in body):
                self.stats.injected_503 += 1
                return "503"
            roll = self._rng.random()
            if roll < self.fail_rate:
                self.stats.injected_503 += 1
                return "503"
            roll -= self.fail_rate
            if roll < self.reset_rate:
                self.stats.injected_resets += 1
                return "reset"
            roll -= self.reset_rate
            if roll < self.truncate_rate:
                self.stats.injected_truncations += 1
                return "truncate"
            self.stats.forwarded += 1
            return "forward"

    def _count_fault(self, fate: str) -> None:
        if fate == "503":
            self.stats.injected_503 += 1
        elif fate == "reset":
            self.stats.injected_resets += 1
        else:
            self.stats.injected_truncations += 1

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # else headers + body as two segments hit the 40 ms delayed ACK
            timeout = CLIENT_TIMEOUT_S

            def _handle(self) -> None:
                with proxy._slots:
                    body = self._read_body()
                    fate = proxy._decide(self.command, self.path, body)
                    if fate == "503":
                        self._reply(503, {"Content-Type": "application/json"}, _error_body(503))
                    elif fate == "reset":
                        self._reset()
                    else:
                        status, headers, payload = self._forward(body)
                        if fate == "truncate" and len(payload) > 1:
                            self._reply(
                                status, headers, payload, declared=len(payload), cut=len(payload) // 2
                            )
                        else:
                            self._reply(status, headers, payload)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

            def _read_body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    total = 0
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            self.rfile.readline()
                            return b"".join(chunks)
                        total += size
                        if total > MAX_BODY_BYTES:
                            raise ValueError("request body too large for the test proxy")
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_BODY_BYTES:
                    raise ValueError("request body too large for the test proxy")
                return self.rfile.read(length) if length else b""

            def _forward(self, body: bytes) -> tuple[int, dict[str, str], bytes]:
                conn = http.client.HTTPConnection(
                    proxy.upstream_host, proxy.upstream_port, timeout=UPSTREAM_TIMEOUT_S
                )
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                    if body or self.command in ("POST", "PUT", "PATCH"):
                        headers["Content-Length"] = str(len(body))
                    try:
                        conn.request(self.command, self.path, body=body or None, headers=headers)
                    except OSError as exc:
                        # The upstream may answer before reading the whole body and close (the emulator's 404
                        # for a finished resumable session): relay that answer, as a real proxy would. Dropping
                        # the client instead turned a definite error into an endless run of retried resets.
                        logger.debug("faultproxy: upstream closed while the body was sent: %r", exc)
                    resp = conn.getresponse()
                    payload = resp.read()
                    out = {k: v for k, v in resp.getheaders() if k.lower() not in HOP_BY_HOP}
                    return resp.status, out, payload
                finally:
                    conn.close()

            def _reply(
                self,
                status: int,
                headers: dict[str, str],
                payload: bytes,
                declared: int | None = None,
                cut: int | None = None,
            ) -> None:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload) if declared is None else declared))
                if cut is not None:
                    self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(payload if cut is None else payload[:cut])
                if cut is not None:
                    self.wfile.flush()
                    self._reset()

            def _reset(self) -> None:
                """Abort the connection with a TCP RST (SO_LINGER 0)."""
                self.close_connection = True
                try:
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
                logger.debug("faultproxy: " + format, *args)

        return Handler


class _QuietServer(ThreadingHTTPServer):
    """Clients dropping idle keep-alive connections is normal here: log it at debug, not as a traceback."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.debug("faultproxy: connection from %s ended abruptly", client_address, exc_info=True)


def _error_body(code: int) -> bytes:
    return json.dumps({"error": {"code": code, "message": "injected by faultproxy", "errors": []}}).encode()
