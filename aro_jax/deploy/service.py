"""The agent's interfaces: JSON lines on stdin/stdout, and HTTP (standard library).

JSON lines: each input line is one JSON object (one node's metrics) or a JSON array of
objects (many nodes); each gets exactly one output line with the decision(s). A line that
is not JSON (blank lines included) gets `{"error": "invalid_json", ...}` with the
fallback action; the loop goes on.

HTTP: `POST /act` (body: an object or an array, as above; 200 with the decision, 422 with
the structured error and fallback decision, 400 for a body that is not JSON, 413 for a
body over MAX_BODY_BYTES or an array over MAX_BATCH items), `GET /healthz`,
`GET /metrics` (Prometheus text format, `prometheus_client`), `GET /state` (the control
loop's desired state, when a loop runs). Bound to 127.0.0.1 by default.

The server is `http.server` with the limits it lacks by default: a bounded worker pool
(connections beyond workers + queue get 503 at once), a listen backlog of
LISTEN_BACKLOG, a per-connection socket timeout (idle keep-alive and slow clients are
dropped after `timeout_s`), request bodies by Content-Length or chunked transfer coding
(both bounded), HTTP/1.0 keep-alive echoed, and every request counted in /metrics by
route and status, rejected ones also by reason.
"""

from __future__ import annotations

import errno
import json
import socket
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import IO, Callable

from aro_jax.deploy.agent import Agent

MAX_BODY_BYTES = 1024 * 1024
MAX_BATCH = 1000  # nodes per request: bounds the response (~0.5 KB per decision)
MAX_LINE_BYTES = MAX_BODY_BYTES
LISTEN_BACKLOG = 128
DEFAULT_WORKERS = 32
DEFAULT_QUEUE = 64
DEFAULT_TIMEOUT_S = 10.0
ROUTES = {"GET": ("/healthz", "/metrics", "/state"), "POST": ("/act",)}


class ServiceError(RuntimeError):
    """The service cannot start (e.g. the port is taken); the message says what to do."""


def handle_text(agent: Agent, text: str) -> tuple[object, bool]:
    """(response, ok) for one JSON document: an object (one decision) or an array."""
    if not text.strip():
        return _invalid_json(agent, "empty input; send one JSON object or array per line"), False
    try:
        payload = json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, and ints past Python's digit limit
        return _invalid_json(agent, f"not valid JSON: {str(e)[:200]}"), False
    if isinstance(payload, list):
        if len(payload) > MAX_BATCH:
            out = agent.fallback("too_many_items", None, f"an array may hold at most {MAX_BATCH} observations, got {len(payload)}")
            agent._record(out, 0.0)
            return out, False
        outs = agent.decide_batch(payload)
        return outs, not any(o.get("fallback") for o in outs)
    out = agent.decide(payload)
    return out, not out.get("fallback")


def _invalid_json(agent: Agent, reason: str) -> dict:
    out = agent.fallback("invalid_json", None, reason)
    agent._record(out, 0.0)
    return out


def _dumps(obj) -> str:
    return json.dumps(obj, allow_nan=False, separators=(",", ":"))


def serve_jsonl(agent: Agent, inp: IO[str] = sys.stdin, out: IO[str] = sys.stdout) -> int:
    """Decide for each input line until end of input; returns the number of lines."""
    n = 0
    for line in inp:
        if len(line) > MAX_LINE_BYTES:
            resp: object = _invalid_json(agent, f"line longer than {MAX_LINE_BYTES} characters")
        else:
            try:
                resp, _ = handle_text(agent, line)
            except Exception as e:  # noqa: BLE001 - one bad line never stops the loop
                resp = agent.fallback("internal_error", None, f"{type(e).__name__}: {str(e)[:200]}")
        out.write(_dumps(resp) + "\n")
        out.flush()
        n += 1
    return n


class _BodyError(Exception):
    def __init__(self, code: int, reason: str, detail: str):
        super().__init__(detail)
        self.code, self.reason, self.detail = code, reason, detail


_OVERLOADED_BODY = b'{"error":"overloaded","field":null,"reason":"all workers busy; retry shortly"}'
_OVERLOADED = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\nRetry-After: 1\r\n"
               b"Content-Length: " + str(len(_OVERLOADED_BODY)).encode() + b"\r\n\r\n" + _OVERLOADED_BODY)


class AgentHTTPServer(HTTPServer):
    """HTTPServer with a bounded worker pool and queue; see the module docstring."""

    request_queue_size = LISTEN_BACKLOG
    allow_reuse_address = True
    daemon_threads = True

    def __init__(self, address, handler, workers: int, queue: int, on_overload: Callable[[], None]):
        self.workers, self.queue_limit, self._on_overload = workers, queue, on_overload
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="aro-http")
        self._pending = threading.BoundedSemaphore(workers + queue)
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        if not self._pending.acquire(blocking=False):
            self._on_overload()
            try:
                request.sendall(_OVERLOADED)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        self._pool.submit(self._work, request, client_address)

    def _work(self, request, client_address):
        try:
            self.finish_request(request, client_address)
        except Exception:  # noqa: BLE001
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            self._pending.release()

    def handle_error(self, request, client_address):  # a dropped client is not news
        pass

    def server_close(self):
        super().server_close()
        self._pool.shutdown(wait=False, cancel_futures=True)


def make_http_server(agent: Agent, host: str = "127.0.0.1", port: int = 8080, loop=None, workers: int = DEFAULT_WORKERS,
                     queue: int = DEFAULT_QUEUE, timeout_s: float = DEFAULT_TIMEOUT_S) -> AgentHTTPServer:
    """The agent's HTTP server (port 0: any free port; see server.server_port). With a
    control `loop`, decisions use its current policy (hot reload) and GET /state works.
    Raises ServiceError when the address cannot be bound."""
    current = (lambda: loop.agent) if loop is not None else (lambda: agent)  # noqa: E731
    telemetry = agent.telemetry

    class Handler(BaseHTTPRequestHandler):
        server_version = "aro-agent/2"
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body are separate writes: no 40 ms delayed-ACK stall
        timeout = timeout_s

        def _route(self) -> str:
            path = self.path.split("?", 1)[0]
            return path if path in ROUTES.get(self.command, ()) else "other"

        def _send(self, code: int, body: str, ctype: str = "application/json") -> None:
            data = body.encode()
            telemetry.http_requests.labels(self._route(), str(code)).inc()
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            if self.close_connection:
                self.send_header("Connection", "close")
            elif self.request_version == "HTTP/1.0":  # 1.0 clients (ab -k) wait for this echo
                self.send_header("Connection", "keep-alive")
            self.end_headers()
            self.wfile.write(data)

        def _reject(self, code: int, reason: str, detail: str, close: bool = False) -> None:
            telemetry.http_rejected.labels(reason).inc()
            if close:
                self.close_connection = True
            self._send(code, _dumps({"error": reason, "field": None, "reason": detail,
                                     "action": current().policy.fallback_action, "fallback": True}))

        def send_error(self, code, message=None, explain=None):  # malformed request lines and headers
            telemetry.http_rejected.labels("malformed_request").inc()
            self.close_connection = True
            try:
                self._send(code, _dumps({"error": "malformed_request", "field": None, "reason": str(message or code)[:200]}))
            except OSError:
                pass

        def do_GET(self):  # noqa: N802
            path = self.path.split("?", 1)[0]
            if path == "/healthz":
                self._send(200, _dumps(current().health()))
            elif path == "/metrics":
                self._send(200, telemetry.text(), "text/plain; version=0.0.4; charset=utf-8")
            elif path == "/state" and loop is not None:
                self._send(200, _dumps(loop.state()))
            else:
                self._reject(404, "not_found", f"no route GET {path[:100]}; use POST /act, GET /healthz, GET /metrics" + (", GET /state" if loop else ""))

        def _read_body(self) -> bytes:
            te = (self.headers.get("Transfer-Encoding") or "").strip().lower()
            cl = self.headers.get("Content-Length")
            if te and cl is not None:
                raise _BodyError(400, "invalid_request", "send either Content-Length or Transfer-Encoding, not both")
            if te:
                if te != "chunked":
                    raise _BodyError(501, "unsupported_transfer_encoding", f"Transfer-Encoding {te[:40]!r} is not supported; use chunked or Content-Length")
                return self._read_chunked()
            try:
                length = int(cl) if cl is not None else 0
            except ValueError:
                raise _BodyError(400, "invalid_request", "Content-Length must be an integer") from None
            if length < 0:
                raise _BodyError(400, "invalid_request", "Content-Length must be >= 0")
            if length > MAX_BODY_BYTES:
                raise _BodyError(413, "body_too_large", f"body of {length} bytes; at most {MAX_BODY_BYTES}")
            return self.rfile.read(length)

        def _read_chunked(self) -> bytes:
            parts, total = [], 0
            while True:
                line = self.rfile.readline(1026)
                try:
                    size = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise _BodyError(400, "invalid_request", "malformed chunk size in a chunked body") from None
                if size < 0:
                    raise _BodyError(400, "invalid_request", "malformed chunk size in a chunked body")
                if size == 0:
                    while self.rfile.readline(1026) not in (b"\r\n", b"\n", b""):
                        pass  # trailer fields
                    return b"".join(parts)
                total += size
                if total > MAX_BODY_BYTES:
                    raise _BodyError(413, "body_too_large", f"chunked body over {MAX_BODY_BYTES} bytes")
                parts.append(self.rfile.read(size))
                self.rfile.readline(3)

        def do_POST(self):  # noqa: N802
            path = self.path.split("?", 1)[0]
            try:
                body = self._read_body()
            except _BodyError as e:
                self._reject(e.code, e.reason, e.detail, close=True)  # the rest of the body is unread
                return
            if path != "/act":
                self._reject(404, "not_found", f"no route POST {path[:100]}; use POST /act")
                return
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError as e:
                self._reject(400, "invalid_encoding", f"body is not UTF-8: {e}")
                return
            agent_now = current()
            try:
                resp, ok = handle_text(agent_now, text)
            except Exception as e:  # noqa: BLE001 - a request never takes the server down
                self._reject(500, "internal_error", f"{type(e).__name__}: {str(e)[:200]}")
                return
            error = resp.get("error") if isinstance(resp, dict) else None
            code = 200 if ok else {"invalid_json": 400, "too_many_items": 413}.get(error, 422)
            if code in (400, 413):
                telemetry.http_rejected.labels(error).inc()
            self._send(code, _dumps(resp))

        def log_message(self, fmt, *args):  # keep stdout/stderr quiet; /metrics has the counts
            pass

    def overloaded():
        telemetry.http_rejected.labels("overloaded").inc()
        telemetry.http_requests.labels("any", "503").inc()

    try:
        return AgentHTTPServer((host, port), Handler, workers, queue, overloaded)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise ServiceError(f"port {port} on {host} is already in use; stop the other process or pass another --http PORT") from None
        if e.errno in (errno.EADDRNOTAVAIL, errno.EACCES) or isinstance(e, socket.gaierror):
            raise ServiceError(f"cannot bind {host}:{port}: {e.strerror or e}") from None
        raise ServiceError(f"cannot serve on {host}:{port}: {e}") from None


def serve_http(agent: Agent, host: str = "127.0.0.1", port: int = 8080, loop=None) -> None:
    """Serve until interrupted (raises ServiceError if the address cannot be bound)."""
    server = make_http_server(agent, host, port, loop=loop)
    routes = "POST /act, GET /healthz, GET /metrics" + (", GET /state" if loop else "")
    print(f"aro agent: serving {agent.policy.path.name} on http://{host}:{server.server_port} ({routes})", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
