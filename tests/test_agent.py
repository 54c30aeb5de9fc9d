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
    from aro_jax.algorithms import evaluation as ev
    from aro_jax.algorithms.checkpointing import load_trained_policy
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
    kpi_ref, kpi_got = ev.kpis(ref, cfg.env.tick_s), ev.kpis(got, cfg.env.tick_s)
    for name in ev.KPIS:
        np.testing.assert_allclose(kpi_got[name], kpi_ref[name], rtol=1e-5, err_msg=name)
