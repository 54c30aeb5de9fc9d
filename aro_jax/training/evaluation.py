"""The evaluation harness: vmapped episodes of any policy on every node, and the KPI table.

A policy is a `heuristics.Policy` (init, act) over raw observations; learned policies are
wrapped into the same interface, so every row of a comparison is computed the same way,
on the same seeds (common random numbers across policies).
"""

from __future__ import annotations

import csv
import json
import math
from functools import lru_cache, partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from aro_jax.envs import serving as sv
from aro_jax.envs.cluster import ClusterParams, ServingCluster, cluster_links
from aro_jax.envs.heuristics import Policy
from aro_jax.envs.params import e2e_budget
from aro_jax.envs.scenarios import scenario_plan
from aro_jax.envs.serving import ServingNodeEnv

# KPI name -> (unit, description); the order is the table's column order. Headline
# figures count every arrival: a policy cannot look better by dropping or rejecting.
KPIS = {
    "goodput_rps": ("req/s", "requests completed within their TTFT and TPOT SLOs (DistServe's goodput)"),
    "goodput_per_usd": ("req/$", "goodput per dollar: requests within SLO per dollar spent"),
    "slo_attainment_pct": ("%", "arrivals completed within SLO (drops and rejects count as misses)"),
    "e2e_mean_all_ms": ("ms", "mean end-to-end latency over all arrivals (a drop at the queue timeout, a reject at the SLO budget)"),
    "e2e_p95_all_ms": ("ms", "p95 end-to-end latency over all arrivals, pooled over the day's requests"),
    "ttft_mean_ms": ("ms", "mean time to first token of served requests"),
    "ttft_p50_ms": ("ms", "p50 time to first token of served requests, pooled over the day's requests"),
    "ttft_p95_ms": ("ms", "p95 time to first token of served requests, pooled"),
    "ttft_p99_ms": ("ms", "p99 time to first token of served requests, pooled"),
    "e2e_mean_ms": ("ms", "mean end-to-end latency of served requests"),
    "e2e_p50_ms": ("ms", "p50 end-to-end latency of served requests, pooled"),
    "e2e_p95_ms": ("ms", "p95 end-to-end latency of served requests, pooled"),
    "e2e_p99_ms": ("ms", "p99 end-to-end latency of served requests, pooled"),
    "throughput_rps": ("req/s", "requests served, locally or by a peer"),
    "tokens_per_s": ("tok/s", "prompt + output tokens served"),
    "dropped_pct": ("%", "arrivals dropped (queue timeout or overflow)"),
    "rejected_pct": ("%", "arrivals rejected: prompt longer than the model's context window"),
    "forwarded_pct": ("%", "arrivals forwarded to a peer region"),
    "served_for_peers_rps": ("req/s", "requests served for peer regions (their forwarded work)"),
    "replicas": ("", "replicas billed per region, mean over the day"),
    "gpu_util_pct": ("%", "GPU busy share of serving capacity"),
    "cpu_util_pct": ("%", "CPU cores in use"),
    "memory_util_pct": ("%", "host memory in use"),
    "cost_usd_per_h": ("$/h", "GPU + CPU + memory + egress + peers' price for forwarded requests - paid by peers for serving theirs"),
    "forwarding_usd_per_h": ("$/h", "egress + peers' price paid for the forwarded requests (in cost_usd_per_h)"),
    "peer_credit_usd_per_h": ("$/h", "paid by peers for the requests served for them (netted out of cost_usd_per_h)"),
    "cost_usd_per_mtok": ("$/1M tok", "cost per million tokens served"),
    "quality": ("", "answer quality of served requests (1 = large model)"),
    "reward": ("", "mean reward per tick"),
}
# Percentiles pooled over requests: each tick's served requests follow a log-normal with
# the tick's mean and p95 (fluid.fluid_tick), forwarded ones sit at the forwarding
# latency; the day's distribution is the arrival-weighted mixture of the ticks'.
QUANTILES = (0.5, 0.95, 0.99)
_Z95 = 1.6448536269514722


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


def cluster_rollout(env: ServingCluster, policy: Policy, params: ClusterParams, key, num_ticks: int, policy_state=None, per_node_state=False):
    """One episode of a whole cluster, every region acting on its own raw observation
    with `policy` (heuristics: each region its own state; a learned policy's weights
    shared, or one set per region with `per_node_state`); metrics (T, regions)."""
    k_reset, k_steps = jax.random.split(key)
    _, state = env.reset_env(k_reset, params)
    regions = params.rtt_s.shape[0]
    shared = policy_state is not None and not per_node_state
    act = jax.vmap(policy.act, in_axes=(None if shared else 0, 0, 0), out_axes=(0, None if shared else 0))

    def tick(carry, k):
        state, pstate = carry
        raw = jax.vmap(sv.raw_observation)(state.nodes, params.nodes)
        action, pstate = act(pstate, raw, params.nodes)
        action = jnp.where(action < env.num_actions, action, sv.MAINTAIN)
        state, metrics, _ = env.transition(jax.random.split(k, regions), state, action, params)
        return (state, pstate), {**metrics, "action": action}

    pstate = jax.vmap(policy.init)(params.nodes) if policy_state is None else policy_state
    _, metrics = jax.lax.scan(tick, (state, pstate), jax.random.split(k_steps, num_ticks))
    return metrics


@partial(jax.jit, static_argnames=("env", "policy", "num_seeds", "num_ticks", "per_node_state"))
def run_episodes(env, policy: Policy, params, key, num_seeds: int, num_ticks: int, policy_state=None, per_node_state=False):
    """Metrics of shape (nodes, seeds, ticks): `env` a ServingNodeEnv and `params` a stack
    of node params (independent regions), or a ServingCluster and its ClusterParams (the
    regions coupled, `eval_env`). The same seeds for every policy: common random numbers
    make the comparison paired. With `per_node_state`, `policy_state` has a leading node
    axis (one policy per node)."""
    keys = jax.random.split(key, num_seeds)
    if isinstance(env, ServingCluster):
        metrics = jax.vmap(lambda k: cluster_rollout(env, policy, params, k, num_ticks, policy_state, per_node_state))(keys)
        return jax.tree.map(lambda x: jnp.moveaxis(x, -1, 0), metrics)  # (seeds, ticks, regions) -> (regions, seeds, ticks)
    per_node = lambda p, ps: jax.vmap(lambda k: rollout(env, policy, p, k, num_ticks, ps))(keys)  # noqa: E731
    return jax.vmap(per_node, in_axes=(0, 0 if per_node_state else None))(params, policy_state)


def eval_env(cfg, node_params: sv.EnvParams):
    """(env, params) that run_episodes evaluates `cfg`'s regions in: its cluster env with
    the regions coupled by forwarding (env.kind "cluster"), or independent ServingNode-v0
    regions, each with its modelled peer ("node")."""
    if cfg.env.kind == "cluster":
        return _env(ServingCluster, cfg.env.action_set), cluster_links(cfg, node_params)
    return _env(ServingNodeEnv, cfg.env.action_set), node_params


@lru_cache(maxsize=None)
def _env(kind, action_set: str):
    """One env object per (kind, action set): run_episodes compiles once per env object."""
    return kind(action_set)


def _lognormal_sd(mean, p95):
    """Log-sd of a log-normal with this mean and p95: ln(p95/mean) = z s - s^2 / 2, the
    smaller root, clipped to [0.01, z] (a p95 below the mean has no log-normal)."""
    r = np.log(np.maximum(p95, 1e-12) / np.maximum(mean, 1e-12))
    return np.clip(_Z95 - np.sqrt(np.maximum(_Z95**2 - 2.0 * r, 0.0)), 0.01, _Z95)


def mixture_quantiles(qs, ln_weight, ln_mean, ln_p95, atom_weight=(), atom_value=()) -> np.ndarray:
    """Quantiles of a mixture of log-normals (weights, means, p95s: arrays of one shape)
    and atoms (point masses): bisection on the mixture's CDF in log time."""
    from scipy.special import ndtr

    w = np.ravel(np.asarray(ln_weight, np.float64))
    sd = np.ravel(_lognormal_sd(np.asarray(ln_mean, np.float64), np.asarray(ln_p95, np.float64)))
    mu = np.log(np.maximum(np.ravel(np.asarray(ln_mean, np.float64)), 1e-12)) - 0.5 * sd**2
    aw = [np.ravel(np.asarray(a, np.float64)) for a in atom_weight]
    av = [np.ravel(np.broadcast_to(np.asarray(v, np.float64), np.shape(a))) for a, v in zip(atom_weight, atom_value)]
    keep = w > 0
    w, sd, mu = w[keep], sd[keep], mu[keep]
    total = w.sum() + sum(a.sum() for a in aw)
    if total <= 0:
        return np.full(len(qs), np.nan)

    def cdf(x):  # x: (k,) seconds
        lx = np.log(x)[:, None]
        c = (w * ndtr((lx - mu) / sd)).sum(axis=1)
        for a, v in zip(aw, av):
            c += (a * (v <= x[:, None])).sum(axis=1)
        return c / total

    lo, hi = np.full(len(qs), np.log(1e-5)), np.full(len(qs), np.log(1e5))
    for _ in range(48):  # 1e-10 s / 1e5 s range: 48 halvings reach ~1e-13 in log
        mid = 0.5 * (lo + hi)
        below = cdf(np.exp(mid)) < np.asarray(qs)
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    return np.exp(hi)


def kpis(metrics: dict, tick_s: float, node_params, axis=None) -> dict[str, np.ndarray]:
    """Aggregate per-tick metrics into KPIs over `axis` (None: everything); rates are per
    node. `node_params` (one node's EnvParams, or a stack whose node axis leads the
    metrics) gives each node's queue timeout and SLO budget for the all-arrival figures."""
    m = {k: np.asarray(v, np.float64) for k, v in metrics.items()}
    nd = m["served"].ndim
    per_node = lambda x: np.reshape(np.asarray(x, np.float64), np.shape(x) + (1,) * (nd - np.ndim(x)))  # noqa: E731
    timeout_s = per_node(node_params.queue_timeout_s)
    budget_s = per_node(e2e_budget(node_params))
    done = m["served"] + m["forwarded"]
    arrivals = np.maximum(m["arrivals"], 0.0)
    s = lambda x: x.sum(axis=axis)  # noqa: E731
    wmean = lambda x, w: s(x * w) / np.maximum(s(w), 1e-12)  # noqa: E731
    hours = s(np.ones_like(done)) * tick_s / 3600.0
    tokens = s(m["tokens_per_s"] * tick_s)
    good = m["slo_attainment"] * (done + m["dropped"] + m["rejected"])
    cost = s(m["cost_usd"])
    # Served requests' latencies: the local ones from the tick's mean (over served and
    # forwarded) less the forwarded share, which sits at the forwarding latency.
    served = np.maximum(m["served"], 0.0)
    local = lambda mean, fwd: np.where(served > 1e-9, (done * mean - m["forwarded"] * fwd) / np.maximum(served, 1e-9), mean)  # noqa: E731
    ttft_local = np.maximum(local(m["ttft_mean_s"], m["fwd_ttft_s"]), 1e-6)
    e2e_local = np.maximum(local(m["e2e_mean_s"], m["fwd_e2e_s"]), 1e-6)
    e2e_all = s(done * m["e2e_mean_s"] + m["dropped"] * timeout_s + m["rejected"] * budget_s) / np.maximum(s(arrivals), 1e-12)
    out = {
        "goodput_rps": s(good) / (hours * 3600.0),
        "goodput_per_usd": s(good) / np.maximum(cost, 1e-12),
        "slo_attainment_pct": 100.0 * s(good) / np.maximum(s(arrivals), 1e-12),
        "e2e_mean_all_ms": 1e3 * e2e_all,
        "ttft_mean_ms": 1e3 * wmean(m["ttft_mean_s"], done),
        "e2e_mean_ms": 1e3 * wmean(m["e2e_mean_s"], done),
        "throughput_rps": s(done) / (hours * 3600.0),
        "tokens_per_s": tokens / (hours * 3600.0),
        "dropped_pct": 100.0 * s(m["dropped"]) / np.maximum(s(arrivals), 1e-12),
        "rejected_pct": 100.0 * s(m["rejected"]) / np.maximum(s(arrivals), 1e-12),
        "forwarded_pct": 100.0 * s(m["forwarded"]) / np.maximum(s(arrivals), 1e-12),
        "served_for_peers_rps": s(m["served_for_peers"]) / (hours * 3600.0),
        "replicas": m["replicas_billed"].mean(axis=axis),
        "gpu_util_pct": 100.0 * m["gpu_util"].mean(axis=axis),
        "cpu_util_pct": 100.0 * m["cpu_util"].mean(axis=axis),
        "memory_util_pct": 100.0 * m["memory_util"].mean(axis=axis),
        "cost_usd_per_h": cost / hours,
        "forwarding_usd_per_h": s(m["egress_usd"] + m["peer_paid_usd"]) / hours,
        "peer_credit_usd_per_h": s(m["peer_credit_usd"]) / hours,
        "cost_usd_per_mtok": cost / np.maximum(tokens / 1e6, 1e-12),
        "quality": wmean(m["quality"], done),
        "reward": m["reward"].mean(axis=axis),
    }
    if axis is None:  # pooled percentiles are over everything
        fwd = m["forwarded"]
        for name, mean, p95, fwd_s in (("ttft", ttft_local, m["ttft_p95_s"], m["fwd_ttft_s"]), ("e2e", e2e_local, m["e2e_p95_s"], m["fwd_e2e_s"])):
            qv = mixture_quantiles(QUANTILES, served, mean, p95, (fwd,), (fwd_s,))
            for q, v in zip(QUANTILES, qv):
                out[f"{name}_p{round(100 * q)}_ms"] = 1e3 * v
        dropped, rejected = m["dropped"], m["rejected"]
        atoms_w = (fwd, dropped, rejected)
        atoms_x = (m["fwd_e2e_s"], np.broadcast_to(timeout_s, dropped.shape), np.broadcast_to(budget_s, rejected.shape))
        out["e2e_p95_all_ms"] = 1e3 * mixture_quantiles((0.95,), served, e2e_local, m["e2e_p95_s"], atoms_w, atoms_x)[0]
    return out


# Rates and costs add over a cluster's nodes; the rest is request-weighted.
ADDITIVE = ("goodput_rps", "throughput_rps", "tokens_per_s", "cost_usd_per_h", "served_for_peers_rps", "forwarding_usd_per_h",
            "peer_credit_usd_per_h")


def cluster_kpis(metrics: dict, tick_s: float, node_params) -> dict[str, float]:
    """Cluster-wide KPIs from metrics of shape (nodes, seeds, ticks): rates and costs summed
    over nodes and averaged over seeds, shares request-weighted, percentiles pooled over
    every request of every node and seed."""
    nodes = np.shape(metrics["served"])[0]
    k = kpis(metrics, tick_s, node_params)
    return {name: float(k[name]) * (nodes if name in ADDITIVE else 1) for name in KPIS}


def region_kpis(metrics: dict, tick_s: float, node_params, names) -> dict[str, dict[str, float]]:
    """Per-region KPIs (pooled over seeds), name -> row."""
    out = {}
    for i, name in enumerate(names):
        one = jax.tree.map(lambda x: x[i], node_params)
        k = kpis({key: np.asarray(v)[i] for key, v in metrics.items()}, tick_s, one)
        out[name] = {key: float(k[key]) for key in KPIS}
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
    """One node over one simulated day, one line per policy: arrivals, replicas, latency, cost,
    and the shares forwarded, lost (dropped or rejected) and served for peers (of its own
    arrivals)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(5, 1, figsize=(10, 12), sharex=True)
    first = next(iter(traces.values()))
    hours = np.arange(len(first["arrivals"])) * tick_s / 3600.0
    axes[0].plot(hours, np.asarray(first["arrivals"]) / tick_s, color="black", lw=0.8)
    axes[0].set_ylabel("arrivals (req/s)")
    for name, m in traces.items():
        axes[1].plot(hours, m["replicas_billed"], label=name, lw=1)
        axes[2].plot(hours, np.asarray(m["e2e_mean_s"]) * 1e3, label=name, lw=0.8)
        axes[3].plot(hours, np.asarray(m["cost_usd"]) * 3600.0 / tick_s, label=name, lw=1)
        arrivals = np.maximum(np.asarray(m["arrivals"]), 1e-9)
        axes[4].plot(hours, 100.0 * np.asarray(m["forwarded"]) / arrivals, label=f"{name} forwarded", lw=1)
        axes[4].plot(hours, 100.0 * (np.asarray(m["dropped"]) + np.asarray(m["rejected"])) / arrivals, ls=":", lw=1, label=f"{name} dropped + rejected")
        if np.any(np.asarray(m["served_for_peers"]) > 0):
            axes[4].plot(hours, 100.0 * np.asarray(m["served_for_peers"]) / arrivals, ls="--", lw=1, label=f"{name} served for peers")
    axes[1].set_ylabel("replicas (billed)")
    axes[2].set_ylabel("mean e2e latency (ms)")
    axes[2].set_yscale("log")
    axes[3].set_ylabel("cost ($/h)")
    axes[4].set_ylabel("share of arrivals (%)")
    axes[4].set_xlabel("hour of day (UTC)")
    axes[4].legend(loc="upper left", fontsize=7)
    axes[1].legend(loc="upper left", fontsize=8)
    fig.suptitle(f"node {node_name}: one simulated day")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def evaluate_policies(cfg, policies: dict, scenario: str, out_dir: Path, seed: int = 0, node_params=None, num_ticks: int | None = None) -> dict:
    """Run every policy (name -> (Policy, policy_state or None, per_node)) on every node of the
    cluster on one scenario (or on `node_params`, e.g. replayed traces, for `num_ticks`);
    write the cluster's and each region's KPI tables (markdown/CSV/JSON) and the one-day
    timeline of the first node; return the cluster rows."""
    if node_params is None:
        node_params, planned_ticks, _ = scenario_plan(cfg, scenario)
        num_ticks = num_ticks or planned_ticks
    params = node_params
    env, env_params = eval_env(cfg, params)
    num_ticks = num_ticks or cfg.env.episode_ticks
    names = [n.name for n in cfg.cluster.nodes]
    rows, regions, traces = {}, {}, {}
    for name, (policy, policy_state, per_node) in policies.items():
        metrics = run_episodes(env, policy, env_params, jax.random.PRNGKey(seed), cfg.eval.num_seeds, num_ticks, policy_state, per_node)
        rows[name] = cluster_kpis(metrics, cfg.env.tick_s, params)
        regions[name] = region_kpis(metrics, cfg.env.tick_s, params, names)
        traces[name] = {k: np.asarray(v[0, 0]) for k, v in metrics.items()}
    save_table(rows, out_dir, f"kpis_{scenario}")
    by_region = {f"{region} / {policy}": r for policy, per in regions.items() for region, r in per.items()}
    save_table(dict(sorted(by_region.items())), out_dir, f"kpis_{scenario}_regions")
    plot_timeline(traces, cfg.env.tick_s, names[0], out_dir / f"timeline_{scenario}.png")
    hours = num_ticks * cfg.env.tick_s / 3600.0
    title = f"{cfg.cluster.name}, scenario {scenario}, {cfg.eval.num_seeds} seeds x {len(names)} nodes x {hours:g} h"
    print(format_table(rows, title))
    print(f"\nwrote {out_dir}/kpis_{scenario}.{{md,csv,json}}, kpis_{scenario}_regions.* and timeline_{scenario}.png")
    return rows
