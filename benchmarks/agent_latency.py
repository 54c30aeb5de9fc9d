"""Decision latency and throughput of the deployment agent. Writes agent_latency.json and
renders agent_latency.md from it.

- Python API: one observation and a batch of 100 nodes (`Agent.decide` / `decide_batch`,
  validation included);
- HTTP on loopback, one client: one observation and a batch of 100 (keep-alive);
- HTTP under 20 concurrent clients, with keep-alive and with a new connection per request:
  throughput and per-request p50/p99 (server: `aro agent --http` in its own process);
- control loop: one tick (read vLLM metrics over HTTP from 4 engines, rebuild the
  observation, decide, publish), and, from the end-to-end run through a real Prometheus
  (`benchmarks/agent_e2e.json`, written by tests/test_e2e_prometheus.py), the time from
  Prometheus holding a scrape of the engines to Prometheus holding the agent's decision.

    aro export RUN_DIR /tmp/policy && python benchmarks/agent_latency.py --policy /tmp/policy
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

from aro_jax.deploy import service
from aro_jax.deploy.agent import Agent
from aro_jax.deploy.export import load_policy

HERE = Path(__file__).parent


def payload(policy, node, rng):
    scale = np.asarray(policy.spec["nodes"][node]["observation_scale"])
    raw = scale * rng.uniform(0.1, 0.9, len(scale))
    p = {f: float(v) for f, v in zip(policy.fields, raw)}
    for f in ("time_of_day_sin", "time_of_day_cos", "day_of_week_sin", "day_of_week_cos"):
        p[f] = float(rng.uniform(-1, 1))
    for f in ("forward_fraction", "small_model_fraction", "drop_fraction"):
        p[f] = 0.0
    p["slo_attainment"] = 0.97
    p["node"] = node
    return p


def timed(fn, n):
    for _ in range(min(50, n)):
        fn()
    out = np.empty(n)
    for i in range(n):
        t = time.perf_counter()
        fn()
        out[i] = time.perf_counter() - t
    return out


def summary(lat_s, per=1, wall_s=None):
    ms = np.asarray(lat_s) * 1e3
    row = {"calls": int(len(ms)), "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
           "p50_per_node_us": float(np.percentile(ms, 50) / per * 1e3)}
    if wall_s is not None:
        row["throughput_rps"] = float(len(ms) / wall_s)
    return row


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def concurrent_http(port, body, clients, per_client, keep_alive):
    lat, lock = [], threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        mine = []
        barrier.wait()
        for _ in range(per_client):
            if not keep_alive:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            t = time.perf_counter()
            conn.request("POST", "/act", body=body, headers={"Content-Type": "application/json", **({} if keep_alive else {"Connection": "close"})})
            r = conn.getresponse()
            r.read()
            mine.append(time.perf_counter() - t)
            assert r.status == 200, r.status
            if not keep_alive:
                conn.close()
        with lock:
            lat.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return lat, time.perf_counter() - t0


def vllm_exposition(engines=4):
    lines = []
    for name, kind in (("vllm:num_requests_running", "gauge"), ("vllm:num_requests_waiting", "gauge"), ("vllm:kv_cache_usage_perc", "gauge")):
        lines += [f"# TYPE {name} {kind}"] + [f'{name}{{engine="{e}",model_name="m"}} 0.5' for e in range(engines)]
    lines.append("# TYPE vllm:request_success_total counter")
    lines += [f'vllm:request_success_total{{engine="{e}",finished_reason="stop",model_name="m"}} {{n}}' for e in range(engines)]
    lines.append("# TYPE vllm:e2e_request_latency_seconds histogram")
    for e in range(engines):
        for le in ("1.0", "5.0", "+Inf"):
            lines.append(f'vllm:e2e_request_latency_seconds_bucket{{engine="{e}",le="{le}",model_name="m"}} {{n}}')
        lines += [f'vllm:e2e_request_latency_seconds_sum{{engine="{e}",model_name="m"}} {{s}}', f'vllm:e2e_request_latency_seconds_count{{engine="{e}",model_name="m"}} {{n}}']
    return "\n".join(lines) + "\n"


def loop_tick(policy, node, n):
    from aro_jax.deploy.control_loop import ControlLoop, LoopOptions
    from aro_jax.deploy.metrics_source import VllmScrape

    template, counter = vllm_exposition(), [0]

    class Engines(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):  # noqa: N802
            counter[0] += 150
            body = template.replace("{n}", str(counter[0])).replace("{s}", str(2.0 * counter[0])).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Engines)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    clock = iter(30.0 * np.arange(1, 10 * n + 100))
    loop = ControlLoop(policy, node, VllmScrape([f"http://127.0.0.1:{srv.server_port}"]), LoopOptions(), clock=lambda: next(clock))
    loop.tick()
    lat = timed(loop.tick, n)
    srv.shutdown()
    return lat


def render(doc: dict) -> str:
    r = doc["rows"]
    table = ["| path | calls | p50 (ms) | p99 (ms) | p50 per node (µs) |", "|---|---|---|---|---|"]
    for name in ("Python API, 1 observation", "Python API, batch of 100 nodes", "HTTP loopback, 1 observation", "HTTP loopback, batch of 100 nodes", "control loop tick (scrape 4 engines, decide, publish)"):
        x = r[name]
        table.append(f"| {name} | {x['calls']} | {x['p50_ms']:.3f} | {x['p99_ms']:.3f} | {x['p50_per_node_us']:.1f} |")
    conc = ["| 20 concurrent clients | requests | throughput (req/s) | p50 (ms) | p99 (ms) |", "|---|---|---|---|---|"]
    for name in ("keep-alive", "new connection per request"):
        x = r[f"HTTP, 20 clients, {name}"]
        conc.append(f"| {name} | {x['calls']} | {x['throughput_rps']:,.0f} | {x['p50_ms']:.2f} | {x['p99_ms']:.2f} |")
    e2e = doc.get("e2e")
    e2e_text = (
        [f"Through a real Prometheus (scrape interval {e2e['scrape_interval']}, `tests/test_e2e_prometheus.py`, {e2e['ticks']} ticks): from Prometheus "
         f"holding a scrape of the engines to Prometheus holding the agent's decision, p50 {e2e['p50_ms']:.0f} ms, p99 {e2e['p99_ms']:.0f} ms "
         "(the agent polls every 20 ms, queries, decides, and waits to be scraped)."]
        if e2e else ["(No end-to-end run found: run `ARO_E2E_REPORT=benchmarks/agent_e2e.json python -m pytest tests/test_e2e_prometheus.py`.)"]
    )
    return "\n".join([
        "# Deployment agent decision latency", "",
        f"Command: `{doc['command']}` ({doc['policy']}).",
        f"Machine: {doc['machine']}.",
        "Latency includes input validation; single-client HTTP is a keep-alive loopback round trip with the client in the same process.", "",
        *table, "",
        f"HTTP under load: the server is `aro agent --http` in its own process ({doc['workers']} workers); 20 client threads in this process "
        "each send one observation per request.", "",
        *conc, "",
        "Time to a published decision:", "",
        *e2e_text, "",
    ])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--policy", required=True)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--per-client", type=int, default=200)
    ap.add_argument("--out", default=str(HERE / "agent_latency.json"))
    args = ap.parse_args()

    policy = load_policy(args.policy)
    agent = Agent(policy)
    rng = np.random.default_rng(0)
    nodes = list(policy.node_names)
    one = payload(policy, nodes[0], rng)
    batch = [payload(policy, nodes[i % len(nodes)], rng) for i in range(100)]
    rows = {
        "Python API, 1 observation": summary(timed(lambda: agent.decide(one), args.n)),
        "Python API, batch of 100 nodes": summary(timed(lambda: agent.decide_batch(batch), args.n // 10), 100),
    }
    server = service.make_http_server(agent, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    conn = http.client.HTTPConnection("127.0.0.1", server.server_port)

    def post(body):
        conn.request("POST", "/act", body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        r.read()
        assert r.status == 200, r.status

    one_b, batch_b = json.dumps(one).encode(), json.dumps(batch).encode()
    rows["HTTP loopback, 1 observation"] = summary(timed(lambda: post(one_b), args.n))
    rows["HTTP loopback, batch of 100 nodes"] = summary(timed(lambda: post(batch_b), args.n // 10), 100)
    server.shutdown()
    server.server_close()

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "aro_jax.cli", "agent", "--policy", args.policy, "--node", nodes[0], "--http", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        for keep_alive, name in ((True, "keep-alive"), (False, "new connection per request")):
            concurrent_http(port, one_b, 20, 10, keep_alive)  # warm-up
            lat, wall = concurrent_http(port, one_b, 20, args.per_client, keep_alive)
            rows[f"HTTP, 20 clients, {name}"] = summary(lat, wall_s=wall)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    rows["control loop tick (scrape 4 engines, decide, publish)"] = summary(loop_tick(policy, nodes[0], min(args.n, 500)))

    e2e = None
    e2e_path = HERE / "agent_e2e.json"
    if e2e_path.is_file():
        rep = json.loads(e2e_path.read_text())
        e2e = {"ticks": rep["ticks"], "scrape_interval": rep.get("scrape_interval", "50ms"),
               "p50_ms": rep["decision_after_scrape_p50_s"] * 1e3, "p99_ms": rep["decision_after_scrape_p99_s"] * 1e3}
    net = policy.spec["network"]
    doc = {
        "command": "python benchmarks/agent_latency.py --policy " + args.policy,
        "policy": f"{len(nodes)} node(s), actor MLP {net['input_dim']}-{'-'.join(map(str, net['hidden_sizes']))}-{net['num_actions']}, numpy forward pass",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared with other jobs), Python {sys.version.split()[0]}, numpy {np.__version__}",
        "workers": service.DEFAULT_WORKERS,
        "rows": rows,
        "e2e": e2e,
    }
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    md = render(doc)
    Path(args.out).with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
