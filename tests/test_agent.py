"""Deployment agent: validation never crashes, HTTP endpoints, and a closed loop through
the agent's JSON interface that reproduces the in-simulator evaluation."""

import io
import json
import math
import threading
import urllib.error
import urllib.request

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _deploy_fixture import trained
from aro_jax.deploy import service
from aro_jax.deploy.agent import Agent
from aro_jax.deploy.export import load_policy
from aro_jax.envs import serving as sv

FALLBACK = "MaintainCurrent"


@pytest.fixture(scope="module")
def agent():
    _, export_dir = trained()
    return Agent(load_policy(export_dir))


def good_payload():
    return {
        "request_rate_rps": 9.5, "latency_e2e_mean_s": 3.2, "cpu_util": 0.4, "gpu_util": 0.7, "memory_util": 0.3,
        "queue_requests": 4.0, "replicas_ready": 2, "replicas_pending": 0, "cpu_cores": 32, "host_memory_gb": 256,
        "forward_fraction": 0.0, "small_model_fraction": 0.0, "capacity_rps": 14.0, "time_of_day_sin": 0.5,
        "time_of_day_cos": 0.866, "day_of_week_sin": 0.1, "day_of_week_cos": 0.995, "forecast_rate_rps": 10.2,
        "drop_fraction": 0.0, "slo_attainment": 0.98,
    }


def assert_structured(out, field=None):
    assert out["action"] == FALLBACK and out["fallback"] is True
    assert {"error", "field", "reason"} <= set(out) and isinstance(out["reason"], str)
    if field is not None:
        assert out["field"] == field, out
    json.dumps(out, allow_nan=False)


def test_valid_input_decides(agent):
    out = agent.decide({**good_payload(), "extra_metric": 1, "id": "t1"})
    assert out["action"] in agent.policy.action_names and "error" not in out
    assert out["ignored_fields"] == ["extra_metric"] and out["id"] == "t1"
    raw = np.array([good_payload()[f] for f in sv.OBS_FIELDS], np.float32)
    assert out["action_index"] == int(agent.policy.act(raw))


@pytest.mark.parametrize("field,value,reason", [
    ("cpu_util", float("nan"), "NaN"),
    ("request_rate_rps", -1.0, "negative"),
    ("queue_requests", "12", "must be a number"),
    ("replicas_ready", True, "must be a number"),
    ("capacity_rps", 1e300, "out of range"),
    ("capacity_rps", 10**400, "out of range"),
    ("forecast_rate_rps", float("inf"), "out of range"),
    ("slo_attainment", 1.5, "above 1"),
    ("time_of_day_sin", -2.0, "below -1"),
])
def test_bad_values_fall_back(agent, field, value, reason):
    out = agent.decide({**good_payload(), field: value})
    assert_structured(out, field)
    assert reason in out["reason"]


def test_missing_field_and_non_object(agent):
    p = good_payload()
    del p["gpu_util"]
    out = agent.decide(p)
    assert_structured(out, "gpu_util")
    assert out["reason"] == "missing"
    for bad in (None, [], "x", 3, 2.5):
        assert_structured(agent.decide(bad))
    assert_structured(agent.decide({**good_payload(), "node": "mars"}), "node")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=6,
)
numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(min_value=-(10**400), max_value=10**400))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    drop=st.sets(st.sampled_from(sv.OBS_FIELDS), max_size=3),
    replace=st.dictionaries(st.sampled_from(sv.OBS_FIELDS), st.one_of(numbers, json_values), max_size=4),
    extra=st.dictionaries(st.text(max_size=10), json_values, max_size=3),
)
def test_fuzzed_payloads_never_crash(agent, drop, replace, extra):
    p = {**good_payload(), **extra, **replace}
    for f in drop:
        p.pop(f, None)
    out = agent.decide(p)
    assert out["action"] in agent.policy.action_names
    json.dumps(out, allow_nan=False)
    valid = all(
        f in p and not isinstance(p[f], bool) and isinstance(p[f], (int, float)) and math.isfinite(float(p[f]) if abs(p[f]) < 1e308 else math.inf)
        for f in sv.OBS_FIELDS
    )
    if not valid or "node" in extra:
        if out.get("fallback"):
            assert_structured(out)
    else:
        assert "action" in out


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=json_values)
def test_fuzzed_json_lines(agent, doc):
    text = json.dumps(doc)
    out = io.StringIO()
    service.serve_jsonl(agent, io.StringIO(text + "\nnot json {\n"), out)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    for line in lines:
        resp = json.loads(line)
        for r in resp if isinstance(resp, list) else [resp]:
            assert r["action"] in agent.policy.action_names
    assert json.loads(lines[1])["error"] == "invalid_json"


def test_batch_of_nodes(agent):
    payloads = [good_payload() for _ in range(100)]
    payloads[3] = {**payloads[3], "cpu_util": None}
    outs = agent.decide_batch(payloads)
    assert len(outs) == 100 and outs[3]["fallback"] and outs[3]["field"] == "cpu_util"
    single = agent.decide(good_payload())
    assert all(o["action"] == single["action"] for i, o in enumerate(outs) if i != 3)


def test_http_endpoints(agent):
    server = service.make_http_server(agent, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_port}"

    def post(body: bytes):
        req = urllib.request.Request(base + "/act", data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    try:
        code, out = post(json.dumps(good_payload()).encode())
        assert code == 200 and out["action"] in agent.policy.action_names
        code, out = post(json.dumps({**good_payload(), "gpu_util": -0.5}).encode())
        assert code == 422 and out["field"] == "gpu_util" and out["action"] == FALLBACK
        code, out = post(b"{not json")
        assert code == 400 and out["error"] == "invalid_json" and out["action"] == FALLBACK
        code, outs = post(json.dumps([good_payload()] * 5).encode())
        assert code == 200 and len(outs) == 5
        with urllib.request.urlopen(base + "/healthz", timeout=10) as r:
            health = json.loads(r.read())
            assert r.status == 200 and health["status"] == "ok" and health["nodes"] == ["solo"]
        with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
            text = r.read().decode()
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        assert "# TYPE aro_agent_decisions_total counter" in text
        assert f'aro_agent_decisions_total{{action="{FALLBACK}"}}' in text
        assert 'aro_agent_invalid_input_total{field="gpu_util"}' in text
        assert "aro_agent_decision_latency_seconds_count" in text
    finally:
        server.shutdown()
        server.server_close()


def test_closed_loop_matches_in_simulator_evaluation():
    """The env makes raw observations, the agent decides from a JSON dict of fields, the
    env applies the action: the same actions and KPIs as `evaluation.rollout`."""
    from aro_jax.training import evaluation as ev
    from aro_jax.training.checkpointing import load_trained_policy
    from aro_jax.envs.scenarios import cluster_params

    run_dir, export_dir = trained()
    cfg, policy, weights, _ = load_trained_policy(run_dir)
    p = jax.tree.map(lambda x: x[0], cluster_params(cfg, "diurnal"))
    env = sv.ServingNodeEnv(cfg.env.action_set)
    ticks, key = 200, jax.random.PRNGKey(7)
    ref = jax.jit(lambda k: ev.rollout(env, policy, p, k, ticks, weights))(key)

    agent = Agent(load_policy(export_dir), node="solo")
    k_reset, k_steps = jax.random.split(key)
    _, state = env.reset_env(k_reset, p)
    obs_fn = jax.jit(lambda s: sv.raw_observation(s, p))
    step_fn = jax.jit(lambda k, s, a: env.transition(jax.random.split(k)[1], s, a, p)[:2])
    actions, metrics = [], []
    for k in jax.random.split(k_steps, ticks):
        raw = np.asarray(obs_fn(state))
        message = json.dumps({f: float(v) for f, v in zip(sv.OBS_FIELDS, raw)})
        out = agent.decide(json.loads(message))
        assert "error" not in out, out
        actions.append(out["action_index"])
        state, m = step_fn(k, state, out["action_index"])
        metrics.append(m)
    np.testing.assert_array_equal(np.array(actions), np.asarray(ref["action"]))
    assert len(set(actions)) > 1
    got = {k: np.stack([np.asarray(m[k]) for m in metrics]) for k in metrics[0]}
    kpi_ref, kpi_got = ev.kpis(ref, cfg.env.tick_s, p), ev.kpis(got, cfg.env.tick_s, p)
    for name in ev.KPIS:
        np.testing.assert_allclose(kpi_got[name], kpi_ref[name], rtol=1e-5, err_msg=name)


# --------------------------------------------------------------------------------------
# The control loop reads the allocation the cluster runs (kube-state-metrics, router)
# --------------------------------------------------------------------------------------


def _kube(namespace: str, pod: str, resource: str, unit: str, value: float, **extra) -> tuple:
    from aro_jax.deploy.metrics_source import POD_REQUESTS

    labels = {"namespace": namespace, "pod": pod, "container": "vllm", "resource": resource, "unit": unit, **extra}
    return (POD_REQUESTS, tuple(sorted(labels.items()))), value


def cluster_samples(replicas=3, cpu_per_pod=12.0, mem_per_pod_gb=80.0, forward=0.2, small=0.1, namespace="default") -> dict:
    from aro_jax.deploy import metrics_source as ms

    out = {(ms.DEPLOYMENT_REPLICAS, (("deployment", "vllm"), ("namespace", namespace))): float(replicas),
           (ms.ROUTER_FORWARD_FRACTION, (("router", "a"),)): forward, (ms.ROUTER_SMALL_MODEL_FRACTION, (("router", "a"),)): small}
    for i in range(replicas):
        for resource, unit, v in (("cpu", "core", cpu_per_pod), ("memory", "byte", mem_per_pod_gb * 1e9)):
            k, val = _kube(namespace, f"vllm-7d9f8b6c5-x{i}z", resource, unit, v)
            out[k] = val
    return out


def test_allocation_from_kube_state_metrics_and_the_router():
    from aro_jax.deploy import metrics_source as ms

    samples = cluster_samples()
    # Not this Deployment's: another Deployment whose name starts alike, another namespace.
    for pod, ns in (("vllm-small-5c4b3a2d1-q1w2e", "default"), ("vllm-7d9f8b6c5-x0z", "other")):
        k, v = _kube(ns, pod, "cpu", "core", 99.0)
        samples[k] = v
    samples[(ms.DEPLOYMENT_REPLICAS, (("deployment", "vllm-small"), ("namespace", "default")))] = 7.0
    samples[(ms.ROUTER_FORWARD_FRACTION, (("router", "b"),))] = 0.4  # two router instances: their mean
    got = ms.allocation_of(samples, "default", "vllm")
    assert got == pytest.approx({"replicas": 3.0, "cpu_cores": 36.0, "host_memory_gb": 240.0, "forward_fraction": 0.3, "small_model_fraction": 0.1})
    # Relabelled by a Prometheus job that sets its own namespace label: the original one counts.
    k, v = _kube("monitoring", "vllm-7d9f8b6c5-x0z", "cpu", "core", 8.0, exported_namespace="default")
    assert ms.allocation_of({k: v}, "default", "vllm") == {"cpu_cores": 8.0}
    assert ms.allocation_of({}, "default", "vllm") == {}  # nothing known: every quantity absent
    # The same series parsed from a kube-state-metrics exposition, and the PromQL that asks for them.
    text = ('# TYPE kube_deployment_status_replicas gauge\nkube_deployment_status_replicas{namespace="default",deployment="vllm"} 2\n'
            '# TYPE kube_pod_container_resource_requests gauge\n'
            'kube_pod_container_resource_requests{namespace="default",pod="vllm-7d9f8b6c5-abcde",uid="u",container="vllm",node="n1",resource="cpu",unit="core"} 16\n'
            'kube_pod_container_resource_requests{namespace="default",pod="vllm-7d9f8b6c5-abcde",uid="u",container="vllm",node="n1",resource="memory",unit="byte"} 1.28e+11\n')
    assert ms.allocation_of(ms.parse_exposition(text), "default", "vllm") == {"replicas": 2.0, "cpu_cores": 16.0, "host_memory_gb": 128.0}
    q = ms.PrometheusQuery("http://prom:9090", 'namespace="llm"', namespace="llm", deployment="vllm")
    assert q.kube_query == ('kube_deployment_status_replicas{namespace="llm",deployment="vllm"} or '
                            'kube_pod_container_resource_requests{namespace="llm",pod=~"vllm-[a-z0-9]+-[a-z0-9]+",resource=~"cpu|memory"}')


class _ClusterSource:
    """vLLM counters of `engines` engines, plus the cluster's allocation when `cluster` is set."""

    def __init__(self, engines=2, cluster=None):
        self.engines, self.cluster, self.total = engines, cluster, 0.0

    def fetch(self):
        from aro_jax.deploy import metrics_source as ms

        self.total += 300.0
        samples = {}
        for e in range(self.engines):
            lab, n = (("engine", str(e)),), self.total / self.engines
            samples.update({(ms.RUNNING, lab): 1.0, (ms.WAITING, lab): 0.0, (ms.KV_USAGE, lab): 0.5,
                            (ms.SUCCESS, (*lab, ("finished_reason", "stop"))): n, (f"{ms.E2E}_sum", lab): 2.0 * n, (f"{ms.E2E}_count", lab): n})
        samples.update(self.cluster or {})
        return ms.Scrape(samples, 0.0)


def _loop(source, **opts):
    from aro_jax.deploy.control_loop import ControlLoop, LoopOptions

    _, export_dir = trained()
    clock = iter(30.0 * np.arange(1, 10_000))
    return ControlLoop(load_policy(export_dir), "solo", source, LoopOptions(**opts), clock=lambda: next(clock))


def test_loop_observes_and_acts_on_what_the_cluster_runs():
    """The observation's allocation and the base of each action are what kube-state-metrics
    and the router report, not what the agent asked for: a change the cluster refused or
    capped is seen at the next tick."""
    src = _ClusterSource(engines=2, cluster=cluster_samples(replicas=3, cpu_per_pod=12.0, mem_per_pod_gb=80.0, forward=0.2, small=0.1))
    loop = _loop(src)
    first = loop.tick()
    # A (re)started agent holds what runs, not the export's initial allocation.
    assert first["decided_by"] == "hold"
    assert (loop.desired.replicas, loop.desired.cpu_cores, loop.desired.host_memory_gb) == (3.0, 36.0, 240.0)
    for _ in range(4):
        d = loop.tick()
        assert d["decided_by"] == "policy"
        obs = loop.last_observation
        assert (obs["cpu_cores"], obs["host_memory_gb"], obs["replicas_pending"]) == (36.0, 240.0, 1.0)
        assert obs["forward_fraction"] == pytest.approx(0.2) and obs["small_model_fraction"] == pytest.approx(0.1)
        # The cluster never applies anything: each decision is one step from what runs, never compounding.
        assert abs(loop.desired.replicas - 3.0) <= 1 and abs(loop.desired.cpu_cores - 36.0) <= loop.agent.policy._limits["solo"]["cpu_step_cores"]
    text = loop.telemetry.text()
    assert 'aro_agent_actual_state_observed{deployment="vllm",namespace="default",quantity="cpu_cores"} 1.0' in text
    assert loop.state()["actual"]["replicas"] == 3.0


def test_loop_without_allocation_series_uses_its_desired_state_and_says_so():
    loop = _loop(_ClusterSource(engines=2))
    loop.tick()
    loop.tick()
    obs = loop.last_observation
    c = loop.controls
    assert obs["cpu_cores"] == np.float32(c.initial_cpu_cores) and obs["host_memory_gb"] == np.float32(c.initial_host_memory_gb)
    text = loop.telemetry.text()
    for q in ("replicas", "cpu_cores", "host_memory_gb", "forward_fraction", "small_model_fraction"):
        assert f'aro_agent_actual_state_observed{{deployment="vllm",namespace="default",quantity="{q}"}} 0.0' in text
