"""The agent's control loop: vLLM metrics -> observation (counter resets, missing series),
the numpy forecaster against the simulator's, stale-metrics fallback, shadow mode, replica
bounds, hot reload, direct mode's refusal, and the observation rebuilt from an emulated
vLLM deployment matching the simulator's own."""

import hashlib
import json
import logging
import os
import shutil
import signal
import threading
from types import SimpleNamespace

import numpy as np
import pytest

from _deploy_fixture import trained
from aro_jax.deploy.control_loop import ControlLoop, LoopOptions
from aro_jax.deploy.export import SPEC_CHECKSUM_FILE, SPEC_FILE, load_policy
from aro_jax.deploy.metrics_source import (
    E2E, KV_USAGE, KV_USAGE_DEPRECATED, RUNNING, SUCCESS, WAITING, MetricsWindow, Scrape, SourceError, VllmScrape, parse_exposition,
)

FIELDS = ("request_rate_rps", "latency_e2e_mean_s", "cpu_util", "gpu_util", "memory_util", "queue_requests", "replicas_ready",
          "replicas_pending", "cpu_cores", "host_memory_gb", "forward_fraction", "small_model_fraction", "capacity_rps",
          "time_of_day_sin", "time_of_day_cos", "day_of_week_sin", "day_of_week_cos", "forecast_rate_rps", "drop_fraction", "slo_attainment")


def engine_samples(engine: str, success: float, abort: float = 0.0, e2e_sum: float = 0.0, e2e_count: float = 0.0, waiting: float = 0.0,
                   kv: float = 0.5, kv_name: str = KV_USAGE) -> dict:
    lab = (("engine", engine),)
    return {
        (RUNNING, lab): 1.0, (WAITING, lab): waiting, (kv_name, lab): kv,
        (SUCCESS, (("engine", engine), ("finished_reason", "stop"))): success,
        (SUCCESS, (("engine", engine), ("finished_reason", "abort"))): abort,
        (f"{E2E}_sum", lab): e2e_sum, (f"{E2E}_count", lab): e2e_count,
    }


def test_counter_deltas_resets_and_new_series():
    w = MetricsWindow()
    assert w.update(Scrape(engine_samples("0", 100, e2e_sum=50, e2e_count=100), 0.0), 30.0) is None  # nothing to diff yet
    tm = w.update(Scrape(engine_samples("0", 130, abort=2, e2e_sum=80, e2e_count=130), 30.0), 30.0)
    assert tm.finished_ok == 30 and tm.aborted == 2 and tm.e2e_sum_s == 30 and tm.e2e_count == 30 and not tm.missing
    # Engine 0 restarted (its counters went down to 7): 7 requests since the reset, not -123.
    # Engine 1 is new: it started from zero since the last tick, so all of its 5 count.
    both = {**engine_samples("0", 7, e2e_sum=3.5, e2e_count=7), **engine_samples("1", 5, e2e_sum=5, e2e_count=5)}
    tm = w.update(Scrape(both, 60.0), 30.0)
    assert tm.finished_ok == 12 and tm.engines == 2
    assert tm.e2e_sum_s / tm.e2e_count == pytest.approx(8.5 / 12)
    # Engine 1 misses one scrape, then returns: diffed against its old value, not counted from zero.
    tm = w.update(Scrape(engine_samples("0", 10, e2e_sum=5, e2e_count=10), 90.0), 30.0)
    assert tm.finished_ok == 3 and tm.engines == 1
    both = {**engine_samples("0", 10, e2e_sum=5, e2e_count=10), **engine_samples("1", 9, e2e_sum=9, e2e_count=9)}
    assert w.update(Scrape(both, 120.0), 30.0).finished_ok == 4


def test_missing_series_and_the_deprecated_kv_name():
    w = MetricsWindow()
    w.update(Scrape(engine_samples("0", 1, kv_name=KV_USAGE_DEPRECATED), 0.0), 30.0)
    tm = w.update(Scrape(engine_samples("0", 2, kv=0.25, kv_name=KV_USAGE_DEPRECATED), 30.0), 30.0)
    assert tm.kv_usage == 0.25 and not tm.missing  # vllm:gpu_cache_usage_perc stands in
    samples = engine_samples("0", 3)
    del samples[(KV_USAGE, (("engine", "0"),))]
    del samples[(f"{E2E}_count", (("engine", "0"),))]
    tm = w.update(Scrape(samples, 60.0), 30.0)
    assert set(tm.missing) == {f"{E2E}_count", KV_USAGE}


def test_parse_vllm_exposition():
    text = "\n".join([
        "# HELP vllm:num_requests_running Number of requests in model execution batches.",
        "# TYPE vllm:num_requests_running gauge",
        'vllm:num_requests_running{engine="0",model_name="m"} 3.0',
        "# TYPE vllm:request_success_total counter",
        'vllm:request_success_total{engine="0",finished_reason="abort",model_name="m"} 2.0',
        'vllm:request_success_total{engine="0",finished_reason="stop",model_name="m"} 40.0',
        "# TYPE vllm:e2e_request_latency_seconds histogram",
        'vllm:e2e_request_latency_seconds_bucket{engine="0",le="1.0",model_name="m"} 10.0',
        'vllm:e2e_request_latency_seconds_bucket{engine="0",le="+Inf",model_name="m"} 42.0',
        'vllm:e2e_request_latency_seconds_sum{engine="0",model_name="m"} 84.0',
        'vllm:e2e_request_latency_seconds_count{engine="0",model_name="m"} 42.0',
        "# TYPE vllm:kv_cache_usage_perc gauge",
        'vllm:kv_cache_usage_perc{engine="0",model_name="m"} NaN',
        "# TYPE other_metric gauge",
        "other_metric 1",
    ]) + "\n"
    s = parse_exposition(text, {"instance": "a"})
    names = {name for name, _ in s}
    assert names == {RUNNING, SUCCESS, f"{E2E}_bucket", f"{E2E}_sum", f"{E2E}_count"}  # NaN gauge and unknown names dropped
    assert s[(SUCCESS, (("engine", "0"), ("finished_reason", "abort"), ("instance", "a"), ("model_name", "m")))] == 2.0


def test_numpy_forecaster_matches_the_simulators():
    import jax
    import jax.numpy as jnp

    from aro_jax.deploy.forecast import Forecaster
    from aro_jax.envs import forecast as fc

    rng = np.random.default_rng(0)
    ticks = 600
    t = 12_345.0 + 30.0 * np.arange(ticks)
    rate = 10 * (1.5 + np.sin(2 * np.pi * t / 86_400)) * rng.gamma(4, 0.25, ticks)
    ours = Forecaster(8.0)
    state = fc.init(jnp.float32(8.0))
    update = jax.jit(fc.update)
    predict = jax.jit(lambda s, x: fc.predict_rate_rps(s, x, 300.0, 30.0))
    for i in range(ticks):
        ours.update(t[i], rate[i])
        state = update(state, jnp.float32(t[i]), jnp.float32(rate[i]))
        if i % 50 == 0 or i == ticks - 1:
            ref = float(predict(state, jnp.float32(t[i] + 30.0)))
            assert ours.predict_rate_rps(t[i] + 30.0, 300.0, 30.0) == pytest.approx(ref, rel=2e-4), i
    assert not np.allclose(ours.coef[1:], 0)  # it learned something


# --------------------------------------------------------------------------------------
# The loop on a scripted source
# --------------------------------------------------------------------------------------


class ScriptedSource:
    """Cumulative vLLM counters of `engines` engines growing by `per_tick` each fetch;
    `fail` > 0 makes the next fetches raise (an unreachable Prometheus)."""

    def __init__(self, engines=2, per_tick=300.0, kv=0.5):
        self.engines, self.per_tick, self.kv, self.total, self.fail = engines, per_tick, kv, 0.0, 0

    def fetch(self):
        if self.fail > 0:
            self.fail -= 1
            raise SourceError("connection refused")
        self.total += self.per_tick
        samples = {}
        for e in range(self.engines):
            n = self.total / self.engines
            samples.update(engine_samples(str(e), n, e2e_sum=2.0 * n, e2e_count=n, kv=self.kv))
        return Scrape(samples, 0.0)


class RecordingActuator:
    def __init__(self):
        self.applied = []

    def apply(self, desired):
        self.applied.append(desired)


@pytest.fixture(scope="module")
def policy():
    _, export_dir = trained()
    return load_policy(export_dir)


def make_loop(policy, source, **opts):
    clock = iter(30.0 * np.arange(1, 10_000))
    return ControlLoop(policy, "solo", source, LoopOptions(**opts), clock=lambda: next(clock), actuator=RecordingActuator())


def test_stale_metrics_hold_then_reactive_fallback(policy, caplog):
    src = ScriptedSource(kv=0.95)
    loop = make_loop(policy, src, stale_ticks=3, max_step=4)
    assert loop.tick()["decided_by"] == "hold"  # first sample: no deltas yet
    assert loop.tick()["decided_by"] == "policy"
    src.fail = 5
    with caplog.at_level(logging.WARNING, logger="aro.agent"):
        assert [loop.tick()["decided_by"] for _ in range(2)] == ["hold", "hold"]
        assert loop.tick()["decided_by"] == "fallback"
    assert "Reactive fallback ON after 3 bad ticks" in caplog.text
    text = loop.telemetry.text()
    assert 'aro_agent_fallback_active{deployment="vllm",namespace="default"} 1.0' in text
    assert 'aro_agent_source_errors_total{kind="unreadable"} 3.0' in text
    src.fail = 0
    src.engines = 2
    # Back: the window diffs against the last good counters; Reactive on KV usage 0.95 with
    # 2 engines asks ceil(2 * 0.95 / 0.7) = 3 while it is still active, then the policy decides.
    before = loop.desired.replicas
    d = loop.tick()
    assert d["decided_by"] == "policy" and loop.fallback_active is False
    assert 'aro_agent_fallback_active{deployment="vllm",namespace="default"} 0.0' in loop.telemetry.text()
    assert abs(loop.desired.replicas - before) <= 1


def test_missing_series_fall_back_and_never_crash(policy):
    class Partial(ScriptedSource):
        def fetch(self):
            s = super().fetch()
            return Scrape({k: v for k, v in s.samples.items() if k[0] != WAITING}, 0.0)

    loop = make_loop(policy, Partial(), stale_ticks=2)
    outs = [loop.tick()["decided_by"] for _ in range(4)]
    assert outs == ["hold", "fallback", "fallback", "fallback"]
    assert f'aro_agent_metric_missing_total{{metric="{WAITING}"}} 3.0' in loop.telemetry.text()


def test_fallback_respects_max_step_and_bounds(policy):
    src = ScriptedSource(engines=2, kv=1.0)
    loop = make_loop(policy, src, stale_ticks=1, max_step=1, min_replicas=2, max_replicas=4)
    src.fail = 0
    loop.tick()
    # Force the fallback on every tick by dropping the e2e histogram, keep KV usage at 1.0.
    src.fetch_orig = src.fetch
    src.fetch = lambda: Scrape({k: v for k, v in src.fetch_orig().samples.items() if not k[0].startswith(E2E)}, 0.0)
    src.engines = 3  # 3 saturated engines: Reactive wants ceil(3 / 0.7) = 5 at once
    seen = []
    for _ in range(6):
        loop.tick()
        seen.append(loop.desired.replicas)
        src.engines = int(loop.desired.replicas)  # the Deployment follows
    assert seen[0] == 3.0 and all(b - a <= 1 for a, b in zip(seen, seen[1:])), seen  # +1 per tick (--max-step 1)
    assert max(seen) == 4 and min(seen) >= 2  # capped at --max-replicas


def test_shadow_mode_publishes_without_actuating(policy):
    loop = make_loop(policy, ScriptedSource(), shadow=True)
    for _ in range(5):
        loop.tick()
    assert loop.actuator.applied == []
    text = loop.telemetry.text()
    assert 'aro_agent_shadow_mode{deployment="vllm",namespace="default"} 1.0' in text
    assert 'aro_desired_replicas{deployment="vllm",namespace="default"}' in text
    live = make_loop(policy, ScriptedSource())
    for _ in range(5):
        live.tick()
    assert len(live.actuator.applied) == 5  # the same loop, not in shadow mode, actuates


def sign(export_dir, spec: dict) -> None:
    text = json.dumps(spec, indent=2) + "\n"
    (export_dir / SPEC_FILE).write_text(text)
    (export_dir / SPEC_CHECKSUM_FILE).write_text(hashlib.sha256(text.encode()).hexdigest() + "\n")


def test_hot_reload_good_and_corrupt_export(tmp_path, caplog):
    _, export_dir = trained()
    live = shutil.copytree(export_dir, tmp_path / "policy")
    loop = make_loop(load_policy(live), ScriptedSource())
    loop.install_sighup()
    try:
        loop.tick()
        loop.tick()
        # A good new export (here: new provenance), announced by SIGHUP.
        spec = json.loads((live / SPEC_FILE).read_text())
        spec["training"]["config_sha256"] = "f" * 64
        sign(live, spec)
        os.kill(os.getpid(), signal.SIGHUP)
        assert loop.tick()["decided_by"] == "policy"
        text = loop.telemetry.text()
        assert 'aro_agent_reloads_total{result="ok"} 1.0' in text and 'config_sha256="' + "f" * 64 in text
        # A corrupt one, noticed as a directory change: refused, the running policy kept.
        old_agent = loop.agent
        (live / SPEC_FILE).write_text((live / SPEC_FILE).read_text()[:100])
        with caplog.at_level(logging.ERROR, logger="aro.agent"):
            d = loop.tick()
        assert d["decided_by"] == "policy" and loop.agent is old_agent
        assert "reload of" in caplog.text and "keeping the running policy" in caplog.text
        assert 'aro_agent_reloads_total{result="failed"} 1.0' in loop.telemetry.text()
        # Corrupt parameters announced by SIGHUP: refused too.
        params = max((p for p in (live / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
        sign(live, spec)
        params.write_bytes(params.read_bytes()[:10])
        os.kill(os.getpid(), signal.SIGHUP)
        loop.tick()
        assert loop.agent is old_agent and 'aro_agent_reloads_total{result="failed"} 2.0' in loop.telemetry.text()
    finally:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)


def test_direct_mode_refuses_when_an_hpa_owns_the_deployment():
    from aro_jax.deploy.k8s_scaler import KubernetesScaler, ScalerRefused

    def hpa(name, target):
        return SimpleNamespace(metadata=SimpleNamespace(name=name), spec=SimpleNamespace(scale_target_ref=SimpleNamespace(kind="Deployment", name=target)))

    class Autoscaling:
        def __init__(self, items):
            self.items = items

        def list_namespaced_horizontal_pod_autoscaler(self, namespace):
            return SimpleNamespace(items=self.items)

    class Apps:
        def __init__(self):
            self.patches = []

        def patch_namespaced_deployment_scale(self, name, namespace, body):
            self.patches.append((namespace, name, body))

    with pytest.raises(ScalerRefused, match="keda-hpa-vllm-aro owns deployment llm/vllm"):
        KubernetesScaler("llm", "vllm", Apps(), Autoscaling([hpa("keda-hpa-vllm-aro", "vllm")]))
    apps, autoscaling = Apps(), Autoscaling([hpa("other", "router")])
    scaler = KubernetesScaler("llm", "vllm", apps, autoscaling)
    scaler.apply(SimpleNamespace(replicas=3.0))
    assert apps.patches == [("llm", "vllm", {"spec": {"replicas": 3}})]
    autoscaling.items.append(hpa("late", "vllm"))  # an HPA created later: the next patch is refused
    with pytest.raises(ScalerRefused):
        scaler.apply(SimpleNamespace(replicas=4.0))
    assert len(apps.patches) == 1


# --------------------------------------------------------------------------------------
# Against the emulated vLLM deployment (scraped over HTTP)
# --------------------------------------------------------------------------------------


def test_observation_from_emulated_vllm_matches_the_simulator():
    """The loop scrapes the emulator's /metrics like a vLLM engine's and rebuilds the
    observation the simulator itself would give the policy, field by field."""
    from aro_jax.deploy.emulator import ServingEmulator, make_server, node_params_from_run

    run_dir, export_dir = trained()
    cfg, params, _ = node_params_from_run(run_dir, "solo")
    ticks = 150
    em = ServingEmulator(params, cfg.env.action_set, seed=3, num_ticks=ticks)
    server = make_server(em)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    class ToEmulator:
        def apply(self, d):
            em.set_desired({"replicas": d.replicas, "cpu_cores": d.cpu_cores, "host_memory_gb": d.host_memory_gb,
                            "forward_fraction": d.forward_fraction, "small_model_fraction": d.small_model_fraction})

    try:
        loop = ControlLoop(load_policy(export_dir), "solo", VllmScrape([f"http://127.0.0.1:{server.server_port}"]), LoopOptions(),
                           clock=em.clock_s, actuator=ToEmulator())
        worst = np.zeros(len(FIELDS))
        actions, compared, starved = set(), 0, 0
        unobservable = [FIELDS.index("capacity_rps"), FIELDS.index("latency_e2e_mean_s")]
        for _ in range(ticks):
            d = loop.tick()
            if d["decided_by"] == "policy":
                ref = np.asarray(em._obs(em.state), np.float64)
                got = np.array([loop.last_observation[f] for f in FIELDS])
                err = np.abs(got - ref) / np.maximum(np.abs(ref), 1e-2)
                if ref[FIELDS.index("capacity_rps")] <= 0:
                    # Nothing can be served (cores or host memory starved): no request finishes,
                    # so the metrics cannot show capacity or latency; the loop reports its
                    # documented fallback (ready engines x the export's per-replica capacity).
                    starved += 1
                    ready = loop.last_observation["replicas_ready"]
                    assert got[unobservable[0]] == pytest.approx(ready * loop.controls.replica_capacity_rps, rel=1e-6)
                    err[unobservable] = 0.0
                compared += 1
                worst = np.maximum(worst, err)
                actions.add(d["action"])
            em.advance()
        bad = {f: float(v) for f, v in zip(FIELDS, worst) if v > 1e-4}
        assert not bad, bad
        assert compared - starved >= ticks // 2, (compared, starved)  # most ticks compare every field
        assert len(actions) > 1 and len({h["action"] for h in em.history}) > 1  # decisions were applied
    finally:
        server.shutdown()
        server.server_close()
