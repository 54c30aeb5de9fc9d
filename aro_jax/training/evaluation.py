"""The evaluation harness: vmapped episodes of any policy on every node, and the KPI table.

A policy is a `heuristics.Policy` (init, act) over raw observations; learned policies are
wrapped into the same interface, so every row of a comparison is computed the same way,
on the same seeds (common random numbers across policies).
"""

from __future__ import annotations

import csv
import json
import math
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from aro_jax.envs import serving as sv
from aro_jax.envs.heuristics import Policy
from aro_jax.envs.scenarios import cluster_params
from aro_jax.envs.serving import ServingNodeEnv

# KPI name -> (unit, description); the order is the table's column order.
KPIS = {
    "ttft_mean_ms": ("ms", "mean time to first token"),
    "ttft_p95_ms": ("ms", "p95 time to first token (served-weighted mean of per-tick p95)"),
    "e2e_mean_ms": ("ms", "mean end-to-end latency"),
    "e2e_p95_ms": ("ms", "p95 end-to-end latency (served-weighted mean of per-tick p95)"),
    "throughput_rps": ("req/s", "requests served, locally or by the peer"),
    "tokens_per_s": ("tok/s", "prompt + output tokens served"),
    "slo_attainment_pct": ("%", "requests meeting the TTFT and TPOT SLOs (drops count as misses)"),
    "dropped_pct": ("%", "requests dropped (timeout or queue overflow)"),
    "gpu_util_pct": ("%", "GPU busy share of serving capacity"),
    "cpu_util_pct": ("%", "CPU cores in use"),
    "memory_util_pct": ("%", "host memory in use"),
    "cost_usd_per_h": ("$/h", "GPU + CPU + memory + egress + peer compute"),
    "cost_usd_per_mtok": ("$/1M tok", "cost per million tokens served"),
    "quality": ("", "answer quality of served requests (1 = large model)"),
    "reward": ("", "mean reward per tick"),
}


def rollout(env: sv.ServingNodeEnv, policy: Policy, params: sv.EnvParams, key: jax.Array, num_ticks: int, policy_state=None):
    """One episode of `num_ticks` from reset; returns per-tick metrics and actions (T,).
    `policy_state` (e.g. a learned policy's weights) replaces `policy.init(params)`."""
    k_reset, k_steps = jax.random.split(key)
    _, state = env.reset_env(k_reset, params)

    def tick(carry, k):
        state, pstate = carry
        k_act, k_env = jax.random.split(k)
        raw = sv.raw_observation(state, params)
        action, pstate = policy.act(pstate, raw, params)
        action = jnp.where(action < env.num_actions, action, sv.MAINTAIN)
        state, metrics, _ = env.transition(k_env, state, action, params)
        return (state, pstate), {**metrics, "action": action}

    pstate = policy.init(params) if policy_state is None else policy_state
    _, metrics = jax.lax.scan(tick, (state, pstate), jax.random.split(k_steps, num_ticks))
    return metrics


@partial(jax.jit, static_argnames=("env", "policy", "num_seeds", "num_ticks", "per_node_state"))
def run_episodes(env, policy: Policy, node_params: sv.EnvParams, key, num_seeds: int, num_ticks: int, policy_state=None, per_node_state=False):
    """Metrics of shape (nodes, seeds, ticks) for a stack of node params. The same seeds
    for every policy: common random numbers make the comparison paired. With
    `per_node_state`, `policy_state` has a leading node axis (one policy per node)."""
    keys = jax.random.split(key, num_seeds)
    per_node = lambda p, ps: jax.vmap(lambda k: rollout(env, policy, p, k, num_ticks, ps))(keys)  # noqa: E731
    return jax.vmap(per_node, in_axes=(0, 0 if per_node_state else None))(node_params, policy_state)


def kpis(metrics: dict, tick_s: float, axis=None) -> dict[str, np.ndarray]:
    """Aggregate per-tick metrics into KPIs over `axis` (None: everything)."""
    m = {k: np.asarray(v, np.float64) for k, v in metrics.items()}
    done = m["served"] + m["forwarded"]
    attempted = done + m["dropped"]
    s = lambda x: x.sum(axis=axis)  # noqa: E731
    wmean = lambda x, w: s(x * w) / np.maximum(s(w), 1e-12)  # noqa: E731
    hours = s(np.ones_like(done)) * tick_s / 3600.0
    tokens = s(m["tokens_per_s"] * tick_s)
    return {
        "ttft_mean_ms": 1e3 * wmean(m["ttft_mean_s"], done),
        "ttft_p95_ms": 1e3 * wmean(m["ttft_p95_s"], m["served"]),
        "e2e_mean_ms": 1e3 * wmean(m["e2e_mean_s"], done),
        "e2e_p95_ms": 1e3 * wmean(m["e2e_p95_s"], m["served"]),
        "throughput_rps": s(done) / (hours * 3600.0),
        "tokens_per_s": tokens / (hours * 3600.0),
        "slo_attainment_pct": 100.0 * wmean(m["slo_attainment"], attempted),
        "dropped_pct": 100.0 * s(m["dropped"]) / np.maximum(s(m["arrivals"]), 1e-12),
        "gpu_util_pct": 100.0 * m["gpu_util"].mean(axis=axis),
        "cpu_util_pct": 100.0 * m["cpu_util"].mean(axis=axis),
        "memory_util_pct": 100.0 * m["memory_util"].mean(axis=axis),
        "cost_usd_per_h": s(m["cost_usd"]) / hours,
        "cost_usd_per_mtok": s(m["cost_usd"]) / np.maximum(tokens / 1e6, 1e-12),
        "quality": wmean(m["quality"], done),
        "reward": m["reward"].mean(axis=axis),
    }


def cluster_kpis(metrics: dict, tick_s: float) -> dict[str, float]:
    """Cluster-wide KPIs: rates and costs summed over nodes, the rest request-weighted;
    averaged over seeds. `metrics` has shape (nodes, seeds, ticks)."""
    per_seed = {k: np.swapaxes(np.asarray(v), 0, 1) for k, v in metrics.items()}  # (seeds, nodes, ticks)
    seeds = per_seed["served"].shape[0]
    rows = [kpis({k: v[i] for k, v in per_seed.items()}, tick_s) for i in range(seeds)]
    nodes = per_seed["served"].shape[1]
    out = {}
    for k in KPIS:
        vals = np.array([r[k] for r in rows])
        if k in ("throughput_rps", "tokens_per_s", "cost_usd_per_h"):
            vals = vals * nodes  # kpis() averaged the rate over nodes x ticks; the cluster sums nodes
        out[k] = float(vals.mean())
    return out


def hyperscore(v, beta: float = 5.0, gamma: float = -math.log(2.0), kappa: float = 2.0):
    """The ARO paper's HyperScore = 100 [1 + sigmoid(beta ln V + gamma)^kappa] of a
    normalised evaluation score V in (0, 1]; the defaults are the parameter values
    published with the formula. It lies in (100, 100 [1 + sigmoid(gamma)^kappa]]."""
    v = np.asarray(v, np.float64)
    if np.any((v <= 0) | (v > 1)):
        raise ValueError(f"HyperScore needs V in (0, 1], got {v}")
    return 100.0 * (1.0 + (1.0 / (1.0 + np.exp(-(beta * np.log(v) + gamma)))) ** kappa)


def format_table(rows: dict[str, dict[str, float]], title: str = "") -> str:
    """A markdown table: one row per policy, one column per KPI."""
    head = "| policy | " + " | ".join(f"{k} ({KPIS[k][0]})" if KPIS[k][0] else k for k in KPIS) + " |"
    sep = "|---" * (len(KPIS) + 1) + "|"
    lines = [f"**{title}**", "", head, sep] if title else [head, sep]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(format_value(r[k]) for k in KPIS) + " |")
    return "\n".join(lines)


def format_value(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 100 else f"{x:,.0f}"


def save_table(rows: dict[str, dict[str, float]], out_dir: Path, stem: str = "kpis") -> None:
    """Write the KPI rows as CSV, JSON and markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / f"{stem}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["policy", *KPIS])
        for name, r in rows.items():
            w.writerow([name, *(f"{r[k]:.6g}" for k in KPIS)])
    (out_dir / f"{stem}.json").write_text(json.dumps({"units": {k: u for k, (u, _) in KPIS.items()}, "rows": rows}, indent=2))
    (out_dir / f"{stem}.md").write_text(format_table(rows) + "\n")


def plot_timeline(traces: dict[str, dict], tick_s: float, node_name: str, path: Path) -> None:
    """One node over one simulated day, one line per policy: arrivals, replicas, latency, cost."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 1, figsize=(10, 10), sharex=True)
    first = next(iter(traces.values()))
    hours = np.arange(len(first["arrivals"])) * tick_s / 3600.0
    axes[0].plot(hours, np.asarray(first["arrivals"]) / tick_s, color="black", lw=0.8)
    axes[0].set_ylabel("arrivals (req/s)")
    for name, m in traces.items():
        axes[1].plot(hours, m["replicas_billed"], label=name, lw=1)
        axes[2].plot(hours, np.asarray(m["e2e_mean_s"]) * 1e3, label=name, lw=0.8)
        axes[3].plot(hours, np.asarray(m["cost_usd"]) * 3600.0 / tick_s, label=name, lw=1)
    axes[1].set_ylabel("replicas (billed)")
    axes[2].set_ylabel("mean e2e latency (ms)")
    axes[2].set_yscale("log")
    axes[3].set_ylabel("cost ($/h)")
    axes[3].set_xlabel("hour of day (UTC)")
    axes[1].legend(loc="upper left", fontsize=8)
    fig.suptitle(f"node {node_name}: one simulated day")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def evaluate_policies(cfg, policies: dict, scenario: str, out_dir: Path, seed: int = 0) -> dict:
    """Run every policy (name -> (Policy, policy_state or None, per_node)) on every node of the
    cluster on one scenario; write the KPI table
    (markdown/CSV/JSON) and the one-day timeline of the first node; return the rows."""
    env = ServingNodeEnv(cfg.env.action_set)
    params = cluster_params(cfg, scenario)
    rows, traces = {}, {}
    for name, (policy, policy_state, per_node) in policies.items():
        metrics = run_episodes(env, policy, params, jax.random.PRNGKey(seed), cfg.eval.num_seeds, cfg.env.episode_ticks, policy_state, per_node)
        rows[name] = cluster_kpis(metrics, cfg.env.tick_s)
        traces[name] = {k: np.asarray(v[0, 0]) for k, v in metrics.items()}
    save_table(rows, out_dir, f"kpis_{scenario}")
    plot_timeline(traces, cfg.env.tick_s, cfg.cluster.nodes[0].name, out_dir / f"timeline_{scenario}.png")
    title = f"{cfg.cluster.name}, scenario {scenario}, {cfg.eval.num_seeds} seeds x {len(cfg.cluster.nodes)} nodes x 1 day"
    print(format_table(rows, title))
    print(f"\nwrote {out_dir}/kpis_{scenario}.{{md,csv,json}} and timeline_{scenario}.png")
    return rows
