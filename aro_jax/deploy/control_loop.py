"""The deployment agent as a control loop: vLLM metrics in, desired state out.

Each tick (the export's tick, 30 s by default) the loop reads the node's vLLM metrics
(`metrics_source`) and the allocation the cluster actually runs (kube-state-metrics'
replicas and pod requests, the router's forward and small-model shares), turns them into
the policy's observation with the state it keeps across ticks (the simulator's forecaster,
the previous queue, time features from the clock), asks the policy for an action, applies
it with the simulator's rules to the actual allocation, bounds it by the operator's
limits, and publishes it as Prometheus gauges (`aro_desired_replicas{namespace,deployment}`
and one gauge per other decision) for KEDA or an HPA to apply. It patches the Deployment
itself only in the optional direct mode (`k8s_scaler.KubernetesScaler`).

Safety: shadow mode decides and publishes but never actuates; replicas stay within
[min, max] and change by at most `max_step` per tick; when the metrics are missing or
unreadable for `stale_ticks` ticks in a row the loop switches to a Reactive (HPA-style)
rule on whatever utilisation it still sees and flags it (`aro_agent_fallback_active`,
a log line); a new export is loaded on SIGHUP or when the export directory changes,
validated first, and the old policy kept if it fails.

How the observation is estimated from vLLM's metrics over one tick of length dt:
- request_rate_rps: (completed + aborted + change of the waiting queue + forwarded +
  rejected) / dt (requests are conserved; forwarded from the router's counter, else
  estimated from the forward fraction the agent set; rejected, prompts over the context
  window, from the router's counter, else none); drop_fraction: aborted / arrivals;
- latency_e2e_mean_s: delta of the e2e histogram's sum over delta of its count;
- gpu_util: mean KV-cache usage over engines (the load signal vLLM production-stack and
  llm-d scale on); capacity_rps: completed rate / gpu_util (a throughput at a known
  utilisation), else ready replicas x the export's per-replica capacity;
- cpu_util, memory_util: delta of process CPU seconds / dt / CPU cores; resident memory /
  host memory;
- slo_attainment: share of first tokens within the TTFT SLO (histogram buckets) when the
  mean inter-token latency meets the TPOT SLO, over all attempted and rejected requests
  (forwarded requests counted as meeting it, rejected ones as missing it);
- replicas_ready: engines reporting; replicas_pending: the Deployment's replicas (ready
  and starting) - ready;
- cpu_cores, host_memory_gb, forward_fraction, small_model_fraction: what the cluster
  runs. An action starts from these too, so a change the cluster refused or bounded (a
  scale-down at the minimum, a CPU request capped by the pod's share) is seen, never
  assumed. Where a quantity has no series the loop uses the desired state it holds
  instead and says so (`aro_agent_actual_state_observed{quantity}` 0): then a refused
  change goes unseen until the series return.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable, Protocol

import numpy as np
from prometheus_client import Counter, Gauge, Histogram

from aro_jax.deploy.agent import Agent, Telemetry
from aro_jax.deploy.controls import NodeControls
from aro_jax.deploy.export import SPEC_CHECKSUM_FILE, SPEC_FILE, ExportError, ExportedPolicy, load_policy
from aro_jax.deploy.forecast import SECONDS_PER_DAY, SECONDS_PER_WEEK, Forecaster
from aro_jax.deploy.metrics_source import ALLOCATION, MetricsWindow, SourceError, TickMetrics, allocation_of

log = logging.getLogger("aro.agent")

MONDAY_UNIX_S = 4 * 86_400.0  # 1970-01-05 00:00 UTC, a Monday: the simulator's week starts there
GB = 1e9
# The Reactive fallback: Kubernetes HPA's 10 % tolerance and the target load of the
# simulator's Reactive baseline (aro_jax/envs/heuristics.py), scale-down on the highest
# recommendation of a 240 s stabilisation window.
FALLBACK_TARGET_LOAD = 0.7
FALLBACK_TOLERANCE = 0.1
FALLBACK_SCALE_DOWN_WINDOW_S = 240.0
ACTIONS = ("IncreaseCPU", "IncreaseGPU", "IncreaseMemory", "RebalanceWorkload", "MaintainCurrent", "DecreaseCPU",
           "DecreaseGPU", "DecreaseMemory", "PullBackWorkload", "DegradeQuality", "RestoreQuality")


def week_clock_s() -> float:
    """Seconds since the last Monday 00:00 UTC (the simulator's clock, modulo a week)."""
    return (time.time() - MONDAY_UNIX_S) % SECONDS_PER_WEEK


@dataclass(frozen=True)
class DesiredState:
    """What the agent wants the node to run (float32 values, as the simulator holds them)."""

    replicas: float
    cpu_cores: float
    host_memory_gb: float
    forward_fraction: float
    small_model_fraction: float


class Actuator(Protocol):
    def apply(self, desired: DesiredState) -> None: ...


@dataclass
class LoopOptions:
    namespace: str = "default"
    deployment: str = "vllm"
    shadow: bool = False
    min_replicas: float | None = None  # default: the export's limits
    max_replicas: float | None = None
    max_step: int = 1  # replicas added or removed per tick at most
    stale_ticks: int = 3  # bad ticks in a row before the Reactive fallback
    interval_s: float | None = None  # default: the export's tick


class LoopMetrics:
    """Gauges of the desired state and of the loop's health, in the agent's registry."""

    def __init__(self, telemetry: Telemetry, namespace: str, deployment: str):
        r, lab = telemetry.registry, ["namespace", "deployment"]
        self.labels = (namespace, deployment)
        g = lambda name, doc: Gauge(name, doc, lab, registry=r).labels(*self.labels)  # noqa: E731
        self.replicas = g("aro_desired_replicas", "Replicas the agent wants the Deployment to run (for KEDA/HPA).")
        self.cpu = g("aro_desired_cpu_cores", "CPU cores the agent wants the node's pods to request in total.")
        self.memory = g("aro_desired_host_memory_gb", "Host memory (GB) the agent wants the node's pods to request in total.")
        self.forward = g("aro_desired_forward_fraction", "Share of arrivals the router should forward to peer regions.")
        self.small = g("aro_desired_small_model_fraction", "Share of requests the router should send to the small model.")
        self.fallback = g("aro_agent_fallback_active", "1 while the Reactive fallback decides (metrics stale or missing).")
        self.shadow = g("aro_agent_shadow_mode", "1 when the agent publishes without actuating.")
        self.bad_ticks = g("aro_agent_consecutive_bad_ticks", "Ticks in a row with missing or unreadable metrics.")
        self.clock = g("aro_agent_observed_clock_seconds", "Clock (s since Monday 00:00 UTC) of the metrics of the last decision.")
        self.field = Gauge("aro_agent_observation", "The last observation the policy saw, by field (natural units).", ["field"], registry=r)
        self.ticks = Counter("aro_agent_ticks", "Control-loop ticks, by what decided.", ["decided_by"], registry=r)
        self.source_errors = Counter("aro_agent_source_errors", "Ticks whose metrics could not be read, by kind.", ["kind"], registry=r)
        self.missing = Counter("aro_agent_metric_missing", "Ticks a vLLM series was absent, by series.", ["metric"], registry=r)
        self.reloads = Counter("aro_agent_reloads", "Policy reloads, by result.", ["result"], registry=r)
        self.actuation_errors = Counter("aro_agent_actuation_errors", "Failed attempts to apply the desired state.", registry=r)
        actual = Gauge("aro_agent_actual_state_observed", "1 where the cluster's actual allocation was read this tick "
                       "(kube-state-metrics, router), 0 where the agent used the desired state it holds.", [*lab, "quantity"], registry=r)
        self.actual = {q: actual.labels(*self.labels, q) for q in ALLOCATION}
        self.tick_seconds = Histogram("aro_agent_tick_duration_seconds", "Wall time of one tick: read metrics, decide, publish.",
                                      buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0), registry=r)


class ControlLoop:
    """One node's control loop. `source.fetch()` returns a `Scrape` (or raises
    SourceError); `clock()` gives seconds since Monday 00:00 UTC; `actuator`, when given
    and not in shadow mode, applies each tick's desired state."""

    def __init__(self, policy: ExportedPolicy, node: str | None, source, options: LoopOptions | None = None,
                 clock: Callable[[], float] = week_clock_s, actuator: Actuator | None = None,
                 telemetry: Telemetry | None = None):
        self.options = options or LoopOptions()
        self.telemetry = telemetry or Telemetry()
        self.agent = Agent(policy, node, self.telemetry)
        self.node = self.agent.node or policy.resolve_node(None)
        self.agent.node = self.node
        self.controls = NodeControls.from_spec(policy.spec, self.node)
        self._check_fields(policy)
        self.source, self.clock, self.actuator = source, clock, actuator
        self.metrics = LoopMetrics(self.telemetry, self.options.namespace, self.options.deployment)
        self.metrics.shadow.set(1 if self.options.shadow else 0)
        c, lim = self.controls, policy._limits[self.node]
        self.min_replicas = float(self.options.min_replicas if self.options.min_replicas is not None else lim["min_replicas"])
        self.max_replicas = float(self.options.max_replicas if self.options.max_replicas is not None else lim["max_replicas"])
        if not 0 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"replica bounds must satisfy 0 <= min ({self.min_replicas:g}) <= max ({self.max_replicas:g})")
        if self.options.max_step < 1:
            raise ValueError(f"max change per tick must be >= 1 replica, got {self.options.max_step}")
        if self.options.stale_ticks < 1:
            raise ValueError(f"stale ticks must be >= 1, got {self.options.stale_ticks}")
        self.interval_s = float(self.options.interval_s or c.tick_s)
        self.desired = DesiredState(*(float(np.float32(x)) for x in (
            np.clip(c.initial_replicas, self.min_replicas, self.max_replicas), c.initial_cpu_cores, c.initial_host_memory_gb, 0.0, 0.0)))
        self.forecaster = Forecaster(c.forecast_prior_rps)
        self.window = MetricsWindow()
        self.actual: dict[str, float] = {}  # the allocation read this tick (float32 values)
        self._decided = False  # whether the policy or the fallback has set the desired state
        self._prev_waiting: float | None = None
        self._prev_clock: float | None = None
        self.bad_ticks = 0
        self.fallback_active = False
        self._recent_fallback: list[float] = []
        self.last_observation: dict | None = None
        self.last_decision: dict | None = None
        self._lock = threading.Lock()
        self._reload_requested = threading.Event()
        self._stop = threading.Event()
        self._watch = self._export_stamp()
        self._publish()

    # ---- policy -------------------------------------------------------------------
    def _check_fields(self, policy: ExportedPolicy) -> None:
        needed = set(_OBSERVATION_FIELDS)
        if set(policy.fields) != needed:
            raise ValueError(f"this export observes {sorted(set(policy.fields) ^ needed)} differently from what the control loop builds; it cannot run it")
        if tuple(policy.action_names) != ACTIONS[: len(policy.action_names)]:
            raise ValueError(f"unknown action set {list(policy.action_names)}; the control loop applies {list(ACTIONS)}")

    def _export_stamp(self):
        d = self.agent.policy.path
        try:
            return tuple((f.stat().st_ino, f.stat().st_mtime_ns, f.stat().st_size) for f in (d / SPEC_FILE, d / SPEC_CHECKSUM_FILE))
        except OSError:
            return None

    def request_reload(self, *_args) -> None:
        """Ask for a reload at the next tick (safe to call from a signal handler)."""
        self._reload_requested.set()

    def reload(self) -> bool:
        """Load the export again from its directory; swap only if it loads, serves this
        node, has the controls and fields the loop needs and decides on the last
        observation. Returns whether the new policy is live."""
        path = self.agent.policy.path
        try:
            policy = load_policy(path)
            agent = Agent(policy, self.node, self.telemetry)
            NodeControls.from_spec(policy.spec, self.node)
            self._check_fields(policy)
            if self.last_observation is not None:
                out = agent.decide(dict(self.last_observation))
                if out.get("fallback"):
                    raise ValueError(f"the new policy refuses the last observation: {out['reason']}")
        except (ExportError, ValueError, KeyError, TypeError, OSError) as e:
            self.metrics.reloads.labels("failed").inc()
            self.telemetry.set_policy(self.agent.policy)
            log.error("aro agent: reload of %s failed, keeping the running policy: %s", path, e)
            return False
        with self._lock:
            self.agent = agent
            self.controls = NodeControls.from_spec(policy.spec, self.node)
        self.metrics.reloads.labels("ok").inc()
        log.warning("aro agent: reloaded policy %s (config %s)", path.name, policy.spec.get("training", {}).get("config_sha256", "?")[:12])
        return True

    def _maybe_reload(self) -> None:
        stamp = self._export_stamp()
        changed = stamp is not None and stamp != self._watch
        if self._reload_requested.is_set() or changed:
            self._reload_requested.clear()
            self._watch = stamp
            self.reload()

    # ---- one tick -----------------------------------------------------------------
    def tick(self, clock_s: float | None = None) -> dict:
        """Read metrics, decide, publish (and actuate). Never raises on bad metrics or an
        unreadable clock. `clock_s`: the clock already read by the caller."""
        t0 = time.perf_counter()
        self._maybe_reload()
        problem, tm = None, None
        if clock_s is None:
            try:
                clock_s = float(self.clock())
            except Exception as e:  # noqa: BLE001
                problem = f"clock unreadable: {type(e).__name__}: {e}"
                clock_s = (self._prev_clock or 0.0) + self.interval_s
        dt = _clock_delta(self._prev_clock, clock_s, self.interval_s) if self._prev_clock is not None else 0.0
        dt = dt if dt > 0 else self.interval_s  # first tick, or a clock that did not move
        self._prev_clock = clock_s
        try:
            if problem is not None:
                raise SourceError(problem)
            self.actual = {}
            scrape = self.source.fetch()
            self.actual = {k: float(np.float32(v)) for k, v in allocation_of(scrape.samples, self.options.namespace, self.options.deployment).items()}
            for failed in scrape.targets_failed:
                self.metrics.source_errors.labels("target").inc()
                log.warning("aro agent: metrics target failed: %s", failed)
            tm = self.window.update(scrape, interval_s=dt)
            if tm is None:
                problem = "first sample (no deltas yet)"
            elif tm.missing:
                for name in tm.missing:
                    self.metrics.missing.labels(name).inc()
                problem = f"missing series {tm.missing}"
            elif tm.engines == 0:
                problem = "no engine reports"
        except SourceError as e:
            self.metrics.source_errors.labels("unreadable").inc()
            problem = f"metrics unreadable: {e}"
        except Exception as e:  # noqa: BLE001 - one bad sample never stops the loop
            self.metrics.source_errors.labels("internal").inc()
            problem = f"{type(e).__name__}: {e}"

        for q, g in self.metrics.actual.items():
            g.set(1 if q in self.actual else 0)
        if problem is None:
            try:
                obs = self._observation(tm, clock_s)
            except Exception as e:  # noqa: BLE001
                problem, obs = f"cannot build the observation: {type(e).__name__}: {e}", None
        if problem is None:
            decision = self._decide_policy(obs)
        else:
            decision = self._decide_degraded(problem, tm)
        self._prev_waiting = tm.waiting if tm is not None and not tm.missing else self._prev_waiting
        decision["clock_s"] = clock_s
        with self.telemetry.lock:
            self._publish()
            self.metrics.clock.set(clock_s)
        self._actuate()
        self.metrics.tick_seconds.observe(time.perf_counter() - t0)
        self.last_decision = decision
        return decision

    def base(self) -> DesiredState:
        """What the node runs: the allocation read this tick, the held desired state for
        any quantity without a series."""
        return DesiredState(**{q: self.actual.get(q, getattr(self.desired, q)) for q in ALLOCATION})

    def _observation(self, tm: TickMetrics, clock_s: float) -> dict:
        c, d = self.controls, self.base()
        dt = max(tm.interval_s, 1e-9)
        waiting_change = tm.waiting - self._prev_waiting if self._prev_waiting is not None else 0.0
        local = max(tm.finished_ok + tm.aborted + waiting_change, 0.0)
        if tm.forwarded is not None:
            forwarded = max(tm.forwarded, 0.0)
        else:
            self.metrics.missing.labels("aro_router_forwarded_requests_total").inc()
            f = min(d.forward_fraction, 0.99)
            forwarded = local * f / (1.0 - f)
        rejected = max(tm.rejected or 0.0, 0.0)
        if tm.rejected is None:
            self.metrics.missing.labels("aro_router_rejected_requests_total").inc()
        arrivals = local + forwarded + rejected
        gpu_util = min(max(tm.kv_usage, 0.0), 1.0)
        served_rps = tm.finished_ok / dt
        if gpu_util > 1e-3 and served_rps > 0:
            capacity = served_rps / gpu_util
        else:
            capacity = tm.engines * c.replica_capacity_rps
        cpu_util = self._last_field("cpu_util", 0.0) if tm.cpu_seconds is None else tm.cpu_seconds / dt / max(d.cpu_cores, 1e-6)
        mem_util = self._last_field("memory_util", 0.0) if tm.rss_bytes is None else tm.rss_bytes / (max(d.host_memory_gb, 1e-6) * GB)
        e2e = tm.e2e_sum_s / tm.e2e_count if tm.e2e_count > 0 else self._last_field("latency_e2e_mean_s", 0.0)
        attempted = tm.finished_ok + tm.aborted + forwarded
        within = tm.ttft_fraction_within(c.slo_ttft_s)
        itl_ok = tm.itl_count <= 0 or tm.itl_sum_s / tm.itl_count <= c.slo_tpot_s
        if within is None:
            within = 1.0 if tm.finished_ok <= 0 else self._last_field("slo_attainment", 1.0)
        # Rejected requests count as misses, as in the simulator.
        slo = (tm.finished_ok * within * float(itl_ok) + forwarded) / (attempted + rejected) if attempted + rejected > 0 else 1.0
        local_t = clock_s + c.tz_offset_h * 3600.0
        self.forecaster.update(local_t - dt, arrivals / dt)
        day, week = 2 * math.pi * local_t / SECONDS_PER_DAY, 2 * math.pi * local_t / SECONDS_PER_WEEK
        ready = float(tm.engines)
        obs = {
            "request_rate_rps": arrivals / dt,
            "latency_e2e_mean_s": e2e,
            "cpu_util": cpu_util,
            "gpu_util": gpu_util,
            "memory_util": mem_util,
            "queue_requests": tm.waiting,
            "replicas_ready": ready,
            "replicas_pending": max(d.replicas - ready, 0.0),
            "cpu_cores": d.cpu_cores,
            "host_memory_gb": d.host_memory_gb,
            "forward_fraction": d.forward_fraction,
            "small_model_fraction": d.small_model_fraction,
            "capacity_rps": capacity,
            "time_of_day_sin": math.sin(day),
            "time_of_day_cos": math.cos(day),
            "day_of_week_sin": math.sin(week),
            "day_of_week_cos": math.cos(week),
            "forecast_rate_rps": self.forecaster.predict_rate_rps(local_t, c.forecast_horizon_s, c.tick_s),
            "drop_fraction": tm.aborted / arrivals if arrivals > 0 else 0.0,
            "slo_attainment": slo,
        }
        for name in ("cpu_util", "gpu_util", "memory_util", "drop_fraction", "slo_attainment"):
            obs[name] = min(max(obs[name], 0.0), 1.0)  # estimates, kept in the policy's domain
        return obs

    def _last_field(self, name: str, default: float) -> float:
        return float(self.last_observation[name]) if self.last_observation else default

    def _decide_policy(self, obs: dict) -> dict:
        with self._lock:
            agent = self.agent
        out = agent.decide(obs)
        if out.get("fallback"):  # the policy's own validation refused the estimate
            return self._decide_degraded(f"observation refused: {out.get('field')}: {out.get('reason')}", None)
        self.last_observation = obs
        for name, value in obs.items():
            self.metrics.field.labels(name).set(value)
        if self.fallback_active:
            log.warning("aro agent: metrics back, the policy decides again (after %d bad ticks)", self.bad_ticks)
        self.bad_ticks, self.fallback_active = 0, False
        self._recent_fallback.clear()
        self.metrics.bad_ticks.set(0)
        self.metrics.fallback.set(0)
        base = self.base()
        self.desired = self._bounded(self._apply_action(out["action"], obs["replicas_ready"], base), base)
        self._decided = True
        self.metrics.ticks.labels("policy").inc()
        return {"decided_by": "policy", "action": out["action"], "desired": asdict(self.desired)}

    def _decide_degraded(self, problem: str, tm: TickMetrics | None) -> dict:
        self.bad_ticks += 1
        self.metrics.bad_ticks.set(self.bad_ticks)
        base = self.base()
        if self.bad_ticks < self.options.stale_ticks:
            if not self._decided:  # nothing decided yet (a start): hold what runs, not the export's initial state
                self.desired = self._bounded(base, base)
            log.warning("aro agent: holding the desired state (%d/%d bad ticks): %s", self.bad_ticks, self.options.stale_ticks, problem)
            self.metrics.ticks.labels("hold").inc()
            return {"decided_by": "hold", "action": "MaintainCurrent", "reason": problem, "desired": asdict(self.desired)}
        if not self.fallback_active:
            log.error("aro agent: Reactive fallback ON after %d bad ticks: %s", self.bad_ticks, problem)
        self.fallback_active = True
        self.metrics.fallback.set(1)
        target = base.replicas
        if tm is not None and tm.kv_usage is not None and tm.engines > 0:
            ready = float(tm.engines)
            ratio = min(max(tm.kv_usage, 0.0), 1.0) / FALLBACK_TARGET_LOAD
            target = ready if abs(ratio - 1.0) <= FALLBACK_TOLERANCE else math.ceil(ready * ratio)
            if tm.aborted > 0:
                target = max(target, ready + 1)
        window = max(int(round(FALLBACK_SCALE_DOWN_WINDOW_S / self.interval_s)), 1)
        self._recent_fallback = (self._recent_fallback + [target])[-window:]
        if target < base.replicas:  # scale down only to the window's highest recommendation
            target = max(self._recent_fallback)
        self.desired = self._bounded(replace(base, replicas=float(target)), base)
        self._decided = True
        self.metrics.ticks.labels("fallback").inc()
        return {"decided_by": "fallback", "action": "Reactive", "reason": problem, "desired": asdict(self.desired)}

    def _apply_action(self, action: str, ready: float, d: DesiredState) -> DesiredState:
        """The simulator's action semantics (aro_jax/envs transition, step 1) applied to the
        allocation `d`, in float32."""
        c, lim = self.controls, self.agent.policy._limits[self.node]
        f32 = np.float32
        replicas, cpu, mem = f32(d.replicas), f32(d.cpu_cores), f32(d.host_memory_gb)
        fwd, small = f32(d.forward_fraction), f32(d.small_model_fraction)
        if action == "IncreaseGPU" and replicas < lim["max_replicas"]:
            replicas += f32(1)
        elif action == "DecreaseGPU" and ready > lim["min_replicas"]:
            replicas -= f32(1)
        elif action == "IncreaseCPU":
            cpu = np.clip(cpu + lim["cpu_step_cores"], lim["cpu_step_cores"], lim["max_cpu_cores"])
        elif action == "DecreaseCPU":
            lower = np.clip(cpu - lim["cpu_step_cores"], lim["cpu_step_cores"], lim["max_cpu_cores"])
            cpu = max(lower, min(cpu, f32(ready) * f32(1.0)))  # keep one core per ready replica
        elif action == "IncreaseMemory":
            mem = np.clip(mem + lim["memory_step_gb"], lim["memory_step_gb"], lim["max_host_memory_gb"])
        elif action == "DecreaseMemory":
            mem = np.clip(mem - lim["memory_step_gb"], lim["memory_step_gb"], lim["max_host_memory_gb"])
        elif action == "RebalanceWorkload":
            fwd = np.clip(fwd + f32(c.forward_step), f32(0), lim["max_forward_fraction"])
        elif action == "PullBackWorkload":
            fwd = np.clip(fwd - f32(c.forward_step), f32(0), lim["max_forward_fraction"])
        elif action == "DegradeQuality":
            small = np.clip(small + f32(c.quality_step), f32(0), lim["max_small_model_fraction"])
        elif action == "RestoreQuality":
            small = np.clip(small - f32(c.quality_step), f32(0), lim["max_small_model_fraction"])
        return DesiredState(*(float(f32(x)) for x in (replicas, cpu, mem, fwd, small)))

    def _bounded(self, new: DesiredState, base: DesiredState) -> DesiredState:
        """`new` with replicas within `max_step` of what runs (`base`) and within [min, max]."""
        step = self.options.max_step
        replicas = min(max(new.replicas, base.replicas - step), base.replicas + step)
        replicas = min(max(replicas, self.min_replicas), self.max_replicas)
        return replace(new, replicas=float(replicas))

    def _publish(self) -> None:
        d, m = self.desired, self.metrics
        m.replicas.set(d.replicas)
        m.cpu.set(d.cpu_cores)
        m.memory.set(d.host_memory_gb)
        m.forward.set(d.forward_fraction)
        m.small.set(d.small_model_fraction)

    def _actuate(self) -> None:
        if self.options.shadow or self.actuator is None:
            return
        try:
            self.actuator.apply(self.desired)
        except Exception as e:  # noqa: BLE001 - the next tick tries again
            self.metrics.actuation_errors.inc()
            log.error("aro agent: could not apply the desired state: %s: %s", type(e).__name__, e)

    def state(self) -> dict:
        """Desired state and loop status (for GET /state)."""
        return {
            "node": self.node, "namespace": self.options.namespace, "deployment": self.options.deployment,
            "shadow": self.options.shadow, "fallback_active": self.fallback_active, "bad_ticks": self.bad_ticks,
            "desired": asdict(self.desired), "actual": dict(self.actual), "last_decision": self.last_decision, "interval_s": self.interval_s,
        }

    # ---- running ------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    def run(self, ticks: int | None = None, clock_driven: bool = False, poll_s: float = 0.05) -> None:
        """Tick every `interval_s` of wall time, or (`clock_driven`) whenever `clock()` has
        advanced by at least half a tick since the last decision (replay at any speed).
        Stops after `ticks` ticks or on stop()."""
        done = 0
        next_t = time.monotonic()
        last_clock = None
        while not self._stop.is_set() and (ticks is None or done < ticks):
            if clock_driven:
                try:
                    now = float(self.clock())
                except Exception as e:  # noqa: BLE001 - an unreadable clock is waited out
                    log.warning("aro agent: clock unreadable: %s", e)
                    self._stop.wait(max(poll_s, 0.5))
                    continue
                if last_clock is not None and _clock_delta(last_clock, now, self.interval_s) < 0.5 * self.interval_s:
                    self._maybe_reload()
                    self._stop.wait(poll_s)
                    continue
                last_clock = now
                self.tick(now)
                done += 1
                continue
            else:
                wait = next_t - time.monotonic()
                if wait > 0:
                    if self._stop.wait(min(wait, 1.0)):
                        break
                    self._maybe_reload()
                    continue
                next_t += self.interval_s
            self.tick()
            done += 1

    def install_sighup(self) -> None:
        """Reload on SIGHUP (main thread only)."""
        signal.signal(signal.SIGHUP, self.request_reload)


def _clock_delta(prev: float, now: float, interval_s: float) -> float:
    """now - prev on a clock that wraps every week (0 when it has not moved)."""
    return (now - prev) % SECONDS_PER_WEEK


_OBSERVATION_FIELDS = (
    "request_rate_rps", "latency_e2e_mean_s", "cpu_util", "gpu_util", "memory_util", "queue_requests",
    "replicas_ready", "replicas_pending", "cpu_cores", "host_memory_gb", "forward_fraction",
    "small_model_fraction", "capacity_rps", "time_of_day_sin", "time_of_day_cos", "day_of_week_sin",
    "day_of_week_cos", "forecast_rate_rps", "drop_fraction", "slo_attainment",
)
