"""Decision latency of the deployment agent: one observation and a batch of 100 nodes,
through the Python API (`Agent.decide` / `decide_batch`, validation included) and
through HTTP on loopback (`POST /act`, keep-alive connection). Writes agent_latency.md.

    aro export RUN_DIR /tmp/policy && python benchmarks/agent_latency.py --policy /tmp/policy
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

import numpy as np

from aro_jax.deploy import service
from aro_jax.deploy.agent import Agent
from aro_jax.deploy.export import load_policy


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


def row(name, lat_s, per=1):
    ms = lat_s * 1e3
    return f"| {name} | {len(lat_s)} | {np.percentile(ms, 50):.3f} | {np.percentile(ms, 99):.3f} | {np.percentile(ms, 50) / per * 1e3:.1f} |"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--policy", required=True)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--out", default=str(Path(__file__).with_suffix(".md")))
    args = ap.parse_args()

    policy = load_policy(args.policy)
    agent = Agent(policy)
    rng = np.random.default_rng(0)
    nodes = list(policy.node_names)
    one = payload(policy, nodes[0], rng)
    batch = [payload(policy, nodes[i % len(nodes)], rng) for i in range(100)]

    rows = [
        row("Python API, 1 observation", timed(lambda: agent.decide(one), args.n)),
        row("Python API, batch of 100 nodes", timed(lambda: agent.decide_batch(batch), args.n // 10), 100),
    ]
    server = service.make_http_server(agent, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    conn = http.client.HTTPConnection("127.0.0.1", server.server_port)

    def post(body):
        conn.request("POST", "/act", body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        r.read()
        assert r.status == 200, r.status

    one_b, batch_b = json.dumps(one).encode(), json.dumps(batch).encode()
    rows += [
        row("HTTP loopback, 1 observation", timed(lambda: post(one_b), args.n)),
        row("HTTP loopback, batch of 100 nodes", timed(lambda: post(batch_b), args.n // 10), 100),
    ]
    server.shutdown()
    net = policy.spec["network"]
    cmd = "python benchmarks/agent_latency.py --policy " + args.policy
    text = "\n".join([
        "# Deployment agent decision latency",
        "",
        f"Command: `{cmd}` (export of a run of `configs/centralized.yaml`: {len(nodes)} nodes, "
        f"actor MLP {net['input_dim']}-{'-'.join(map(str, net['hidden_sizes']))}-{net['num_actions']}, numpy forward pass).",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared with other jobs), "
        f"Python {sys.version.split()[0]}, numpy {np.__version__}.",
        "Latency includes input validation; HTTP adds JSON encoding and a keep-alive loopback round trip (client in the same process).",
        "",
        "| path | calls | p50 (ms) | p99 (ms) | p50 per node (µs) |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ])
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
