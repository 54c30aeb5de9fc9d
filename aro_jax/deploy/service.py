"""The agent's interfaces: JSON lines on stdin/stdout, and HTTP (standard library).

JSON lines: each input line is one JSON object (one node's metrics) or a JSON array of
objects (many nodes); each gets one output line with the decision(s). A line that is not
JSON gets `{"error": "invalid_json", ...}` with the fallback action; the loop goes on.

HTTP: `POST /act` (body: an object or an array, as above; 200 with the decision, 422 with
the structured error and fallback decision, 400 for a body that is not JSON),
`GET /healthz`, `GET /metrics` (Prometheus text format). Bound to 127.0.0.1 by default.
"""

from __future__ import annotations

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import IO

from aro_jax.deploy.agent import Agent

MAX_BODY_BYTES = 8 * 1024 * 1024


def handle_text(agent: Agent, text: str) -> tuple[object, bool]:
    """(response, ok) for one JSON document: an object (one decision) or an array."""
    try:
        payload = json.loads(text)
    except (json.JSONDecodeError, RecursionError, UnicodeDecodeError) as e:
        out = agent.fallback("invalid_json", None, f"not valid JSON: {e}")
        agent._record(out, 0.0)
        return out, False
    if isinstance(payload, list):
        outs = agent.decide_batch(payload)
        return outs, not any(o.get("fallback") for o in outs)
    out = agent.decide(payload)
    return out, not out.get("fallback")


def _dumps(obj) -> str:
    return json.dumps(obj, allow_nan=False, separators=(",", ":"))


def serve_jsonl(agent: Agent, inp: IO[str] = sys.stdin, out: IO[str] = sys.stdout) -> int:
    """Decide for each input line until end of input; returns the number of lines."""
    n = 0
    for line in inp:
        if not line.strip():
            continue
        resp, _ = handle_text(agent, line)
        out.write(_dumps(resp) + "\n")
        out.flush()
        n += 1
    return n


def make_http_server(agent: Agent, host: str = "127.0.0.1", port: int = 8080) -> ThreadingHTTPServer:
    """A ThreadingHTTPServer for the agent (port 0: any free port; see server.server_port)."""

    class Handler(BaseHTTPRequestHandler):
        server_version = "aro-agent/1"
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body are separate writes: no 40 ms delayed-ACK stall

        def _send(self, code: int, body: str, ctype: str = "application/json") -> None:
            data = body.encode()
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802
            path = self.path.split("?", 1)[0]
            if path == "/healthz":
                self._send(200, _dumps(agent.health()))
            elif path == "/metrics":
                self._send(200, agent.prometheus_text(), "text/plain; version=0.0.4; charset=utf-8")
            else:
                self._send(404, _dumps({"error": "not_found", "field": None, "reason": f"no route GET {path}; use POST /act, GET /healthz, GET /metrics"}))

        def do_POST(self):  # noqa: N802
            path = self.path.split("?", 1)[0]
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if length < 0 or length > MAX_BODY_BYTES:
                self.close_connection = True
                self._send(413 if length > 0 else 400, _dumps(agent.fallback("invalid_request", None, f"Content-Length must be 0..{MAX_BODY_BYTES}")))
                return
            body = self.rfile.read(length)
            if path != "/act":
                self._send(404, _dumps({"error": "not_found", "field": None, "reason": f"no route POST {path}; use POST /act"}))
                return
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError as e:
                out = agent.fallback("invalid_json", None, f"body is not UTF-8: {e}")
                self._send(400, _dumps(out))
                return
            resp, ok = handle_text(agent, text)
            code = 200 if ok else (400 if isinstance(resp, dict) and resp.get("error") == "invalid_json" else 422)
            self._send(code, _dumps(resp))

        def log_message(self, fmt, *args):  # keep stdout/stderr quiet; /metrics has the counts
            pass

    return ThreadingHTTPServer((host, port), Handler)


def serve_http(agent: Agent, host: str = "127.0.0.1", port: int = 8080) -> None:
    server = make_http_server(agent, host, port)
    print(f"aro agent: serving {agent.policy.path} on http://{host}:{server.server_port} (POST /act, GET /healthz, GET /metrics)", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
