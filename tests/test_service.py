"""The agent's HTTP and JSON-lines service against the defects a new user found: huge JSON
integers, idle and half-open connections, bursts of connections, responses blown up by a
small body, HTTP/1.0 keep-alive, chunked bodies, uncounted rejections, a port in use,
the policy's absolute path in /healthz, blank JSON lines."""

import http.client
import io
import json
import socket
import threading
import time

import pytest

from _deploy_fixture import trained
from aro_jax.deploy import service
from aro_jax.deploy.agent import Agent
from aro_jax.deploy.export import load_policy

GOOD = {
    "request_rate_rps": 9.5, "latency_e2e_mean_s": 3.2, "cpu_util": 0.4, "gpu_util": 0.7, "memory_util": 0.3,
    "queue_requests": 4.0, "replicas_ready": 2, "replicas_pending": 0, "cpu_cores": 32, "host_memory_gb": 256,
    "forward_fraction": 0.0, "small_model_fraction": 0.0, "capacity_rps": 14.0, "time_of_day_sin": 0.5,
    "time_of_day_cos": 0.866, "day_of_week_sin": 0.1, "day_of_week_cos": 0.995, "forecast_rate_rps": 10.2,
    "drop_fraction": 0.0, "slo_attainment": 0.98,
}
HUGE_INT = "9" * 5000  # past Python's 4,300-digit int conversion limit


@pytest.fixture(scope="module")
def agent():
    _, export_dir = trained()
    return Agent(load_policy(export_dir))


@pytest.fixture
def server(agent):
    srv = service.make_http_server(agent, "127.0.0.1", 0, workers=4, queue=4, timeout_s=0.5)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def post(conn, body: bytes, headers=None):
    conn.request("POST", "/act", body=body, headers={"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    return r.status, r.read()


def metrics(srv) -> str:
    c = http.client.HTTPConnection("127.0.0.1", srv.server_port, timeout=5)
    c.request("GET", "/metrics")
    return c.getresponse().read().decode()


def counts(srv) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(metrics(srv)):
        for smp in fam.samples:
            out[(smp.name, tuple(sorted(smp.labels.items())))] = smp.value
    return out


def test_huge_json_integer_jsonl_keeps_answering(agent):
    out = io.StringIO()
    lines = [f'{{"request_rate_rps": {HUGE_INT}}}', json.dumps(GOOD)]
    assert service.serve_jsonl(agent, io.StringIO("\n".join(lines) + "\n"), out) == 2
    first, second = [json.loads(x) for x in out.getvalue().splitlines()]
    assert first["error"] == "invalid_json" and "digits" in first["reason"] and first["action"] == "MaintainCurrent"
    assert "error" not in second


def test_huge_json_integer_http_keeps_the_connection(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=5)
    code, body = post(conn, f'{{"request_rate_rps": {HUGE_INT}}}'.encode())
    assert code == 400 and json.loads(body)["error"] == "invalid_json"
    code, body = post(conn, json.dumps(GOOD).encode())  # same connection, still served
    assert code == 200 and "action" in json.loads(body)


def test_blank_json_lines_are_answered(agent):
    out = io.StringIO()
    service.serve_jsonl(agent, io.StringIO("\n   \n" + json.dumps(GOOD) + "\n"), out)
    answers = [json.loads(x) for x in out.getvalue().splitlines()]
    assert len(answers) == 3 and [a.get("error") for a in answers] == ["invalid_json", "invalid_json", None]


def test_idle_connections_time_out_and_workers_are_bounded(server):
    threads_before = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", server.server_port), timeout=5) for _ in range(50)]
    time.sleep(0.2)
    # 4 workers + 4 queued hold connections; the other 42 are answered 503 and closed at once.
    assert threading.active_count() - threads_before <= server.workers + 1
    answered_503 = 0
    t0 = time.monotonic()
    for s in idle:  # every connection ends: 503 at once, or closed by the 0.5 s socket timeout
        s.settimeout(3)
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        answered_503 += data.startswith(b"HTTP/1.1 503")
        s.close()
    assert time.monotonic() - t0 < 3.0
    assert answered_503 >= 50 - server.workers - server.queue_limit
    conn = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=5)
    assert post(conn, json.dumps(GOOD).encode())[0] == 200
    assert 'aro_agent_http_rejected_total{reason="overloaded"}' in metrics(server)


def test_half_open_connection_is_closed_by_timeout(server):
    s = socket.create_connection(("127.0.0.1", server.server_port), timeout=5)
    s.sendall(b"POST /act HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")  # never finishes its body
    t0 = time.monotonic()
    s.settimeout(5)
    while s.recv(4096):
        pass
    assert time.monotonic() - t0 < 3.0  # closed after the 0.5 s timeout, not held
    s.close()


def test_burst_of_connections_is_accepted(agent):
    srv = service.make_http_server(agent, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        assert srv.request_queue_size >= 128
        t0 = time.monotonic()
        socks = [socket.create_connection(("127.0.0.1", srv.server_port), timeout=2) for _ in range(120)]
        assert time.monotonic() - t0 < 1.0  # no SYN retransmit stalls (1 s and more) on a 5-deep backlog
        for s in socks:
            s.close()
    finally:
        srv.shutdown()
        srv.server_close()


def test_response_size_is_bounded(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=10)
    body = b"[" + b",".join([b"{}"] * 300_000)[: 1024 * 1024 - 2] .rstrip(b",") + b"]"
    assert len(body) <= service.MAX_BODY_BYTES
    code, resp = post(conn, body)
    assert code == 413 and len(resp) < 1000 and json.loads(resp)["error"] == "too_many_items"
    code, resp = post(conn, json.dumps([{}] * service.MAX_BATCH).encode())
    assert code == 422 and len(resp) < 300 * service.MAX_BATCH
    junk = {f"extra_{i}": 1 for i in range(5000)}
    code, resp = post(conn, json.dumps({**GOOD, **junk, "id": "x" * 100_000}).encode())
    assert code == 200 and len(resp) < 2000  # ignored fields and the id are not echoed unbounded


def test_http10_keep_alive_is_echoed(server):
    s = socket.create_connection(("127.0.0.1", server.server_port), timeout=5)
    body = json.dumps(GOOD).encode()
    req = b"POST /act HTTP/1.0\r\nConnection: keep-alive\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    for _ in range(2):  # the second request on the same connection is answered too
        s.sendall(req)
        f = s.makefile("rb")
        status = f.readline()
        headers = {}
        while (line := f.readline()) not in (b"\r\n", b""):
            k, v = line.decode().split(":", 1)
            headers[k.strip().lower()] = v.strip()
        payload = f.read(int(headers["content-length"]))
        assert status.startswith(b"HTTP/1.1 200") and headers["connection"].lower() == "keep-alive"
        assert "action" in json.loads(payload)
    s.close()


def test_chunked_body(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=5)
    text = json.dumps(GOOD).encode()
    chunks = (text[i:i + 50] for i in range(0, len(text), 50))
    conn.request("POST", "/act", body=chunks, headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"}, encode_chunked=True)
    r = conn.getresponse()
    assert r.status == 200 and "action" in json.loads(r.read())


def test_rejected_requests_are_counted(server):
    before = counts(server)
    conn = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=5)
    conn.request("POST", "/act", headers={"Content-Length": str(service.MAX_BODY_BYTES + 1)})
    assert conn.getresponse().status == 413
    conn = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=5)
    assert post(conn, b"\xff\xfe{}")[0] == 400
    conn.request("GET", "/nope")
    r = conn.getresponse()
    r.read()
    assert r.status == 404
    after = counts(server)
    grew = lambda name, **labels: after.get((name, tuple(sorted(labels.items()))), 0) - before.get((name, tuple(sorted(labels.items()))), 0)  # noqa: E731
    for reason in ("body_too_large", "invalid_encoding", "not_found"):
        assert grew("aro_agent_http_rejected_total", reason=reason) == 1, reason
    assert grew("aro_agent_http_requests_total", code="413", path="/act") == 1
    assert grew("aro_agent_http_requests_total", code="400", path="/act") == 1
    assert grew("aro_agent_http_requests_total", code="404", path="other") == 1


def test_port_in_use_is_a_clear_error(agent, capsys):
    from aro_jax.cli import main

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        with pytest.raises(service.ServiceError, match=f"port {port} on 127.0.0.1 is already in use"):
            service.make_http_server(agent, "127.0.0.1", port)
        _, export_dir = trained()
        assert main(["agent", "--policy", str(export_dir), "--http", str(port)]) == 2
        err = capsys.readouterr().err
        assert "already in use" in err and "Traceback" not in err
    finally:
        taken.close()


def test_healthz_shows_no_absolute_path(server, agent):
    c = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=5)
    c.request("GET", "/healthz")
    body = c.getresponse().read().decode()
    assert str(agent.policy.path) not in body and json.loads(body)["policy"] == agent.policy.path.name
