"""Live metrics of a vLLM deployment, and what one tick of them says about the node.

Two sources give the same thing, a list of samples (series name, labels, value):
- `VllmScrape`: GET each engine's `/metrics` (Prometheus text format), parsed with
  `prometheus_client.parser`;
- `PrometheusQuery`: one PromQL instant query over a Prometheus server's HTTP API
  (`/api/v1/query`) for the same series, restricted by a label selector.

`MetricsWindow.update(scrape)` turns consecutive scrapes into per-tick quantities:
counter deltas per series (a counter that went down was reset, e.g. an engine restart,
and counts from zero, as Prometheus' `rate()` does), histogram deltas (mean = delta of
`_sum` / delta of `_count`, fractions below a bound from the `_bucket` deltas), and
gauges summed or averaged over engines.

vLLM V1 metric names, from the vLLM docs "Production Metrics" (docs.vllm.ai, usage/metrics
and design/metrics, v0.9-v0.11): gauges `vllm:num_requests_running`,
`vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc` (a fraction in [0, 1]; it replaced
the deprecated `vllm:gpu_cache_usage_perc`); counters `vllm:request_success_total`
(label `finished_reason`: stop, length, abort), `vllm:prompt_tokens_total`,
`vllm:generation_tokens_total`; histograms `vllm:time_to_first_token_seconds`,
`vllm:inter_token_latency_seconds`, `vllm:e2e_request_latency_seconds`. The API server's
`prometheus_client` process collector adds `process_cpu_seconds_total` and
`process_resident_memory_bytes` (prometheus_client docs, "Process Collector").

The allocation the cluster actually runs (`allocation_of`), read rather than remembered,
under the names a cluster has:
- kube-state-metrics (docs/metrics/workload/deployment-metrics.md and pod-metrics.md of
  github.com/kubernetes/kube-state-metrics, v2): `kube_deployment_status_replicas
  {namespace,deployment}`, "the number of replicas per deployment" (the Deployment's
  `status.replicas`: its non-terminated pods, ready or starting; `kube_deployment_spec_replicas`
  is what was asked for, not what runs), and `kube_pod_container_resource_requests
  {namespace,pod,container,node,resource,unit}` with `resource="cpu",unit="core"` and
  `resource="memory",unit="byte"`, summed over the Deployment's pods: the pods whose name is
  `<deployment>-<pod-template-hash>-<suffix>` (a Deployment's ReplicaSet is named
  `<deployment>-<hash>` and its pods `<replicaset>-<suffix>`, Kubernetes docs "Deployments");
- the serving router, which applies the agent's shares and reports the ones it applies:
  `aro_router_forward_fraction` and `aro_router_small_model_fraction` (gauges in [0, 1],
  averaged over router instances; same label selector as the engines).
A series that Prometheus relabelled (`exported_namespace`, when kube-state-metrics is
scraped without `honor_labels`) is matched on its original label.
"""

from __future__ import annotations

import json
import math
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_USAGE = "vllm:kv_cache_usage_perc"
KV_USAGE_DEPRECATED = "vllm:gpu_cache_usage_perc"
SUCCESS = "vllm:request_success_total"
PROMPT_TOKENS = "vllm:prompt_tokens_total"
GENERATION_TOKENS = "vllm:generation_tokens_total"
TTFT = "vllm:time_to_first_token_seconds"
ITL = "vllm:inter_token_latency_seconds"
E2E = "vllm:e2e_request_latency_seconds"
PROCESS_CPU = "process_cpu_seconds_total"
PROCESS_RSS = "process_resident_memory_bytes"
# Requests the router sent to peer regions (it applies aro_desired_forward_fraction); the
# engines never see them. Optional: without it the agent estimates them from the fraction.
FORWARDED = "aro_router_forwarded_requests_total"
# Requests refused before reaching an engine because the prompt exceeds the model's
# context (vLLM answers HTTP 400 and counts them in no engine series). Optional: without
# it the agent takes them as none.
REJECTED = "aro_router_rejected_requests_total"
ROUTER_FORWARD_FRACTION = "aro_router_forward_fraction"
ROUTER_SMALL_MODEL_FRACTION = "aro_router_small_model_fraction"
DEPLOYMENT_REPLICAS = "kube_deployment_status_replicas"
POD_REQUESTS = "kube_pod_container_resource_requests"
ALLOCATION = ("replicas", "cpu_cores", "host_memory_gb", "forward_fraction", "small_model_fraction")
HISTOGRAMS = (TTFT, ITL, E2E)
ABORT_REASONS = {"abort", "error"}

SCALAR_NAMES = (RUNNING, WAITING, KV_USAGE, KV_USAGE_DEPRECATED, SUCCESS, PROMPT_TOKENS, GENERATION_TOKENS, PROCESS_CPU, PROCESS_RSS, FORWARDED,
                REJECTED, ROUTER_FORWARD_FRACTION, ROUTER_SMALL_MODEL_FRACTION)
SERIES_NAMES = SCALAR_NAMES + tuple(f"{h}{suffix}" for h in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count"))
KUBE_NAMES = (DEPLOYMENT_REPLICAS, POD_REQUESTS)
# Without these the observation cannot be built (KV usage may come from either name).
REQUIRED = (RUNNING, WAITING, SUCCESS, f"{E2E}_count", f"{E2E}_sum")
MAX_BODY_BYTES = 16 * 1024 * 1024


class SourceError(RuntimeError):
    """A source could not be read at all (every target failed, or the query failed)."""


@dataclass
class Scrape:
    """Samples of one tick: (name, labels as a sorted tuple of pairs) -> value."""

    samples: dict[tuple[str, tuple], float]
    time_s: float
    targets_ok: int = 1
    targets_failed: list[str] = field(default_factory=list)


def _key(name: str, labels: dict) -> tuple[str, tuple]:
    return name, tuple(sorted((k, str(v)) for k, v in labels.items() if k != "__name__"))


def parse_exposition(text: str, extra_labels: dict | None = None) -> dict[tuple[str, tuple], float]:
    """The samples of SERIES_NAMES and KUBE_NAMES in a Prometheus text exposition (prometheus_client's
    parser); NaN values are dropped (a gauge with no data)."""
    out = {}
    wanted = set(SERIES_NAMES) | set(KUBE_NAMES)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in wanted and not math.isnan(float(s.value)):
                out[_key(s.name, {**s.labels, **(extra_labels or {})})] = float(s.value)
    return out


def _get(url: str, timeout_s: float) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout_s) as r:  # noqa: S310 (operator-given URL)
        body = r.read(MAX_BODY_BYTES + 1)
    if len(body) > MAX_BODY_BYTES:
        raise SourceError(f"{url}: response larger than {MAX_BODY_BYTES} bytes")
    return body


class VllmScrape:
    """Scrape vLLM engines directly: `urls` are base URLs (`http://host:8000`) or full
    `/metrics` URLs. A target that fails is reported, the others still count."""

    def __init__(self, urls: list[str], timeout_s: float = 5.0):
        if not urls:
            raise ValueError("--vllm needs at least one URL")
        self.urls = [u if u.rstrip("/").endswith("/metrics") else u.rstrip("/") + "/metrics" for u in urls]
        for u in self.urls:
            if urllib.parse.urlparse(u).scheme not in ("http", "https"):
                raise ValueError(f"--vllm URL {u!r} must start with http:// or https://")
        self.timeout_s = timeout_s

    def describe(self) -> str:
        return f"vLLM /metrics of {len(self.urls)} engine(s)"

    def fetch(self) -> Scrape:
        samples, failed = {}, []
        for url in self.urls:
            try:
                text = _get(url, self.timeout_s).decode("utf-8")
                samples.update(parse_exposition(text, {"instance": url}))
            except Exception as e:  # noqa: BLE001 - one bad engine must not stop the loop
                failed.append(f"{url}: {type(e).__name__}: {str(e)[:200]}")
        if len(failed) == len(self.urls):
            raise SourceError("; ".join(failed))
        return Scrape(samples, time.time(), len(self.urls) - len(failed), failed)


class PrometheusQuery:
    """Read the same series through a Prometheus server: one instant query
    `{__name__=~"<names>", <selector>}` per tick (Prometheus HTTP API, /api/v1/query), and,
    given the Deployment (`namespace`, `deployment`), one for its kube-state-metrics series
    (replicas, and the CPU and memory requests of its pods)."""

    def __init__(self, url: str, selector: str = "", timeout_s: float = 5.0, namespace: str | None = None, deployment: str | None = None):
        if urllib.parse.urlparse(url).scheme not in ("http", "https"):
            raise ValueError(f"--prometheus URL {url!r} must start with http:// or https://")
        selector = selector.strip().strip("{}").strip()
        if selector and "=" not in selector:
            raise ValueError(f"--selector {selector!r} must be label matchers such as 'namespace=\"llm\",job=\"vllm\"'")
        self.url, self.selector, self.timeout_s = url.rstrip("/"), selector, timeout_s
        names = "|".join(SERIES_NAMES)
        self.query = "{" + f'__name__=~"{names}"' + (f",{selector}" if selector else "") + "}"
        self.kube_query = None
        if namespace is not None and deployment is not None:
            ns, dep = _promql_string(namespace), _promql_string(deployment)
            pods = _promql_string(_pod_name_regex(deployment))
            self.kube_query = (f'{DEPLOYMENT_REPLICAS}{{namespace="{ns}",deployment="{dep}"}} or '
                               f'{POD_REQUESTS}{{namespace="{ns}",pod=~"{pods}",resource=~"cpu|memory"}}')

    def describe(self) -> str:
        return f"Prometheus {self.url} ({self.selector or 'no selector'})"

    def instant(self, query: str) -> list[dict]:
        """Result vector of an instant query; SourceError on any failure."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": query})
        try:
            doc = json.loads(_get(url, self.timeout_s))
        except urllib.error.HTTPError as e:
            raise SourceError(f"Prometheus query failed: HTTP {e.code}: {e.read(300).decode(errors='replace')}") from e
        except (OSError, ValueError) as e:
            raise SourceError(f"Prometheus {self.url} unreachable or answered garbage: {type(e).__name__}: {e}") from e
        if doc.get("status") != "success" or doc.get("data", {}).get("resultType") != "vector":
            raise SourceError(f"Prometheus query {query!r} failed: {doc.get('error', doc)!s:.300}")
        return doc["data"]["result"]

    def fetch(self) -> Scrape:
        samples = {}
        items = self.instant(self.query)
        if self.kube_query is not None:
            items = items + self.instant(self.kube_query)
        for item in items:
            try:
                v = float(item["value"][1])
            except (KeyError, IndexError, TypeError, ValueError):
                continue
            if not math.isnan(v):
                samples[_key(item["metric"].get("__name__", ""), item["metric"])] = v
        return Scrape(samples, time.time())


def _promql_string(value: str) -> str:
    """`value` inside a double-quoted PromQL string."""
    return value.replace("\\", "\\\\").replace('"', '\\"')


def _pod_name_regex(deployment: str) -> str:
    """The names of a Deployment's pods: <deployment>-<pod-template-hash>-<suffix>."""
    return re.escape(deployment) + "-[a-z0-9]+-[a-z0-9]+"


def _original(labels: dict, name: str) -> str | None:
    return labels.get(f"exported_{name}", labels.get(name))


def allocation_of(samples: dict[tuple[str, tuple], float], namespace: str, deployment: str) -> dict[str, float]:
    """What the cluster runs for this Deployment, from one scrape: `replicas` (ready and
    starting pods), `cpu_cores` and `host_memory_gb` (requests summed over its pods),
    `forward_fraction` and `small_model_fraction` (the router's). A quantity without a
    series is absent from the result."""
    pod_name = re.compile(_pod_name_regex(deployment))
    replicas, cpu, mem = [], 0.0, 0.0
    seen_cpu = seen_mem = False
    shares: dict[str, list[float]] = {}
    for (name, labels), value in samples.items():
        if not math.isfinite(value):
            continue
        if name in (ROUTER_FORWARD_FRACTION, ROUTER_SMALL_MODEL_FRACTION):
            shares.setdefault(name, []).append(value)
            continue
        if name not in KUBE_NAMES:
            continue
        lab = dict(labels)
        if _original(lab, "namespace") != namespace:
            continue
        if name == DEPLOYMENT_REPLICAS:
            if _original(lab, "deployment") == deployment:
                replicas.append(value)
        elif pod_name.fullmatch(_original(lab, "pod") or ""):
            resource, unit = lab.get("resource"), lab.get("unit")
            if resource == "cpu" and unit in ("core", None):
                cpu, seen_cpu = cpu + value, True
            elif resource == "memory" and unit in ("byte", None):
                mem, seen_mem = mem + value, True
    out = {}
    if replicas:
        out["replicas"] = max(replicas)  # one series per kube-state-metrics instance
    if seen_cpu:
        out["cpu_cores"] = cpu
    if seen_mem:
        out["host_memory_gb"] = mem / 1e9
    for key, name in (("forward_fraction", ROUTER_FORWARD_FRACTION), ("small_model_fraction", ROUTER_SMALL_MODEL_FRACTION)):
        if shares.get(name):
            out[key] = min(max(sum(shares[name]) / len(shares[name]), 0.0), 1.0)
    return out


# --------------------------------------------------------------------------------------
# Per-tick quantities
# --------------------------------------------------------------------------------------


@dataclass
class TickMetrics:
    """What one tick of metrics says (rates over the tick; None where no series exists).
    `missing` names the series that were absent this tick."""

    interval_s: float
    engines: int
    running: float
    waiting: float
    kv_usage: float | None
    finished_ok: float  # requests completed (stop, length) during the tick
    aborted: float
    forwarded: float | None
    rejected: float | None
    e2e_sum_s: float
    e2e_count: float
    ttft_count: float
    ttft_within: dict[float, float]  # bucket upper bound (s) -> delta of the cumulative count
    itl_sum_s: float
    itl_count: float
    cpu_seconds: float | None
    rss_bytes: float | None
    prompt_tokens: float
    generation_tokens: float
    missing: list[str]

    def ttft_fraction_within(self, bound_s: float) -> float | None:
        """Share of this tick's first tokens within `bound_s`, interpolated linearly
        between bucket bounds (as histogram_quantile does)."""
        if self.ttft_count <= 0 or not self.ttft_within:
            return None
        edges = sorted(self.ttft_within)
        prev_edge, prev_count = 0.0, 0.0
        for edge in edges:
            count = self.ttft_within[edge]
            if bound_s <= edge:
                if math.isinf(edge):
                    return prev_count / self.ttft_count
                share = (bound_s - prev_edge) / (edge - prev_edge) if edge > prev_edge else 1.0
                return min(max((prev_count + share * (count - prev_count)) / self.ttft_count, 0.0), 1.0)
            prev_edge, prev_count = edge, count
        return min(prev_count / self.ttft_count, 1.0)


_NOT_ENGINE_SERIES = frozenset((ROUTER_FORWARD_FRACTION, ROUTER_SMALL_MODEL_FRACTION) + KUBE_NAMES)


class MetricsWindow:
    """Consecutive scrapes -> TickMetrics. Keeps the last value of every counter series
    (also while it is absent, for `forget_ticks` ticks) so a series that returns after a
    failed scrape is diffed against its old value rather than counted from zero."""

    def __init__(self, forget_ticks: int = 20):
        self.forget_ticks = forget_ticks
        self._last: dict[tuple, tuple[float, int]] = {}  # series -> (value, tick seen)
        self._tick = 0
        self._prev_time: float | None = None

    def _delta(self, key, value: float, first: bool) -> float:
        prev = self._last.get(key)
        self._last[key] = (value, self._tick)
        if prev is None:
            return 0.0 if first else value  # a new series started from zero since the last tick
        return value - prev[0] if value >= prev[0] else value  # went down: reset, counts from zero

    def update(self, scrape: Scrape, interval_s: float | None = None) -> TickMetrics | None:
        """Quantities since the previous scrape; None for the first one (nothing to diff)."""
        first = self._prev_time is None
        self._tick += 1
        dt = interval_s if interval_s is not None else (scrape.time_s - self._prev_time if not first else 0.0)
        self._prev_time = scrape.time_s
        gauges: dict[str, list[float]] = {}
        deltas: dict[str, float] = {}
        buckets: dict[str, dict[float, float]] = {}
        success_ok = success_abort = 0.0
        engines = set()
        for (name, labels), value in scrape.samples.items():
            if name in _NOT_ENGINE_SERIES:  # the allocation (allocation_of), not the engines' load
                continue
            if name in (RUNNING, WAITING, KV_USAGE, KV_USAGE_DEPRECATED, PROCESS_RSS):
                gauges.setdefault(name, []).append(value)
                if name == RUNNING:
                    engines.add(labels)
                continue
            d = self._delta((name, labels), value, first)
            if name == SUCCESS:
                reason = dict(labels).get("finished_reason", "stop")
                if reason in ABORT_REASONS:
                    success_abort += d
                else:
                    success_ok += d
            elif name.endswith("_bucket"):
                le = dict(labels).get("le")
                try:
                    edge = float(le)
                except (TypeError, ValueError):
                    continue
                per = buckets.setdefault(name[: -len("_bucket")], {})
                per[edge] = per.get(edge, 0.0) + d
            deltas[name] = deltas.get(name, 0.0) + d
        self._last = {k: v for k, v in self._last.items() if self._tick - v[1] <= self.forget_ticks}
        if first:
            return None
        present = set(gauges) | set(deltas)
        missing = [n for n in REQUIRED if n not in present]
        if KV_USAGE not in gauges and KV_USAGE_DEPRECATED not in gauges:
            missing.append(KV_USAGE)
        kv = gauges.get(KV_USAGE, gauges.get(KV_USAGE_DEPRECATED))
        return TickMetrics(
            interval_s=dt,
            engines=len(engines),
            running=sum(gauges.get(RUNNING, [])),
            waiting=sum(gauges.get(WAITING, [])),
            kv_usage=sum(kv) / len(kv) if kv else None,
            finished_ok=success_ok,
            aborted=success_abort,
            forwarded=deltas.get(FORWARDED),
            rejected=deltas.get(REJECTED),
            e2e_sum_s=deltas.get(f"{E2E}_sum", 0.0),
            e2e_count=deltas.get(f"{E2E}_count", 0.0),
            ttft_count=deltas.get(f"{TTFT}_count", 0.0),
            ttft_within=buckets.get(TTFT, {}),
            itl_sum_s=deltas.get(f"{ITL}_sum", 0.0),
            itl_count=deltas.get(f"{ITL}_count", 0.0),
            cpu_seconds=deltas.get(PROCESS_CPU),
            rss_bytes=sum(gauges[PROCESS_RSS]) if PROCESS_RSS in gauges else None,
            prompt_tokens=deltas.get(PROMPT_TOKENS, 0.0),
            generation_tokens=deltas.get(GENERATION_TOKENS, 0.0),
            missing=missing,
        )
