"""A loopback HTTP proxy in front of the moto S3 server that throttles like S3 does.

The first `refuse` requests that match `when(method, path)` are answered the way
S3 answers a request-rate burst: HTTP 503 with the `SlowDown` XML error body
(a HEAD gets the status and no body, as S3 sends it). Every other request is
forwarded to the upstream server unchanged: method, path with query string,
headers (Host included, so request signatures stay valid) and body bytes as
received (Content-Length or chunked); the upstream answer (status, headers,
body, streamed in pieces, Range responses included) is relayed back unchanged
apart from hop-by-hop framing. `refused` counts the throttled requests and
`log` lists every request as (method, path, status sent), so a test can check
its client's retry count against what the storage really refused.

Why a proxy and not a patched client: the retry code under test (botocore's
retry handlers, s3fs, data/object_store.py) must see a real HTTP 503 on a real
socket, exactly as in production.
"""
from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import urlsplit

SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
            b"<Message>Please reduce your request rate.</Message>"
            b"<RequestId>THROTTLEPROXY</RequestId><HostId>throttle-proxy</HostId></Error>")
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}
PIECE = 1 << 16


class ThrottleProxy:
    """`with ThrottleProxy(upstream, refuse=6) as proxy:` -> proxy.url is the endpoint to give clients."""

    def __init__(self, upstream: str, refuse: int = 0,
                 when: Callable[[str, str], bool] = lambda method, path: True):
        up = urlsplit(upstream)
        self.upstream = (up.hostname, up.port)
        self.to_refuse = refuse
        self.when = when
        self.refused = 0
        self.log: list[tuple[str, str, int]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="throttle-proxy", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def throttle(self, refuse: int, when: Callable[[str, str], bool] | None = None) -> None:
        """Refuse the next `refuse` matching requests (a new burst); `refused` keeps counting."""
        with self._lock:
            self.to_refuse = refuse
            if when is not None:
                self.when = when

    def decide(self, method: str, path: str) -> bool:
        """True: answer this request with SlowDown (and count it)."""
        with self._lock:
            if self.to_refuse > 0 and self.when(method, path):
                self.to_refuse -= 1
                self.refused += 1
                return True
            return False

    def record(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self.log.append((method, path, status))

    def __enter__(self) -> "ThrottleProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def _handler_for(proxy: ThrottleProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, and 100-continue answered by the base class
        upstream: http.client.HTTPConnection | None = None

        def log_message(self, *args) -> None:  # quiet: the test reads proxy.log instead
            pass

        def _read_body(self) -> tuple[bytes, bool]:
            """The request body as received, and whether it was chunked (then the raw chunk framing)."""
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                raw = bytearray()
                while True:
                    line = self.rfile.readline()
                    raw += line
                    size = int(line.split(b";")[0].strip() or b"0", 16)
                    if size == 0:  # last chunk, then trailers up to an empty line
                        while (line := self.rfile.readline()) not in (b"\r\n", b"\n", b""):
                            raw += line
                        raw += b"\r\n"
                        return bytes(raw), True
                    raw += self.rfile.read(size + 2)  # data + CRLF
            return self.rfile.read(int(self.headers.get("Content-Length") or 0)), False

        def _handle(self) -> None:
            body, chunked = self._read_body()
            if proxy.decide(self.command, self.path):
                self._refuse()
            else:
                self._forward(body, chunked)

        def _refuse(self) -> None:
            payload = b"" if self.command == "HEAD" else SLOWDOWN
            self.send_response_only(503, "Slow Down")
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(SLOWDOWN)))
            self.send_header("x-amz-request-id", "THROTTLEPROXY")
            self.end_headers()
            self.wfile.write(payload)
            proxy.record(self.command, self.path, 503)

        def _connection(self) -> http.client.HTTPConnection:
            if self.upstream is None:
                self.upstream = http.client.HTTPConnection(*proxy.upstream, timeout=60)
            return self.upstream

        def _forward(self, body: bytes, chunked: bool) -> None:
            try:
                resp = self._send_upstream(body)
            except (ConnectionError, http.client.HTTPException):  # a stale keep-alive upstream: once more
                self.upstream.close()
                self.upstream = None
                resp = self._send_upstream(body)
            self.send_response_only(resp.status, resp.reason)
            length = resp.getheader("Content-Length")
            for name, value in resp.getheaders():
                if name.lower() not in HOP_BY_HOP:
                    self.send_header(name, value)
            no_body = self.command == "HEAD" or resp.status in (204, 304) or 100 <= resp.status < 200
            relay_chunked = not no_body and length is None
            if relay_chunked:
                self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            if not no_body:
                while piece := resp.read(PIECE):
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if relay_chunked else piece)
                if relay_chunked:
                    self.wfile.write(b"0\r\n\r\n")
            resp.read()
            if resp.will_close:
                self.upstream.close()
                self.upstream = None
            proxy.record(self.command, self.path, resp.status)

        def _send_upstream(self, body: bytes) -> http.client.HTTPResponse:
            conn = self._connection()
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in ("connection", "keep-alive", "proxy-connection", "expect"):
                    conn.putheader(name, value)
            conn.endheaders(body if body else None)
            return conn.getresponse()

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    return Handler
