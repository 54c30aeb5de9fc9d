"""The deployment agent's decision logic: validated live metrics -> an action per tick.

Pure Python and numpy. Input is one JSON object per node and tick with the observation's
raw fields by name (`ExportedPolicy.fields`, natural units) and optionally `node`. Any
problem with it (not an object, a missing field, a wrong type, NaN or infinity, a value
out of range) gives a structured error and the safe fallback decision (MaintainCurrent)
with the reason; the agent never raises on input.

State across ticks: the exported policy is feed-forward on the current observation, so
the agent keeps none for the decision itself (the load forecast arrives as the input
field `forecast_rate_rps`); it keeps only counters for monitoring.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import numpy as np

from aro_jax.deploy.export import ExportedPolicy

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


class InvalidInput(ValueError):
    def __init__(self, field: str | None, reason: str, error: str = "invalid_input"):
        super().__init__(f"{field}: {reason}" if field else reason)
        self.field, self.reason, self.error = field, reason, error


class Agent:
    """Decisions from one exported policy. `node` fixes the node this agent serves; without
    it, a request names its node (required when the export has several)."""

    def __init__(self, policy: ExportedPolicy, node: str | None = None):
        self.policy = policy
        self.node = policy.resolve_node(node) if node is not None else None
        self._lock = threading.Lock()
        self.decisions = {name: 0 for name in policy.action_names}
        self.errors: dict[str, int] = {}
        self.ticks = 0
        self._lat_counts = [0] * (len(LATENCY_BUCKETS_S) + 1)
        self._lat_sum = 0.0

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
            raise InvalidInput("node", f"this agent serves node {self.node!r}, got {node!r}")
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
        extra = sorted(str(k) for k in payload if k not in RESERVED_KEYS and k not in self.policy._idx)
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
        if isinstance(payload, dict) and isinstance(payload.get("id"), (str, int)) and not isinstance(payload.get("id"), bool):
            out["id"] = payload["id"]
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
            if isinstance(p, dict) and isinstance(p.get("id"), (str, int)) and not isinstance(p.get("id"), bool):
                o["id"] = p["id"]
            self._record(o, dt)
        return outs  # type: ignore[return-value]

    def fallback(self, error: str, field: str | None, reason: str) -> dict:
        return {
            "error": error, "field": field, "reason": reason,
            "action": self.policy.fallback_action, "action_index": self.policy.fallback_index, "fallback": True,
        }

    def _record(self, out: dict, latency_s: float) -> None:
        with self._lock:
            self.ticks += 1
            self.decisions[out["action"]] += 1
            if out.get("fallback"):
                key = out["field"] or out["error"]
                self.errors[key] = self.errors.get(key, 0) + 1
            self._lat_sum += latency_s
            for b, edge in enumerate(LATENCY_BUCKETS_S):
                if latency_s <= edge:
                    self._lat_counts[b] += 1
                    break
            else:
                self._lat_counts[-1] += 1

    # ---- monitoring --------------------------------------------------------------
    def prometheus_text(self) -> str:
        """Counters and the latency histogram in the Prometheus text exposition format."""
        with self._lock:
            lines = [
                "# HELP aro_agent_decisions_total Decisions made, by action (fallbacks included).",
                "# TYPE aro_agent_decisions_total counter",
            ]
            lines += [f'aro_agent_decisions_total{{action="{a}"}} {n}' for a, n in self.decisions.items()]
            lines += [
                "# HELP aro_agent_invalid_input_total Inputs refused (fallback decision), by field or error.",
                "# TYPE aro_agent_invalid_input_total counter",
            ]
            lines += [f'aro_agent_invalid_input_total{{field="{_esc(k)}"}} {n}' for k, n in sorted(self.errors.items())]
            lines += [
                "# HELP aro_agent_decision_latency_seconds Time from input to decision (validation + policy).",
                "# TYPE aro_agent_decision_latency_seconds histogram",
            ]
            cum = 0
            for edge, n in zip(LATENCY_BUCKETS_S, self._lat_counts):
                cum += n
                lines.append(f'aro_agent_decision_latency_seconds_bucket{{le="{edge}"}} {cum}')
            lines.append(f'aro_agent_decision_latency_seconds_bucket{{le="+Inf"}} {self.ticks}')
            lines.append(f"aro_agent_decision_latency_seconds_sum {self._lat_sum:.9f}")
            lines.append(f"aro_agent_decision_latency_seconds_count {self.ticks}")
            spec = self.policy.spec
            lines += [
                "# HELP aro_agent_policy_info The loaded policy export.",
                "# TYPE aro_agent_policy_info gauge",
                f'aro_agent_policy_info{{format_version="{_esc(spec["format_version"])}",env_version="{_esc(spec["env_version"])}",'
                f'config_sha256="{_esc(spec.get("training", {}).get("config_sha256", ""))}"}} 1',
            ]
        return "\n".join(lines) + "\n"

    def health(self) -> dict:
        return {
            "status": "ok",
            "policy": str(self.policy.path),
            "format_version": self.policy.spec["format_version"],
            "env_version": self.policy.env_version,
            "nodes": [self.node] if self.node else list(self.policy.node_names),
            "fields": list(self.policy.fields),
            "actions": list(self.policy.action_names),
            "decisions": self.ticks,
        }


def _esc(s) -> str:
    return str(s).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
