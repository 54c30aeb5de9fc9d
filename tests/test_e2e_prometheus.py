"""End to end with real parts: the emulated vLLM deployment (simulator behind vLLM's
metric names), a real Prometheus server scraping it and the agent, the agent reading
through Prometheus (`aro agent --prometheus ... --selector ...`), and a loop playing KEDA
that runs the ScaledObject's PromQL query for aro_desired_replicas and applies the result
to the emulator, over an accelerated simulated day (ARO_E2E_TICKS ticks of 30 s, 240 by
default, 2,880 for the whole day), lock-stepped on Prometheus scrapes. It asserts that the
observation rebuilt from the metrics matches the simulator's own, that the agent decides
what the in-simulator evaluation (`evaluation.rollout`) of the same policy decides on at
least MIN_SAME_DECISIONS of the ticks, and that every KPI of the closed loop is within
KPI_TOLERANCE of the evaluation's. ARO_E2E_REPORT=PATH writes the measured figures
(benchmarks/agent_e2e.json).

The agent reads the allocation the emulated cluster runs (kube-state-metrics' replicas and
pod requests, the router's shares) rather than the one it asked for, so a change the
simulator refused or capped is seen at the next tick. The emulator starts with one warm-up
tick (`--warmup`: the simulator's reset observation as counts), so the agent's first
decision, which needs two scrapes, falls on the evaluation's first tick.

Needs the `prometheus` binary (Debian package `prometheus`; .ci/run installs it). The
commands are the README's deployment walk-through."""

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

from _deploy_fixture import trained

PROMETHEUS = shutil.which("prometheus")
# 240 ticks (2 simulated hours) by default; ARO_E2E_TICKS=2880 runs the whole day.
TICKS = int(os.environ.get("ARO_E2E_TICKS", "240"))
SCRAPE_INTERVAL = "50ms"
# The fixed loop decides as the evaluation does on every tick of the 240-tick default and of
# the whole 2,880-tick day (benchmarks/agent_e2e.json), so its KPIs equal the evaluation's up
# to float32 rounding (< 1e-6). The bounds leave room for a rare flip of a near-tie decision
# (the observation differs from the simulator's by float32 rounding, and the forecast, after
# the warm-up tick's extra update of the agent's forecaster, by 2 % at tick 1, under 0.5 % from
# tick 10 and ~4e-5 later) yet fail the loop that held its own desired allocations: 38 % same
# actions, mean TTFT +7 %, TTFT p95 +13 % and reward -0.11 (of 0.07) at 240 ticks.
KPI_TOLERANCE = 0.01  # relative; absolute for KPIs within [-1, 1]
MIN_SAME_DECISIONS = 0.99
K8S = Path(__file__).resolve().parents[1] / "aro_jax" / "deploy" / "k8s"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(PROMETHEUS is None, reason="the end-to-end test needs a Prometheus server: install the Debian package `prometheus` (apt-get install -y prometheus)"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, body: dict | None = None, timeout: float = 10.0):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def promql(base: str, query: str) -> list:
    doc = http_json(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": query}))
    assert doc["status"] == "success", doc
    return doc["data"]["result"]


def wait_for(what: str, fn, timeout_s: float, procs=()):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for p in procs:
            assert p.poll() is None, f"{p.args[:3]} exited with {p.returncode} while waiting for {what}"
        try:
            value = fn()
            if value is not None and value is not False:
                return value
        except (OSError, ValueError, KeyError, IndexError):
            pass
        time.sleep(0.005)
    raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}")


def scalar(base: str, query: str):
    result = promql(base, query)
    return float(result[0]["value"][1]) if result else None


def test_closed_loop_through_prometheus(tmp_path):
    from aro_jax.deploy.emulator import node_params_from_run
    from aro_jax.envs.serving import ServingNodeEnv
    from aro_jax.training import evaluation as ev
    from aro_jax.training.checkpointing import load_trained_policy

    import jax

    run_dir, export_dir = trained()
    em_port, agent_port, prom_port = free_port(), free_port(), free_port()
    prom = f"http://127.0.0.1:{prom_port}"
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": SCRAPE_INTERVAL, "scrape_timeout": SCRAPE_INTERVAL},
        "scrape_configs": [
            {"job_name": "vllm", "static_configs": [{"targets": [f"127.0.0.1:{em_port}"], "labels": {"namespace": "llm", "deployment": "vllm"}}]},
            {"job_name": "aro-agent", "static_configs": [{"targets": [f"127.0.0.1:{agent_port}"]}]},
        ],
    }))
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in ("emulator", "prometheus", "agent")}
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # with conftest's XLA_FLAGS
    commands = {
        "emulator": [sys.executable, "-m", "aro_jax.deploy.emulator", "--run-dir", str(run_dir), "--node", "solo", "--port", str(em_port), "--ticks", str(TICKS),
                     "--namespace", "llm", "--deployment", "vllm", "--warmup"],
        "prometheus": [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                       f"--web.listen-address=127.0.0.1:{prom_port}"],
        "agent": [sys.executable, "-m", "aro_jax.cli", "agent", "--policy", str(export_dir), "--node", "solo",
                  "--prometheus", prom, "--selector", 'namespace="llm",deployment="vllm"', "--namespace", "llm", "--deployment", "vllm",
                  "--http", str(agent_port), "--clock-query", 'aro_emulator_clock_seconds{namespace="llm"}'],
    }
    procs = {}
    try:
        for name, cmd in commands.items():
            procs[name] = subprocess.Popen(cmd, stdout=logs[name], stderr=subprocess.STDOUT, env=env, start_new_session=True)
        em = f"http://127.0.0.1:{em_port}"
        wait_for("the emulator", lambda: http_json(f"{em}/state"), 180, procs.values())
        wait_for("Prometheus to scrape the emulator and the agent",
                 lambda: scalar(prom, 'count(up{job=~"vllm|aro-agent"} == 1)') == 2, 120, procs.values())

        # KEDA's side, from the shipped ScaledObject: its query, threshold and bounds.
        so = next(d for d in yaml.safe_load_all((K8S / "keda-scaledobject.yaml").read_text()) if d and d["kind"] == "ScaledObject")
        trigger = so["spec"]["triggers"][0]["metadata"]
        keda_query, threshold = trigger["query"], float(trigger["threshold"])
        lo, hi = so["spec"]["minReplicaCount"], so["spec"]["maxReplicaCount"]
        others = {k: f'max(aro_desired_{k}{{namespace="llm",deployment="vllm"}})' for k in ("cpu_cores", "host_memory_gb", "forward_fraction", "small_model_fraction")}

        history, decisions, decision_lag_s, worst, mismatches, off_ticks = [], [], [], {}, [], {}
        agent = f"http://127.0.0.1:{agent_port}"
        t0 = time.monotonic()
        for k in range(-1, TICKS):  # tick -1: the emulator's warm-up tick (the agent's first scrape)
            em_state = http_json(f"{em}/state")
            clock = em_state["clock_s"]
            wait_for(f"Prometheus to scrape tick {k}", lambda: scalar(prom, "aro_emulator_tick") == k, 30, procs.values())
            t_scraped = time.monotonic()
            wait_for(f"the agent's decision on tick {k}",
                     lambda: scalar(prom, 'aro_agent_observed_clock_seconds{namespace="llm",deployment="vllm"}') == clock, 30, procs.values())
            decision_lag_s.append(time.monotonic() - t_scraped)
            agent_state = http_json(f"{agent}/state")
            last = agent_state["last_decision"]
            assert last["clock_s"] == clock, (last, clock)
            if k >= 0:
                decisions.append(last["action"] if last["decided_by"] == "policy" else f'({last["decided_by"]})')
            seen = {r["metric"]["field"]: float(r["value"][1]) for r in promql(prom, "aro_agent_observation")}
            if k > 0 and seen:
                for f, v in em_state["observation"].items():
                    err = abs(seen[f] - v) / max(abs(v), 1e-2)
                    worst[f] = max(worst.get(f, 0.0), err)
                    off_ticks[f] = off_ticks.get(f, 0) + int(err > 1e-3)
                    if err > 1e-3 and len(mismatches) < 10:
                        mismatches.append({"tick": k, "field": f, "agent": seen[f], "simulator": v, "agent_actual": agent_state["actual"], "emulator": em_state["current"]})
            value = scalar(prom, keda_query)
            desired = {"replicas": float(min(max(math.ceil(value / threshold), lo), hi))}
            desired.update({k2: scalar(prom, q) for k2, q in others.items()})
            http_json(f"{em}/scale", desired)
            history += http_json(f"{em}/advance", {"ticks": 1})["metrics"]
        wall_s = time.monotonic() - t0
        agent_metrics = urllib.request.urlopen(f"http://127.0.0.1:{agent_port}/metrics", timeout=10).read().decode()
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        for f in logs.values():
            f.close()

    # The same policy in the simulator, same node, scenario, seed and ticks.
    cfg, policy, weights, _ = load_trained_policy(run_dir)
    _, params, _ = node_params_from_run(run_dir, "solo")
    ref = jax.jit(lambda key: ev.rollout(ServingNodeEnv(cfg.env.action_set), policy, params, key, TICKS, weights))(jax.random.PRNGKey(0))
    got = {k: np.array([h[k] for h in history]) for k in history[0]}
    kpi_ref, kpi_got = ev.kpis({k: np.asarray(v) for k, v in ref.items()}, cfg.env.tick_s, params), ev.kpis(got, cfg.env.tick_s, params)
    from aro_jax.deploy.control_loop import ACTIONS

    ref_actions = np.asarray(ref["action"]).astype(int)
    same_applied = float(np.mean(ref_actions == got["action"]))
    same_decisions = float(np.mean([d == ACTIONS[a] for d, a in zip(decisions, ref_actions)]))
    kpi_error = {k: abs(float(kpi_got[k]) - float(kpi_ref[k])) / (1.0 if abs(float(kpi_ref[k])) <= 1 else abs(float(kpi_ref[k]))) for k in ev.KPIS}
    report = {"ticks": TICKS, "wall_s": wall_s, "same_decisions": same_decisions, "same_applied_actions": same_applied,
              "kpi_tolerance": KPI_TOLERANCE, "min_same_decisions": MIN_SAME_DECISIONS, "kpi_error": kpi_error,
              "worst_kpi_error": max(kpi_error.values()),
              "decision_after_scrape_p50_s": float(np.percentile(decision_lag_s, 50)), "decision_after_scrape_p99_s": float(np.percentile(decision_lag_s, 99)),
              "agent_ticks": {line.split('"')[1]: float(line.split()[-1]) for line in agent_metrics.splitlines() if line.startswith("aro_agent_ticks_total{")},
              "worst_observation_error": {f: v for f, v in worst.items() if v > 1e-5}, "observation_mismatches": mismatches,
              "ticks_observation_off_by_1e-3": {f: n for f, n in off_ticks.items() if n},
              "first_actions_closed_loop": got["action"][:20].astype(int).tolist(), "first_actions_simulator": np.asarray(ref["action"])[:20].astype(int).tolist(),
              "kpis_closed_loop": {k: float(v) for k, v in kpi_got.items()}, "kpis_simulator": {k: float(v) for k, v in kpi_ref.items()}}
    (tmp_path / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    if os.environ.get("ARO_E2E_REPORT"):
        Path(os.environ["ARO_E2E_REPORT"]).write_text(json.dumps(report, indent=2) + "\n")

    assert 'aro_agent_ticks_total{decided_by="policy"}' in agent_metrics
    assert len({h["action"] for h in history}) > 1  # the policy's decisions reached the emulator
    # What the agent rebuilds from vLLM's metrics through Prometheus is what the simulator's
    # policy would see at the same tick (float32 rounding apart).
    from_metrics = ("request_rate_rps", "latency_e2e_mean_s", "gpu_util", "queue_requests", "replicas_ready", "replicas_pending",
                    "capacity_rps", "drop_fraction", "slo_attainment", "time_of_day_sin", "day_of_week_sin")
    assert {f: worst[f] for f in from_metrics if worst.get(f, 0.0) > 1e-3} == {}, report["worst_observation_error"]
    # The allocation is read from kube-state-metrics and the router, not assumed.
    for quantity in ("replicas", "cpu_cores", "host_memory_gb", "forward_fraction", "small_model_fraction"):
        assert f'aro_agent_actual_state_observed{{deployment="vllm",namespace="llm",quantity="{quantity}"}} 1.0' in agent_metrics, quantity
    # Every tick but at most one in a thousand (one whole-day run saw one tick whose pod requests
    # through Prometheus still counted a pod removed that tick; the decision was the same).
    allocation = ("cpu_cores", "host_memory_gb", "forward_fraction", "small_model_fraction", "replicas_pending", "cpu_util", "memory_util")
    assert {f: off_ticks[f] for f in allocation if off_ticks.get(f, 0) > max(1, TICKS // 1000)} == {}, report["observation_mismatches"]
    assert same_decisions >= MIN_SAME_DECISIONS, report
    assert {k: v for k, v in kpi_error.items() if v > KPI_TOLERANCE} == {}, report
