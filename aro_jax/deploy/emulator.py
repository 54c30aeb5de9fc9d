"""A vLLM deployment emulated by the simulator: serves vLLM's metric names and accepts
replica (and allocation) changes, so the agent can be tested end to end without GPUs.

One emulator is one node (`ServingNodeEnv` with that node's EnvParams). Each simulated
tick (`POST /advance`) it applies the desired state it was last given (`POST /scale`:
replicas, and optionally cpu_cores, host_memory_gb, forward_fraction,
small_model_fraction) as the simulator's one action per tick, steps the simulator, and
adds the tick's counts to the counters of its engines, which `GET /metrics` serves in the
Prometheus text format with vLLM's names (see `metrics_source` for the list and the
vLLM docs it comes from): one engine per ready replica, label `engine`.

Modelling choices (the fluid model has expected counts, so counts are fractional):
completed requests are the tick's served requests, aborted the dropped ones; the waiting
gauge is the queue; the running gauge is served rate x mean e2e latency (Little's law);
KV-cache usage is the GPU utilisation; histogram buckets follow a log-normal matched to
the tick's mean and p95, with the TTFT bucket at the SLO set to the share of requests
the simulator counts as meeting it; process CPU seconds and resident memory follow the
CPU and memory utilisations. The router's forwarded requests have their own counter.

It also serves what the rest of a cluster reports about the node (names and labels in
`metrics_source`): kube-state-metrics' `kube_deployment_spec_replicas` (the replicas last
asked for), `kube_deployment_status_replicas` (ready and starting),
`kube_deployment_status_replicas_ready`, and `kube_pod_container_resource_requests` of
one pod per ready or starting replica (the node's CPU cores and host memory split evenly),
and the router's `aro_router_forward_fraction` and `aro_router_small_model_fraction`.

    python -m aro_jax.deploy.emulator --run-dir RUN --node solo --port 9400
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from aro_jax.deploy import metrics_source as ms

# vLLM's default histogram buckets (vllm/v1/metrics/loggers.py, v0.9-v0.11).
TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS_S = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS_S = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
MODEL_NAME = "emulated"
GB = 1e9


def _lognormal_cdf(x, mean, p95):
    """P(X <= x) for a log-normal matched to a mean and a 95th percentile."""
    mean = max(mean, 1e-9)
    ratio = math.log(max(p95, mean * 1.0001) / mean)
    sd = max(1.645 - math.sqrt(max(1.645**2 - 2.0 * ratio, 0.0)), 1e-3)
    mu = math.log(mean) - 0.5 * sd**2
    return 0.5 * (1.0 + math.erf((math.log(max(x, 1e-12)) - mu) / sd / math.sqrt(2.0)))


class _Hist:
    def __init__(self, edges):
        self.edges = edges
        self.buckets = np.zeros(len(edges))  # cumulative counts per upper bound
        self.count = 0.0
        self.sum = 0.0

    def add(self, count, mean, cumulative_share):
        self.buckets += count * np.asarray(cumulative_share)
        self.count += count
        self.sum += count * mean

    def family(self, name, doc, labels, values, share):
        fam = HistogramMetricFamily(name, doc, labels=labels)
        cum = [(f"{e}", b * share) for e, b in zip(self.edges, self.buckets)] + [("+Inf", self.count * share)]
        fam.add_metric(values, cum, self.sum * share)
        return fam


class Engine:
    """One emulated vLLM engine's cumulative counters."""

    def __init__(self):
        self.success = {"stop": 0.0, "abort": 0.0}
        self.prompt_tokens = self.generation_tokens = self.cpu_seconds = 0.0
        self.ttft, self.itl, self.e2e = _Hist(TTFT_BUCKETS_S), _Hist(ITL_BUCKETS_S), _Hist(E2E_BUCKETS_S)


class ServingEmulator:
    """The simulator behind vLLM metric names. `params`: one node's EnvParams."""

    def __init__(self, params, action_set: str = "extended", seed: int = 0, num_ticks: int = 2880,
                 namespace: str = "default", deployment: str = "vllm", warmup: bool = False):
        import jax

        from aro_jax.envs.serving import ServingNodeEnv, raw_observation

        self.params, self.env = params, ServingNodeEnv(action_set)
        self.namespace, self.deployment = namespace, deployment
        self._lock = threading.Lock()
        k_reset, k_steps = jax.random.split(jax.random.PRNGKey(seed))
        _, self.state = self.env.reset_env(k_reset, params)
        # The same keys as the in-simulator evaluation (`evaluation.rollout` of num_ticks).
        self._tick_keys = jax.random.split(k_steps, num_ticks)
        self._step = jax.jit(self._scanned_step)
        self._obs = jax.jit(lambda s: raw_observation(s, params))
        # Compile the tick now (result discarded): the first POST /advance then answers in a
        # tick's time, not a compile's, which on a loaded host outlasts a client's timeout.
        jax.block_until_ready(self._step(self._tick_keys[0], self.state, 4))  # 4: MaintainCurrent
        # With `warmup`, the day starts one tick later: first a tick before it (tick -1, its
        # clock one tick earlier) whose counts are the simulator's reset observation, so a
        # reader that needs two scrapes for rates sees at tick 0 what the simulator's
        # policy sees at its first decision.
        self.tick = -1 if warmup else 0
        self.engines: dict[int, Engine] = {}
        self._next_engine = 0
        self.forwarded_total = 0.0
        self.rejected_total = 0.0
        self.gauges = {"waiting": 0.0, "running": 0.0, "kv": 0.0, "rss": 0.0}
        self.history: list[dict] = []
        self.desired = self._current()
        self._sync_engines()
        tokens = self._token_means()
        self._input_share = tokens[0] / max(tokens[0] + tokens[1], 1e-9)

    def _scanned_step(self, key, state, action):
        """One tick, compiled as the body of a scan as in `evaluation.rollout`: a transition
        jitted on its own rounds differently in float32 (XLA fuses it differently) and
        parts from the evaluation's trajectory within tens of ticks, and one decision
        flipped by such a rounding difference changes the rest of the day."""
        import jax

        def body(s, k):
            return self.env.transition(jax.random.split(k)[1], s, action, self.params)[:2]

        state, m = jax.lax.scan(body, state, key[None])
        return state, jax.tree.map(lambda x: x[0], m)

    def _token_means(self):
        from aro_jax.envs.traffic import token_stats

        t = token_stats(self.params.traffic)
        return float(t["input_mean"]), float(t["output_mean"])

    def _current(self) -> dict:
        s = self.state
        return {
            "replicas": float(s.replicas_ready + np.asarray(s.replicas_pending).sum()),
            "cpu_cores": float(s.cpu_cores), "host_memory_gb": float(s.host_memory_gb),
            "forward_fraction": float(s.forward_fraction), "small_model_fraction": float(s.small_model_fraction),
        }

    def _sync_engines(self):
        ready = int(round(float(self.state.replicas_ready)))
        while len(self.engines) < ready:  # a replica that became ready: a new engine from zero
            self.engines[self._next_engine] = Engine()
            self._next_engine += 1
        while len(self.engines) > ready:  # scale-down drains the newest engine
            self.engines.pop(max(self.engines))

    def set_desired(self, desired: dict) -> dict:
        """Replace parts of the desired state; unknown keys or non-numbers are refused."""
        bad = [k for k, v in desired.items() if k not in self.desired or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)]
        if bad:
            raise ValueError(f"unknown or non-numeric keys {bad}; send numbers for {sorted(self.desired)}")
        with self._lock:
            self.desired.update({k: float(v) for k, v in desired.items()})
            return dict(self.desired)

    def _action(self) -> int:
        """The one simulator action that moves the node toward the desired state."""
        # Compared in float32, as the simulator holds them, and exactly: a share that float32
        # steps left at 7e-9 instead of 0 is still moved when the agent asks for 0.
        cur = {k: np.float32(v) for k, v in self._current().items()}
        want = {k: np.float32(v) for k, v in self.desired.items()}
        if want["replicas"] > cur["replicas"]:
            return 1  # IncreaseGPU
        if want["replicas"] < cur["replicas"]:
            return 6  # DecreaseGPU
        for key, up, down in (("cpu_cores", 0, 5), ("host_memory_gb", 2, 7), ("forward_fraction", 3, 8), ("small_model_fraction", 9, 10)):
            if want[key] > cur[key]:
                return up
            if want[key] < cur[key]:
                return down
        return 4  # MaintainCurrent

    def advance(self) -> dict | None:
        """One simulated tick; returns its metrics (floats) and the action applied (None
        for the warm-up tick, which steps nothing)."""
        with self._lock:
            if self.tick < 0:
                self._warm_up()
                return None
            action = self._action()
            if self.tick >= len(self._tick_keys):
                raise ValueError(f"the emulated episode has {len(self._tick_keys)} ticks; all served")
            k = self._tick_keys[self.tick]
            # A scale-down drains a replica at the start of the tick: its engine serves no more.
            ready = int(round(float(self.state.replicas_ready)))
            if action == 6 and ready > float(self.params.min_replicas):
                while len(self.engines) > ready - 1:
                    self.engines.pop(max(self.engines))
            self.state, m = self._step(k, self.state, action)
            m = {name: float(v) for name, v in m.items()}
            m["action"] = action
            self.tick += 1
            self._account(m)
            self._sync_engines()
            self.history.append(m)
            return m

    def _warm_up(self):
        """The counts of the tick before the day, as the reset state reports it (`last`):
        its arrivals all served, no latency, the utilisations it states."""
        last = {k: float(v) for k, v in self.state.last.items()}
        arrivals = last["arrivals"]
        zero = dict.fromkeys(("ttft_mean_s", "ttft_p95_s", "e2e_mean_s", "e2e_p95_s", "tpot_s", "tokens_per_s"), 0.0)
        self._account({**zero, "served": arrivals * (1 - last["drop_fraction"]), "dropped": arrivals * last["drop_fraction"], "forwarded": 0.0,
                       "slo_attainment": last["slo_attainment"], "cpu_util": last["cpu_util"], "gpu_util": last["gpu_util"],
                       "memory_util": last["memory_util"], "queue_requests": float(self.state.queue_requests)})
        self.tick = 0

    def _account(self, m: dict):
        p, tick = self.params, float(self.params.tick_s)
        engines = list(self.engines.values()) or [Engine()]
        share = 1.0 / len(engines)
        served, dropped, fwd, rejected = m["served"], m["dropped"], m["forwarded"], m.get("rejected", 0.0)
        attempted = served + dropped + fwd
        within = min(max((m["slo_attainment"] * (attempted + rejected) - fwd) / served, 0.0), 1.0) if served > 0 else 1.0
        slo = float(p.slo_ttft_s)
        ttft_cdf = [_lognormal_cdf(e, m["ttft_mean_s"], m["ttft_p95_s"]) for e in TTFT_BUCKETS_S]
        ttft_cdf = [min(c, within) if e < slo else (within if e == slo else max(c, within)) for e, c in zip(TTFT_BUCKETS_S, ttft_cdf)]
        e2e_cdf = [_lognormal_cdf(e, m["e2e_mean_s"], m["e2e_p95_s"]) for e in E2E_BUCKETS_S]
        itl_cdf = [1.0 if e >= m["tpot_s"] else 0.0 for e in ITL_BUCKETS_S]
        tokens = m["tokens_per_s"] * tick * (served / max(served + fwd, 1e-9))
        cpu_s = m["cpu_util"] * float(self.state.cpu_cores) * tick
        for e in engines:
            e.success["stop"] += served * share
            e.success["abort"] += dropped * share
            e.prompt_tokens += tokens * self._input_share * share
            e.generation_tokens += tokens * (1 - self._input_share) * share
            e.cpu_seconds += cpu_s * share
            e.ttft.add(served * share, m["ttft_mean_s"], ttft_cdf)
            e.itl.add(served * share, m["tpot_s"], itl_cdf)
            e.e2e.add(served * share, m["e2e_mean_s"], e2e_cdf)
        self.forwarded_total += fwd
        self.rejected_total += rejected
        self.gauges = {
            "waiting": m["queue_requests"], "running": served / tick * m["e2e_mean_s"], "kv": m["gpu_util"],
            "rss": m["memory_util"] * float(self.state.host_memory_gb) * GB,
        }

    # ---- exposition ---------------------------------------------------------------
    def collect(self):
        """prometheus_client collector protocol: vLLM's families, one series per engine."""
        with self._lock:
            n = max(len(self.engines), 1)
            lab = ["model_name", "engine"]
            fams = {
                "running": GaugeMetricFamily(ms.RUNNING, "Number of requests in model execution batches.", labels=lab),
                "waiting": GaugeMetricFamily(ms.WAITING, "Number of requests waiting to be processed.", labels=lab),
                "kv": GaugeMetricFamily(ms.KV_USAGE, "KV-cache usage. 1 means 100 percent usage.", labels=lab),
                "success": CounterMetricFamily(ms.SUCCESS.removesuffix("_total"), "Count of successfully processed requests.", labels=[*lab, "finished_reason"]),
                "prompt": CounterMetricFamily(ms.PROMPT_TOKENS.removesuffix("_total"), "Number of prefill tokens processed.", labels=lab),
                "gen": CounterMetricFamily(ms.GENERATION_TOKENS.removesuffix("_total"), "Number of generation tokens processed.", labels=lab),
                "cpu": CounterMetricFamily(ms.PROCESS_CPU.removesuffix("_total"), "Total user and system CPU time spent in seconds.", labels=lab),
                "rss": GaugeMetricFamily(ms.PROCESS_RSS, "Resident memory size in bytes.", labels=lab),
            }
            hists = []
            for eid, e in sorted(self.engines.items()):
                v = [MODEL_NAME, str(eid)]
                fams["running"].add_metric(v, self.gauges["running"] / n)
                fams["waiting"].add_metric(v, self.gauges["waiting"] / n)
                fams["kv"].add_metric(v, self.gauges["kv"])
                for reason, count in e.success.items():
                    fams["success"].add_metric([*v, reason], count)
                fams["prompt"].add_metric(v, e.prompt_tokens)
                fams["gen"].add_metric(v, e.generation_tokens)
                fams["cpu"].add_metric(v, e.cpu_seconds)
                fams["rss"].add_metric(v, self.gauges["rss"] / n)
                hists += [
                    e.ttft.family(ms.TTFT, "Histogram of time to first token in seconds.", lab, v, 1.0),
                    e.itl.family(ms.ITL, "Histogram of inter-token latency in seconds.", lab, v, 1.0),
                    e.e2e.family(ms.E2E, "Histogram of e2e request latency in seconds.", lab, v, 1.0),
                ]
            fwd = CounterMetricFamily(ms.FORWARDED.removesuffix("_total"), "Requests the router forwarded to peer regions.", labels=["router"])
            fwd.add_metric(["emulated"], self.forwarded_total)
            rej = CounterMetricFamily(ms.REJECTED.removesuffix("_total"), "Requests refused: prompt over the model's context window.", labels=["router"])
            rej.add_metric(["emulated"], self.rejected_total)
            clock = GaugeMetricFamily("aro_emulator_clock_seconds", "Simulated clock: seconds since Monday 00:00 UTC.")
            clock.add_metric([], self._clock_s())
            tick = GaugeMetricFamily("aro_emulator_tick", "Simulated ticks served.")
            tick.add_metric([], float(self.tick))
            out = [*fams.values(), *hists, fwd, rej, *self._cluster_families(), clock, tick]
        yield from out

    def _cluster_families(self):
        """kube-state-metrics' view of the Deployment and the router's shares (lock held)."""
        s, ns, dep = self.state, self.namespace, self.deployment
        ready = int(round(float(s.replicas_ready)))
        starting = int(round(float(np.asarray(s.replicas_pending).sum())))
        lab = ["namespace", "deployment"]
        spec = GaugeMetricFamily("kube_deployment_spec_replicas", "Number of desired pods for a deployment.", labels=lab)
        spec.add_metric([ns, dep], float(round(self.desired["replicas"])))
        status = GaugeMetricFamily(ms.DEPLOYMENT_REPLICAS, "The number of replicas per deployment.", labels=lab)
        status.add_metric([ns, dep], float(ready + starting))
        status_ready = GaugeMetricFamily(f"{ms.DEPLOYMENT_REPLICAS}_ready", "The number of ready replicas per deployment.", labels=lab)
        status_ready.add_metric([ns, dep], float(ready))
        requests = GaugeMetricFamily(ms.POD_REQUESTS, "The number of requested request resource by a container.",
                                     labels=["namespace", "pod", "uid", "container", "node", "resource", "unit"])
        pods = [f"{dep}-6f8d9c7b5-e{eid}" for eid in sorted(self.engines)] + [f"{dep}-6f8d9c7b5-s{i}" for i in range(starting)]
        for pod in pods:
            for resource, unit, total in (("cpu", "core", float(s.cpu_cores)), ("memory", "byte", float(s.host_memory_gb) * GB)):
                requests.add_metric([ns, pod, f"uid-{pod}", "vllm", "emulated-node", resource, unit], total / len(pods))
        fwd = GaugeMetricFamily(ms.ROUTER_FORWARD_FRACTION, "Share of arrivals the router forwards to peer regions.", labels=["router"])
        fwd.add_metric(["emulated"], float(s.forward_fraction))
        small = GaugeMetricFamily(ms.ROUTER_SMALL_MODEL_FRACTION, "Share of requests the router sends to the small model.", labels=["router"])
        small.add_metric(["emulated"], float(s.small_model_fraction))
        return [spec, status, status_ready, requests, fwd, small]

    def exposition(self) -> bytes:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)
        return generate_latest(registry)

    def observation(self) -> dict:
        """What the simulator's own policy would observe now (raw fields, natural units)."""
        from aro_jax.contract import OBS_FIELDS

        with self._lock:
            return {f: float(v) for f, v in zip(OBS_FIELDS, np.asarray(self._obs(self.state)))}

    def _clock_s(self) -> float:
        before = float(self.params.tick_s) if self.tick < 0 else 0.0
        return (float(self.state.clock_s) - before) % (7 * 86_400.0)

    def clock_s(self) -> float:
        with self._lock:
            return self._clock_s()


def make_server(emulator: ServingEmulator, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """GET /metrics, GET /state, POST /scale {desired...}, POST /advance {"ticks": n}."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 10

        def _send(self, code, body: bytes, ctype="application/json"):
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):  # noqa: N802
            if self.path == "/metrics":
                self._send(200, emulator.exposition(), "text/plain; version=0.0.4; charset=utf-8")
            elif self.path == "/state":
                self._send(200, json.dumps({"tick": emulator.tick, "clock_s": emulator.clock_s(), "current": emulator._current(), "desired": emulator.desired,
                                            "observation": emulator.observation()}).encode())
            else:
                self._send(404, b'{"error":"not_found"}')

        def do_POST(self):  # noqa: N802
            try:
                body = json.loads(self.rfile.read(min(int(self.headers.get("Content-Length") or 0), 65536)) or b"{}")
                if not isinstance(body, dict):
                    raise ValueError("send a JSON object")
                if self.path == "/scale":
                    self._send(200, json.dumps(emulator.set_desired(body)).encode())
                elif self.path == "/advance":
                    ticks = int(body.get("ticks", 1))
                    out = [m for m in (emulator.advance() for _ in range(max(ticks, 0))) if m is not None]
                    self._send(200, json.dumps({"tick": emulator.tick, "metrics": out}).encode())
                else:
                    self._send(404, b'{"error":"not_found"}')
            except (ValueError, TypeError) as e:
                self._send(400, json.dumps({"error": "bad_request", "reason": str(e)[:300]}).encode())

        def log_message(self, *args):
            pass

    return ThreadingHTTPServer((host, port), Handler)


def node_params_from_run(run_dir: Path, node: str, scenario: str = "diurnal"):
    """One node's EnvParams from a training run's config (the scenario's, start time fixed)
    and the scenario's length in ticks (a day, or a trace's own length)."""
    import jax

    from aro_jax.config import load_config
    from aro_jax.envs.scenarios import scenario_plan

    cfg = load_config(Path(run_dir) / "config.yaml")
    names = [n.name for n in cfg.cluster.nodes]
    if node not in names:
        raise ValueError(f"unknown node {node!r}; the run's cluster has {names}")
    plan = scenario_plan(cfg, scenario)
    return cfg, jax.tree.map(lambda x: x[names.index(node)], plan.params), plan.num_ticks


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m aro_jax.deploy.emulator", description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", required=True, help="training run directory (its config.yaml describes the cluster)")
    ap.add_argument("--node", required=True, help="the node to emulate")
    ap.add_argument("--scenario", default="diurnal", help="scenario of the simulated traffic (default diurnal)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ticks", type=int, help="episode length in ticks (default the scenario's: a day, or a trace's own length)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9400)
    ap.add_argument("--namespace", default="default", help="namespace label of the emulated Deployment's kube-state-metrics series")
    ap.add_argument("--deployment", default="vllm", help="name of the emulated Deployment (its pods are named after it)")
    ap.add_argument("--warmup", action="store_true", help="start with one tick before the day whose counts are the simulator's reset observation")
    args = ap.parse_args(argv)
    cfg, params, scenario_ticks = node_params_from_run(Path(args.run_dir), args.node, args.scenario)
    emulator = ServingEmulator(params, cfg.env.action_set, args.seed, args.ticks or scenario_ticks, args.namespace, args.deployment, args.warmup)
    server = make_server(emulator, args.host, args.port)
    print(f"emulator: node {args.node} ({args.scenario}) on http://{args.host}:{server.server_port}/metrics", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
