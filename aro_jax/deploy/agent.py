"""The deployment agent's decision logic: validated live metrics -> an action per tick.

Pure Python and numpy. Input is one JSON object per node and tick with the observation's
raw fields by name (`ExportedPolicy.fields`, natural units) and optionally `node`. Any
problem with it (not an object, a missing field, a wrong type, NaN or infinity, a value
out of range) gives a structured error and the safe fallback decision (MaintainCurrent)
with the reason; the agent never raises on input.

State across ticks: the exported policy is feed-forward on the current observation, so
this decision function keeps none (the load forecast arrives as the input field
`forecast_rate_rps`); the control loop (`aro_jax.deploy.control_loop`) holds the state
that turns live vLLM metrics into that observation. Monitoring goes through
`prometheus_client` (`Telemetry`), shared by the agent, the loop and the HTTP service.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import numpy as np
import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from aro_jax.deploy.export import ExportedPolicy

# `_created` series double the exposition and no consumer here reads them.
prometheus_client.disable_created_metrics()

FLOAT32_MAX = float(np.finfo(np.float32).max)
# Allowed range per field (inclusive); anything not listed must be >= 0.
FIELD_RANGES = {
    "time_of_day_sin": (-1.0, 1.0),
    "time_of_day_cos": (-1.0, 1.0),
    "day_of_week_sin": (-1.0, 1.0),
    "day_of_week_cos": (-1.0, 1.0),
    "cpu_util": (0.0, 1.0),
    "gpu_util": (0.0, 1.0),
    "memory_util": (0.0, 1.0),
    "forward_fraction": (0.0, 1.0),
    "small_model_fraction": (0.0, 1.0),
    "drop_fraction": (0.0, 1.0),
    "slo_attainment": (0.0, 1.0),
}
LATENCY_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
RESERVED_KEYS = {"node", "id"}
RANGE_TOLERANCE = 1e-6  # float32 rounding of a ratio that is 1 by construction
# Bounds on what a response echoes back, so a response stays proportional to its items.
MAX_ECHO_CHARS = 64
MAX_IGNORED_FIELDS = 16


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= MAX_ECHO_CHARS else text[: MAX_ECHO_CHARS - 3] + "..."


class Telemetry:
    """The agent's Prometheus metrics in one registry (one per agent process; tests make
    their own). Survives a policy reload: the new Agent gets the same Telemetry."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        # Held while the loop publishes a tick's gauges and while they are exposed, so a
        # scrape never sees half a tick (a new clock beside an old desired state).
        self.lock = threading.RLock()
        r = self.registry
        self.decisions = Counter("aro_agent_decisions", "Decisions made, by action (fallbacks included).", ["action"], registry=r)
        self.invalid = Counter("aro_agent_invalid_input", "Inputs refused (fallback decision), by field or error.", ["field"], registry=r)
        self.latency = Histogram(
            "aro_agent_decision_latency_seconds", "Time from input to decision (validation + policy).", buckets=LATENCY_BUCKETS_S, registry=r,
        )
        self.policy_info = Gauge("aro_agent_policy_info", "The loaded policy export.", ["format_version", "env_version", "config_sha256"], registry=r)
        self.http_requests = Counter("aro_agent_http_requests", "HTTP requests answered, by route and status code.", ["path", "code"], registry=r)
        self.http_rejected = Counter("aro_agent_http_rejected", "HTTP requests refused before a decision, by reason.", ["reason"], registry=r)

    def set_policy(self, policy: ExportedPolicy) -> None:
        spec = policy.spec
        self.policy_info.clear()
        self.policy_info.labels(str(spec["format_version"]), str(spec["env_version"]), str(spec.get("training", {}).get("config_sha256", ""))).set(1)

    def text(self) -> str:
        with self.lock:
            return prometheus_client.generate_latest(self.registry).decode()


class InvalidInput(ValueError):
    def __init__(self, field: str | None, reason: str, error: str = "invalid_input"):
        super().__init__(f"{field}: {reason}" if field else reason)
        self.field, self.reason, self.error = field, reason, error


class Agent:
    """Decisions from one exported policy. `node` fixes the node this agent serves; without
    it, a request names its node (required when the export has several)."""

    def __init__(self, policy: ExportedPolicy, node: str | None = None, telemetry: Telemetry | None = None):
        self.policy = policy
        self.node = policy.resolve_node(node) if node is not None else None
        self._lock = threading.Lock()
        self.telemetry = telemetry or Telemetry()
        self.telemetry.set_policy(policy)
        for name in policy.action_names:  # every action appears in /metrics from the start
            self.telemetry.decisions.labels(name)
        self.ticks = 0

    # ---- validation --------------------------------------------------------------
    def _node_of(self, payload: dict) -> str:
        node = payload.get("node", self.node)
        if node is None and len(self.policy.node_names) == 1:
            return self.policy.node_names[0]
        if node is None:
            raise InvalidInput("node", f"missing; this policy serves {list(self.policy.node_names)}")
        if not isinstance(node, str):
            raise InvalidInput("node", f"must be a string, got {type(node).__name__}")
        if self.node is not None and node != self.node:
            raise InvalidInput("node", f"this agent serves node {self.node!r}, got {_short(node)}")
        if node not in self.policy.node_names:
            raise InvalidInput("node", f"unknown node; this policy serves {list(self.policy.node_names)}")
        return node

    def validate(self, payload: Any) -> tuple[str, np.ndarray, list[str]]:
        """(node, raw observation (F,) float32, ignored extra keys) or InvalidInput."""
        if not isinstance(payload, dict):
            raise InvalidInput(None, f"expected a JSON object of metric fields, got {type(payload).__name__}")
        node = self._node_of(payload)
        raw = np.empty(len(self.policy.fields), np.float32)
        for i, name in enumerate(self.policy.fields):
            if name not in payload:
                raise InvalidInput(name, "missing")
            v = payload[name]
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise InvalidInput(name, f"must be a number, got {type(v).__name__}")
            try:
                v = float(v)
            except OverflowError:
                raise InvalidInput(name, "out of range (too large)") from None
            if math.isnan(v):
                raise InvalidInput(name, "NaN")
            if math.isinf(v) or abs(v) > FLOAT32_MAX:
                raise InvalidInput(name, "out of range (infinite or beyond float32)")
            lo, hi = FIELD_RANGES.get(name, (0.0, None))
            if v < lo:
                raise InvalidInput(name, f"negative ({v:g})" if lo == 0.0 else f"below {lo:g} ({v:g})")
            if hi is not None and v > hi + RANGE_TOLERANCE:
                raise InvalidInput(name, f"above {hi:g} ({v:g})")
            raw[i] = v
        extra = sorted(str(k)[:MAX_ECHO_CHARS] for k in payload if k not in RESERVED_KEYS and k not in self.policy._idx)
        if len(extra) > MAX_IGNORED_FIELDS:
            extra = extra[:MAX_IGNORED_FIELDS] + [f"... and {len(extra) - MAX_IGNORED_FIELDS} more"]
        return node, raw, extra

    # ---- decisions ---------------------------------------------------------------
    def decide(self, payload: Any) -> dict:
        """One decision: {"action", "action_index", "node", "tick"} (plus "ignored_fields"),
        or on bad input {"error", "field", "reason", "action": fallback, "fallback": true}."""
        t0 = time.perf_counter()
        try:
            node, raw, extra = self.validate(payload)
            idx = int(self.policy.act(raw, node=node))
            out = {"action": self.policy.action_names[idx], "action_index": idx, "node": node}
            if extra:
                out["ignored_fields"] = extra
        except InvalidInput as e:
            out = self.fallback(e.error, e.field, e.reason)
        except Exception as e:  # never crash on input: the safe action, with the reason
            out = self.fallback("internal_error", None, f"{type(e).__name__}: {e}")
        _echo_id(payload, out)
        self._record(out, time.perf_counter() - t0)
        return out

    def decide_batch(self, payloads: list) -> list[dict]:
        """Decisions for many nodes (one payload each); valid rows of the same node are
        evaluated in one batched forward pass."""
        t0 = time.perf_counter()
        outs: list[dict | None] = [None] * len(payloads)
        groups: dict[str, list[tuple[int, np.ndarray, list[str]]]] = {}
        for i, p in enumerate(payloads):
            try:
                node, raw, extra = self.validate(p)
                groups.setdefault(node, []).append((i, raw, extra))
            except InvalidInput as e:
                outs[i] = self.fallback(e.error, e.field, e.reason)
        for node, rows in groups.items():
            try:
                acts = self.policy.act(np.stack([r for _, r, _ in rows]), node=node)
            except Exception as e:  # noqa: BLE001
                for i, _, _ in rows:
                    outs[i] = self.fallback("internal_error", None, f"{type(e).__name__}: {e}")
                continue
            for (i, _, extra), a in zip(rows, acts):
                outs[i] = {"action": self.policy.action_names[int(a)], "action_index": int(a), "node": node}
                if extra:
                    outs[i]["ignored_fields"] = extra
        dt = (time.perf_counter() - t0) / max(len(payloads), 1)
        for p, o in zip(payloads, outs):
            _echo_id(p, o)
            self._record(o, dt)
        return outs  # type: ignore[return-value]

    def fallback(self, error: str, field: str | None, reason: str) -> dict:
        return {
            "error": error, "field": field, "reason": reason,
            "action": self.policy.fallback_action, "action_index": self.policy.fallback_index, "fallback": True,
        }

    def _record(self, out: dict, latency_s: float) -> None:
        t = self.telemetry
        with self._lock:
            self.ticks += 1
        t.decisions.labels(out["action"]).inc()
        if out.get("fallback"):
            t.invalid.labels(out["field"] or out["error"]).inc()
        t.latency.observe(latency_s)

    # ---- monitoring --------------------------------------------------------------
    def prometheus_text(self) -> str:
        """Every metric of this agent's Telemetry in the Prometheus text format."""
        return self.telemetry.text()

    def health(self) -> dict:
        return {
            "status": "ok",
            "policy": self.policy.path.name,  # the export's name, not where it lives on disk
            "format_version": self.policy.spec["format_version"],
            "env_version": self.policy.env_version,
            "nodes": [self.node] if self.node else list(self.policy.node_names),
            "fields": list(self.policy.fields),
            "actions": list(self.policy.action_names),
            "decisions": self.ticks,
        }


def _echo_id(payload, out: dict) -> None:
    """Echo a request's `id` (a string up to MAX_ECHO_CHARS, or an integer that fits in 64 bits)."""
    ident = payload.get("id") if isinstance(payload, dict) else None
    if isinstance(ident, str) and len(ident) <= MAX_ECHO_CHARS:
        out["id"] = ident
    elif isinstance(ident, int) and not isinstance(ident, bool) and abs(ident) < 2**63:
        out["id"] = ident
