"""Env-stepping throughput: the serving node env next to gymnax CartPole-v1.

Measures env steps/s of `jit(scan(vmap(env.step)))` with random actions (gymnax 1.x
`step`, auto-reset included) at several batch sizes. Each batch size runs in its own
subprocess (so peak RSS is per size); inside it the node env and CartPole are timed one
after the other with the same harness, so their ratio comes from the same process.
A second set of subprocesses shards the batch over 2 fake XLA CPU devices
(`--xla_force_host_platform_device_count=2`) with `jax.shard_map`. If the node env is
slower than the aim (>= 1/10 of CartPole and > 1M steps/s at batch >= 4096), a profile
subprocess times the parts of a step separately. The cluster env (`ServingCluster`, the
ten-region cluster file) runs in a third set of subprocesses, each timing at one number
of clusters the cluster env, the same ten regions as independent `ServingNode-v0` envs,
and CartPole at the same number of envs (region-steps: one region's tick).

    /work/venv/bin/python benchmarks/env_throughput.py            # writes benchmarks/env_throughput.md
    /work/venv/bin/python benchmarks/env_throughput.py --batches 1 256 --steps 50 --repeats 2 --out /tmp/x.md

Timing: first call (compile + run), then `--repeats` rounds of steady-state calls with the
programs of one subprocess interleaved (node, CartPole, node, ...) so that load from other
jobs hits both alike; the table gives median rates, and compile time = first call -
median call.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import bench_common  # noqa: E402  (benchmarks/ is the script directory)

BASE_XLA_FLAGS = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
AIM_BATCH = 4096
AIM_RATIO = 0.1
AIM_RATE = 1e6
AIM_CLUSTER_COST = 1.5  # a ten-region cluster tick costs at most 1.5x ten independent region ticks


def default_steps(batch: int) -> int:
    """Scan length: ~1M env steps per call for small batches, at least 100 steps."""
    return int(max(100, min(10_000, 2**20 // batch)))


def rss_mb() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# --------------------------------------------------------------------------------------
# Worker side (imports jax)
# --------------------------------------------------------------------------------------


def _envs():
    import gymnax

    from aro_jax.envs.scenarios import default_node_params
    from aro_jax.envs.serving import ServingNodeEnv

    cartpole, cartpole_params = gymnax.make("CartPole-v1")
    return {"node": (ServingNodeEnv(), default_node_params()), "cartpole": (cartpole, cartpole_params)}


def make_rollout(env, batch: int, steps: int):
    """(key, state, params) -> (state, checksum): `steps` steps of `batch` envs, random actions.

    Params are a traced argument (as in training), broadcast over the batch. Rewards and
    observations feed a checksum so XLA cannot drop the observation computation.
    """
    import jax
    import jax.numpy as jnp

    n_actions = env.num_actions
    vstep = jax.vmap(env.step, in_axes=(0, 0, 0, None))

    def rollout(key, state, params):
        def body(carry, _):
            state, acc, key = carry
            key, k_act, k_env = jax.random.split(key, 3)
            actions = jax.random.randint(k_act, (batch,), 0, n_actions)
            obs, state, reward, _, _, _ = vstep(jax.random.split(k_env, batch), state, actions, params)
            acc = acc + reward + obs.sum(-1)
            return (state, acc, key), None

        (state, acc, _), _ = jax.lax.scan(body, (state, jnp.zeros((batch,)), key), None, steps)
        return state, acc

    return rollout


def init_states(env, params, batch: int, seed: int = 0):
    import jax

    keys = jax.random.split(jax.random.PRNGKey(seed), batch)
    _, state = jax.jit(jax.vmap(env.reset, in_axes=(0, None)))(keys, params)
    return state


def time_interleaved(calls: dict, repeats: int, after_first=None) -> dict:
    """calls: name -> (fn, args). Each fn's first call (compile + run) in order, then
    `repeats` rounds calling every fn once per round (interleaved, so load changes on a
    shared machine hit all of them alike). Returns name -> timings; compile = first - median."""
    import jax

    out = {}
    for name, (fn, args) in calls.items():
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        out[name] = {"first_s": time.perf_counter() - t0, "times_s": []}
        if after_first:
            after_first(name, out[name])
    for _ in range(repeats):
        for name, (fn, args) in calls.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            out[name]["times_s"].append(time.perf_counter() - t0)
    for t in out.values():
        t["median_s"] = statistics.median(t["times_s"])
        t["compile_s"] = max(t["first_s"] - t["median_s"], 0.0)
    return out


def _record_rss(name, t):
    t["rss_mb_after"] = rss_mb()


def worker_single(batch: int, steps: int, repeats: int) -> dict:
    import jax

    envs = _envs()
    base = rss_mb()
    calls = {}
    for name, (env, params) in envs.items():
        state = init_states(env, params, batch)
        calls[name] = (jax.jit(make_rollout(env, batch, steps)), (jax.random.PRNGKey(1), state, params))
    out = {"batch": batch, "steps": steps, "devices": len(jax.devices()), "rss_mb_base": base}
    for name, t in time_interleaved(calls, repeats, _record_rss).items():
        t["steps_per_s"] = batch * steps / t["median_s"]
        out[name] = t
    return out


def make_sharded_rollout(env, batch: int, steps: int):
    """The same rollout with the batch split over all devices by shard_map."""
    import jax
    from jax.sharding import PartitionSpec as P

    ndev = len(jax.devices())
    assert batch % ndev == 0, f"batch {batch} not divisible by {ndev} devices"
    mesh = jax.make_mesh((ndev,), ("d",))
    local = make_rollout(env, batch // ndev, steps)

    def per_device(keys, state, params):
        return local(keys[0], state, params)

    # check_vma=False: a lax.scan carry inside shard_map otherwise fails the
    # varying-manual-axes type check (DESIGN "Speed").
    sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P("d"), P("d"), P()), out_specs=(P("d"), P("d")), check_vma=False)
    return jax.jit(sharded), mesh


def worker_sharded(batch: int, steps: int, repeats: int) -> dict:
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    calls = {}
    for name, (env, params) in _envs().items():
        fn, mesh = make_sharded_rollout(env, batch, steps)
        shard = NamedSharding(mesh, P("d"))
        state = jax.device_put(init_states(env, params, batch), shard)
        keys = jax.device_put(jax.random.split(jax.random.PRNGKey(1), len(jax.devices())), shard)
        calls[name] = (fn, (keys, state, params))
    out = {"batch": batch, "steps": steps, "devices": len(jax.devices())}
    for name, t in time_interleaved(calls, repeats, _record_rss).items():
        t["steps_per_s"] = batch * steps / t["median_s"]
        out[name] = t
    return out


def worker_profile(batch: int, steps: int, repeats: int) -> dict:
    """Where a node-env step's time goes, at `batch`, each variant as jit(scan(vmap(f))).

    Two views: (a) parts alone, their inputs perturbed every step (so XLA cannot hoist
    them out of the loop as loop-invariant); (b) ablations: the full `env.step`
    with one component replaced by a cheap stand-in, patched into the env module only in
    this benchmark process while tracing (the env's source is untouched). The saving of
    an ablation is that component's cost in context.
    """
    import contextlib

    import jax
    import jax.numpy as jnp

    from aro_jax.envs import forecast as fc
    from aro_jax.envs import fluid
    from aro_jax.envs import serving as sv
    from aro_jax.envs.scenarios import default_node_params
    from aro_jax.envs.traffic import expected_rate_rps, sample_arrivals_ar

    env = sv.ServingNodeEnv()
    params = default_node_params()
    state0 = init_states(env, params, batch)
    n_act = env.num_actions

    def jiggle(k, s):
        """Every float leaf of the state times (1 + 1e-6 z): nothing is loop-invariant."""
        z = 1.0 + 1e-6 * jax.random.normal(jax.random.fold_in(k, 99))
        return jax.tree.map(lambda x: x * z if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x, s)

    # The env's `step` is itself jitted (static self), and its trace cache would hide the
    # patches below: call the undecorated function so every variant is traced afresh.
    env_step = type(env).step.__wrapped__

    # Each variant: f(key, state, action, params) -> (new_state, scalar per env).
    def full_step(k, s, a, p):
        obs, s2, r, _, _, _ = env_step(env, k, s, a, p)
        return s2, r + obs.sum()

    def step_env_only(k, s, a, p):  # no auto-reset
        obs, s2, r, _, _ = env.step_env(k, s, a, p)
        return s2, r + obs.sum()

    def reset_only(k, s, a, p):
        obs, s2 = env.reset_env(k, p)
        return s, obs.sum() + s2.clock_s

    def obs_only(k, s, a, p):
        s = jiggle(k, s)
        return s, env.get_obs(s, p).sum()

    def sampler_only(k, s, a, p):
        s = jiggle(k, s)
        return s, sample_arrivals_ar(k, s.clock_s, p.tick_s, p.traffic, s.burst_z)[0]

    def forecast_only(k, s, a, p):
        s = jiggle(k, s)
        f = fc.update(s.forecast, s.clock_s, s.last["arrivals"] / p.tick_s)
        return s.replace(forecast=f), f.coef.sum()

    def fluid_only(k, s, a, p):
        s = jiggle(k, s)
        m, q = fluid.fluid_tick(p, s.last["arrivals"], s.queue_requests, s.replicas_ready, s.cpu_cores, s.host_memory_gb,
                             s.replicas_ready, s.forward_fraction, s.small_active_fraction)
        return s.replace(queue_requests=q), sum(v for v in m.values())

    def prng_only(k, s, a, p):  # the draws one env.step makes: a split, 3 normals, a uniform
        k_step, k_reset = jax.random.split(k)
        return s, jax.random.normal(k_step, (3,)).sum() + jax.random.uniform(k_reset)

    # Auto-reset against one reset state computed outside the loop (gymnax recomputes
    # reset_env every step and selects it only on done).
    obs_r0, state_r0 = jax.tree.map(lambda x: x[0], jax.jit(jax.vmap(env.reset_env, in_axes=(0, None)))(
        jax.random.split(jax.random.PRNGKey(7), 1), params))

    def step_cached_reset(k, s, a, p):
        obs, s2, r, term, _ = env.step_env(k, s, a, p)
        done = term | env.is_truncated(s2, p)
        s2 = jax.tree.map(lambda x, y: jax.lax.select(done, x, y), state_r0, s2)
        obs = jax.lax.select(done, obs_r0, obs)
        return s2, r + obs.sum()

    def harness_only(k, s, a, p):  # keys, actions, the carry and the state perturbation
        return jiggle(k, s), a.astype(jnp.float32)

    # Cheap stand-ins for the ablations (same output structure, inputs still used).
    core_keys = list(jax.eval_shape(
        lambda: fluid.serve_tick(params, 1.0, 0.0, 1.0, 8.0, 64.0, 1.0, 0.0))[0].keys())

    def serve_stub(p, local, queue, serving, cpu, mem, billed, small, offline=0.0, incoming=None, incoming_rtt_s=0.0):
        served = jnp.minimum(local + queue, serving * 100.0)
        x = served * 1e-3 + cpu * 1e-4 + mem * 1e-5 + billed * 1e-2 + small + offline
        return {key: x for key in core_keys} | {"served": served}, local + queue - served

    def peer_stub(p, core, forwarded, load):
        x = forwarded * 1e-3 + load * 1e-4
        return {key: x for key in ("ttft_s", "e2e_s", "ok", "usd_per_request", "quality")}

    @contextlib.contextmanager
    def fluid_stubbed():
        with patched(fluid, "serve_tick", serve_stub), patched(fluid, "modelled_peer", peer_stub):
            yield

    def sampler_stub(e_burst, z_count, t_s, tick_s, traffic, z):
        return expected_rate_rps(t_s, traffic) * tick_s + 1e-3 * (e_burst + z_count), z

    def raw_obs_stub(state, p):
        x = state.clock_s * 1e-6 + state.queue_requests + state.replicas_ready + state.last["arrivals"]
        return jnp.broadcast_to(x, (len(sv.OBS_FIELDS),)).astype(jnp.float32)

    @contextlib.contextmanager
    def patched(module, name, value):
        old = getattr(module, name)
        setattr(module, name, value)
        try:
            yield
        finally:
            setattr(module, name, old)

    nothing = contextlib.nullcontext
    variants = {
        # name: (function, patch context factory)
        FULL: (full_step, nothing),
        "step_env (no auto-reset)": (step_env_only, nothing),
        CACHED: (step_cached_reset, nothing),
        "env.step, fluid model stubbed (serve_tick and the modelled peer)": (full_step, fluid_stubbed),
        "env.step, sample_arrivals stubbed (expected rate)": (full_step, lambda: patched(sv, "arrivals_ar", sampler_stub)),
        "env.step, forecast.update stubbed (identity)": (full_step, lambda: patched(fc, "update", lambda f, t, r: f)),
        "env.step, raw_observation stubbed (step and reset)": (full_step, lambda: patched(sv, "raw_observation", raw_obs_stub)),
        "reset_env alone": (reset_only, nothing),
        "get_obs alone": (obs_only, nothing),
        "fluid_tick alone": (fluid_only, nothing),
        "sample_arrivals alone": (sampler_only, nothing),
        "forecast.update alone": (forecast_only, nothing),
        "PRNG draws of one step alone (a split, 3 normals, a uniform)": (prng_only, nothing),
        "harness alone (key split, random actions, carry, state perturbation)": (harness_only, nothing),
    }

    def make(part):
        vpart = jax.vmap(part, in_axes=(0, 0, 0, None))

        def run(key, state, p):
            def body(carry, _):
                s, acc, key = carry
                key, k_act, k_env = jax.random.split(key, 3)
                a = jax.random.randint(k_act, (batch,), 0, n_act)
                s, v = vpart(jax.random.split(k_env, batch), s, a, p)
                return (s, acc + v, key), None

            (s, acc, _), _ = jax.lax.scan(body, (state, jnp.zeros((batch,)), key), None, steps)
            return s, acc

        return run

    args = (jax.random.PRNGKey(1), state0, params)
    calls, compile_s = {}, {}
    for name, (part, ctx) in variants.items():
        with ctx():  # patches are active only while tracing
            t0 = time.perf_counter()
            calls[name] = (jax.jit(make(part)).lower(*args).compile(), args)
            compile_s[name] = time.perf_counter() - t0
    out = {"batch": batch, "steps": steps, "parts": time_interleaved(calls, repeats)}
    for name, t in out["parts"].items():
        t["compile_s"] = compile_s[name]  # lower + compile, measured directly here
        t["ns_per_env_step"] = t["median_s"] / (batch * steps) * 1e9
    return out


def make_cluster_rollout(step, n: int, regions: int, steps: int, n_actions: int):
    """(key, state, params) -> (state, checksum): `steps` ticks of `n` clusters of
    `regions` regions, random actions; `step(keys (n,), state, actions (n, regions),
    params)` steps all clusters."""
    import jax
    import jax.numpy as jnp

    def rollout(key, state, params):
        def body(carry, _):
            state, acc, key = carry
            key, k_act, k_env = jax.random.split(key, 3)
            actions = jax.random.randint(k_act, (n, regions), 0, n_actions)
            obs, state, reward, _, _, _ = step(jax.random.split(k_env, n), state, actions, params)
            acc = acc + reward.sum(-1) + obs.reshape(n, -1).sum(-1)
            return (state, acc, key), None

        (state, acc, _), _ = jax.lax.scan(body, (state, jnp.zeros((n,)), key), None, steps)
        return state, acc

    return rollout


def worker_cluster(batch: int, steps: int, repeats: int) -> dict:
    """`batch` clusters of the ten-region cluster file: ServingCluster, the same regions as
    independent ServingNode-v0 envs (vmap over regions, each its own params), and CartPole
    at batch x regions envs, in one process, interleaved."""
    import gymnax
    import jax

    from aro_jax.envs.cluster import ServingCluster
    from aro_jax.envs.serving import ServingNodeEnv

    cenv = ServingCluster()
    cparams = cenv.default_params
    regions = int(cparams.rtt_s.shape[0])
    node = ServingNodeEnv()
    nparams = cparams.nodes
    cartpole, cp_params = gymnax.make("CartPole-v1")
    base = rss_mb()

    keys = jax.random.split(jax.random.PRNGKey(0), batch)
    cstate = jax.jit(jax.vmap(cenv.reset, in_axes=(0, None)))(keys, cparams)[1]
    reset_regions = jax.vmap(jax.vmap(node.reset, in_axes=(0, 0)), in_axes=(0, None))
    nstate = jax.jit(reset_regions)(jax.random.split(jax.random.PRNGKey(0), batch * regions).reshape(batch, regions, -1), nparams)[1]
    cstep = jax.vmap(cenv.step, in_axes=(0, 0, 0, None))
    vnode = jax.vmap(jax.vmap(node.step, in_axes=(0, 0, 0, 0)), in_axes=(0, 0, 0, None))

    def nstep(keys, state, actions, params):
        sub = jax.vmap(lambda k: jax.random.split(k, regions))(keys)
        return vnode(sub, state, actions, params)

    calls = {
        "cluster": (jax.jit(make_cluster_rollout(cstep, batch, regions, steps, cenv.num_actions)), (jax.random.PRNGKey(1), cstate, cparams)),
        "regions": (jax.jit(make_cluster_rollout(nstep, batch, regions, steps, node.num_actions)), (jax.random.PRNGKey(1), nstate, nparams)),
        "cartpole": (jax.jit(make_rollout(cartpole, batch * regions, steps)),
                     (jax.random.PRNGKey(1), init_states(cartpole, cp_params, batch * regions), cp_params)),
    }
    out = {"batch": batch, "num_regions": regions, "steps": steps, "devices": len(jax.devices()), "rss_mb_base": base}
    for name, t in time_interleaved(calls, repeats, _record_rss).items():
        t["steps_per_s"] = batch * regions * steps / t["median_s"]  # region-steps (CartPole: env steps)
        out[name] = t
    return out


def worker_cluster_sharded(batch: int, steps: int, repeats: int) -> dict:
    """The cluster env on 2 (fake) devices, two layouts: the cluster batch split over the
    devices (each device steps whole clusters), or the region axis split (each cluster's
    regions on both devices, XLA exchanging the routing sums every tick); beside them the
    same program on one of the devices. Automatic partitioning (jit on sharded inputs)."""
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from aro_jax.envs.cluster import ServingCluster

    cenv = ServingCluster()
    cparams = cenv.default_params
    regions = int(cparams.rtt_s.shape[0])
    mesh = Mesh(np.array(jax.devices()), ("d",))
    keys = jax.random.split(jax.random.PRNGKey(0), batch)
    cstate = jax.device_get(jax.jit(jax.vmap(cenv.reset, in_axes=(0, None)))(keys, cparams)[1])
    cstep = jax.vmap(cenv.step, in_axes=(0, 0, 0, None))
    fn = make_cluster_rollout(cstep, batch, regions, steps, cenv.num_actions)

    def by_regions(x):
        split = np.ndim(x) >= 2 and np.shape(x)[1] == regions
        return NamedSharding(mesh, P(None, "d") if split else P())

    layouts = {
        "one device": jax.tree.map(lambda x: jax.devices()[0], cstate),
        "clusters split": jax.tree.map(lambda x: NamedSharding(mesh, P("d")), cstate),
        "regions split": jax.tree.map(by_regions, cstate),
    }
    calls = {}
    for name, shardings in layouts.items():
        state = jax.tree.map(jax.device_put, cstate, shardings)
        calls[name] = (jax.jit(fn), (jax.random.PRNGKey(1), state, cparams))
    out = {"batch": batch, "num_regions": regions, "steps": steps, "devices": len(jax.devices())}
    for name, t in time_interleaved(calls, repeats, _record_rss).items():
        t["steps_per_s"] = batch * regions * steps / t["median_s"]
        out[name] = t
    return out


def worker_main(args) -> None:
    import jax

    fn = {"single": worker_single, "sharded": worker_sharded, "profile": worker_profile, "cluster": worker_cluster,
          "cluster_sharded": worker_cluster_sharded}[args.worker]
    res = fn(args.batch, args.steps, args.repeats)
    res["rss_mb"] = rss_mb()
    res["jax"] = jax.__version__
    res["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    print("RESULT " + json.dumps(res), flush=True)


# --------------------------------------------------------------------------------------
# Driver side (no jax import: each measurement is a fresh subprocess)
# --------------------------------------------------------------------------------------


def run_worker(kind: str, batch: int, steps: int, repeats: int, xla_flags: str, timeout: float) -> dict:
    args = [kind, "--batch", str(batch), "--steps", str(steps), "--repeats", str(repeats)]
    return bench_common.run_worker(__file__, args, f"{kind} batch={batch}", xla_flags, timeout)


fmt_rate = bench_common.fmt_rate


FULL = "env.step (advance + reset_state + select, observed once)"
CACHED = "step_env + select against a cached reset state (alternative auto-reset)"


def interpretation(single: list, sharded: list, profile: dict | None, met: bool) -> list[str]:
    """Bullets computed from this run's numbers (so a rerun rewrites them consistently)."""
    out = []
    if single:
        ratios = ", ".join(f"{r['node']['steps_per_s'] / r['cartpole']['steps_per_s']:.3f} at {r['batch']}" for r in single)
        best = max(single, key=lambda r: r["node"]["steps_per_s"])
        out.append(f"- Node env / CartPole, one device: {ratios}. The node env peaks at {fmt_rate(best['node']['steps_per_s'])} "
                   f"steps/s (batch {best['batch']}); CartPole at "
                   f"{fmt_rate(max(r['cartpole']['steps_per_s'] for r in single))}.")
        out.append(f"- Aim (batch >= {AIM_BATCH}: >= {AIM_RATIO:g} x CartPole and > 1M steps/s): **{'met' if met else 'not met'}** "
                   "in this run.")
        comp = [r["node"]["compile_s"] for r in single]
        ccomp = [r["cartpole"]["compile_s"] for r in single]
        out.append(f"- Compile: the node-env rollout takes {min(comp):.1f}-{max(comp):.1f} s to compile, CartPole "
                   f"{min(ccomp):.1f}-{max(ccomp):.1f} s. Peak RSS of the largest batch ({single[-1]['batch']}): "
                   f"{single[-1]['node']['rss_mb_after']:.0f} MB after the node env.")
    if sharded:
        by_batch = {r["batch"]: r for r in single}
        bits = []
        for r in sharded:
            one = by_batch.get(r["batch"])
            if one:
                bits.append(f"batch {r['batch']}: node {r['node']['steps_per_s'] / one['node']['steps_per_s']:.2f}x, "
                            f"CartPole {r['cartpole']['steps_per_s'] / one['cartpole']['steps_per_s']:.2f}x")
        if bits:
            out.append("- Sharding over 2 fake CPU devices vs one device: " + "; ".join(bits) + ". "
                       "One XLA CPU device runs this loop mostly on one core; two devices use both cores "
                       "(with other jobs on the machine the second core is not always free).")
    if profile:
        ns = {k: v["ns_per_env_step"] for k, v in profile["parts"].items()}
        full = ns[FULL]
        saving = lambda k: full - ns[k]  # noqa: E731
        abl = {k: saving(k) for k in ns if k.startswith("env.step, ") or k.startswith("step_env")}
        ranked = "; ".join(f"{k}: {v:+.0f} ns ({v / full:+.0%})" for k, v in sorted(abl.items(), key=lambda kv: -kv[1]))
        out.append(f"- Profile at batch {profile['batch']}: a full `env.step` costs {full:.0f} ns per env step "
                   f"({fmt_rate(1e9 / full)} steps/s in that process; CartPole's whole step at this batch is about "
                   f"{1e9 / next((r['cartpole']['steps_per_s'] for r in single if r['batch'] == profile['batch']), float('nan')):.0f} ns). "
                   f"Savings when a component is removed or stubbed: {ranked}.")
        out.append(f"- Auto-reset: `step` computes a reset state on every step (under vmap the auto-reset is a select) and "
                   f"observes the selected state once: `reset_env` alone costs {ns['reset_env alone']:.0f} ns, and "
                   f"stepping without it (`step_env`) costs {ns['step_env (no auto-reset)']:.0f} ns; auto-resetting against "
                   f"a reset state computed once costs {ns[CACHED]:.0f} ns ({full / ns[CACHED]:.2f}x faster than `env.step`).")
        cp = next((r["cartpole"]["steps_per_s"] for r in single if r["batch"] == profile["batch"]), None)
        if cp:
            se, ca = ns["step_env (no auto-reset)"], ns[CACHED]
            out.append(f"- What would reach the aim: against CartPole's rate at batch {profile['batch']} in the one-device run "
                       f"({fmt_rate(cp)}/s), the full `env.step` above is at ratio {1e9 / full / cp:.3f}; a step without the "
                       f"per-step reset would be at {1e9 / se / cp:.3f} ({fmt_rate(1e9 / se)} steps/s), and an auto-reset "
                       f"against a cached reset state at {1e9 / ca / cp:.3f} ({fmt_rate(1e9 / ca)} steps/s). The ratio aim "
                       f"needs <= {10e9 / cp:.0f} ns per node step here, the 1M/s aim <= 1000 ns (on this loaded machine; "
                       "the node and CartPole figures in this bullet come from different processes, so approximate). "
                       "Next largest savings among the component ablations: "
                       + ", ".join(f"{k.split(', ')[1].split(' stubbed')[0]} ({v:+.0f} ns)" for k, v in
                                   sorted(((k, v) for k, v in abl.items() if k.startswith("env.step, ")), key=lambda kv: -kv[1]))
                       + ".")
        alone = {k: ns[k] for k in ns if " alone" in k and not k.startswith("harness")}
        out.append("- Parts alone (ns per env step, each including the harness's "
                   f"{ns['harness alone (key split, random actions, carry, state perturbation)']:.0f} ns): "
                   + ", ".join(f"{k.replace(' alone', '')} {v:.0f}" for k, v in sorted(alone.items(), key=lambda kv: -kv[1]))
                   + ". `fluid_tick` evaluates the latency model twice (big and small model) and the modelled peer's once more, with erf/exp/log/pow; a step "
                   "makes three threefry draws (the key split, one normal triple for the tick's bursts, counts and cold start, "
                   "a uniform for the reset state). CartPole's step is a few multiply-adds and "
                   "one uniform draw.")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 256, 4096, 16384, 65536])
    ap.add_argument("--steps", type=int, default=None, help="scan length (default: per batch, 100..10000)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--shard-batches", type=int, nargs="*", default=[4096, 16384],
                    help="batch sizes to also run sharded over 2 fake CPU devices")
    ap.add_argument("--clusters", type=int, nargs="*", default=[1, 256, 4096],
                    help="numbers of ten-region clusters to time the cluster env at")
    ap.add_argument("--cluster-shard-batches", type=int, nargs="*", default=[256, 4096],
                    help="numbers of clusters to time on 2 fake CPU devices, clusters split vs regions split")
    ap.add_argument("--profile-batch", type=int, default=AIM_BATCH)
    ap.add_argument("--profile-steps", type=int, default=50)
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).with_suffix(".md")))
    ap.add_argument("--timeout", type=float, default=600.0, help="per subprocess, seconds")
    ap.add_argument("--render", metavar="JSON", help="re-render the markdown from a saved JSON, no measuring")
    # Internal: run one measurement and print a JSON line.
    ap.add_argument("--worker", choices=["single", "sharded", "profile", "cluster", "cluster_sharded"])
    ap.add_argument("--batch", type=int)
    args = ap.parse_args()
    if args.worker:
        return worker_main(args)

    json_path = Path(args.out).with_suffix(".json")
    if args.render:
        data = json.loads(Path(args.render).read_text())
    else:
        data = measure(args)
        json_path.write_text(json.dumps(data, indent=1))
    Path(args.out).write_text(render(data))
    print(f"wrote {args.out}" + ("" if args.render else f" and {json_path}"), file=sys.stderr)


def measure(args) -> dict:
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    flags1 = " ".join(f for f in [os.environ.get("XLA_FLAGS", ""), BASE_XLA_FLAGS] if f)
    flags2 = flags1 + " --xla_force_host_platform_device_count=2"
    steps_of = lambda b: args.steps or default_steps(b)  # noqa: E731

    single = []
    for b in args.batches:
        single.append(run_worker("single", b, steps_of(b), args.repeats, flags1, args.timeout))
    sharded = []
    for b in args.shard_batches:
        sharded.append(run_worker("sharded", b, steps_of(b), args.repeats, flags2, args.timeout))

    clusters = []
    for n in args.clusters:
        clusters.append(run_worker("cluster", n, args.steps or default_steps(10 * n), args.repeats, flags1, args.timeout))
    cluster_sharded = []
    for n in args.cluster_shard_batches:
        cluster_sharded.append(run_worker("cluster_sharded", n, args.steps or default_steps(10 * n), args.repeats, flags2, args.timeout))

    profile = None
    if not aim_met(single) and not args.no_profile:
        pb = args.profile_batch
        profile = run_worker("profile", pb, args.profile_steps, args.repeats, flags1, args.timeout)
    return {
        "single": single, "sharded": sharded, "cluster": clusters, "cluster_sharded": cluster_sharded, "profile": profile, "flags": [flags1, flags2],
        "argv": sys.argv[1:], "repeats": args.repeats, "total_s": time.perf_counter() - t_start,
        "load_start": load_start[0], "load_end": os.getloadavg()[0],
        "cpu_count": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
    }


def aim_met(single: list) -> bool:
    big = [r for r in single if r["batch"] >= AIM_BATCH]
    return bool(big) and all(
        r["node"]["steps_per_s"] >= AIM_RATIO * r["cartpole"]["steps_per_s"] and r["node"]["steps_per_s"] > AIM_RATE for r in big
    )


def render(data: dict) -> str:
    import importlib.metadata as md

    single, sharded, profile = data["single"], data["sharded"], data["profile"]
    flags1, flags2 = data["flags"]
    total_s, repeats = data["total_s"], data["repeats"]
    big = [r for r in single if r["batch"] >= AIM_BATCH]
    met = aim_met(single)
    # ---- markdown ----
    jax_version = single[0]["jax"] if single else md.version("jax")
    machine = f"{data['cpu_count']}-core {data['machine']} CPU, no GPU, jax {jax_version}"
    argv = " ".join(data["argv"])
    cmd = f"/work/venv/bin/python benchmarks/env_throughput.py{(' ' + argv) if argv else ''}"
    L = []
    L.append("# Env throughput: serving node env vs gymnax CartPole-v1\n")
    L.append(f"- Command: `{cmd}` (from the repository root)")
    L.append(f"- Machine: {machine} (jaxlib {md.version('jaxlib')}, gymnax {md.version('gymnax')}, "
             f"Python {data['python']}); other jobs may share the cores, so absolute rates are noisy and "
             "the ratios (same process, calls interleaved) are the figures to compare.")
    L.append(f"- XLA_FLAGS: `{flags1}` (one device); `{flags2}` (sharded rows)")
    L.append(f"- Harness: `jit(scan(vmap(env.step)))`, each env's gymnax 1.x `step` with its auto-reset (CartPole: gymnax's, "
             f"`reset_env` every step, selected on done; the serving envs: a reset state every step, selected on done and "
             f"observed once, `envs/autoreset.py`), uniform random actions, a fresh key per env per step, params a traced argument "
             f"broadcast over the batch, rewards and observations summed into the carry. Median of {repeats} "
             f"steady-state calls, node and CartPole calls interleaved; compile s = first call - median call. Each batch size in its own subprocess; "
             f"peak RSS is that process's `ru_maxrss` after imports and reset (before any rollout compiled), after the "
             f"node env's first call, and after both envs ran (node first, then CartPole). Total wall time {total_s:.0f} s; "
             f"1-min load average {data['load_start']:.1f} at the start and {data['load_end']:.1f} at the end "
             f"(2 cores: above ~2 means other jobs were competing for them).\n")

    L.append("## One XLA CPU device\n")
    L.append("| batch | scan steps | node steps/s | CartPole steps/s | ratio node/CartPole | node compile s | CartPole compile s | peak RSS MB (after imports / node / both) |")
    L.append("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in single:
        n, c = r["node"], r["cartpole"]
        L.append(f"| {r['batch']} | {r['steps']} | {fmt_rate(n['steps_per_s'])} | {fmt_rate(c['steps_per_s'])} | "
                 f"{n['steps_per_s'] / c['steps_per_s']:.3f} | {n['compile_s']:.2f} | {c['compile_s']:.2f} | "
                 f"{r['rss_mb_base']:.0f} / {n['rss_mb_after']:.0f} / {r['rss_mb']:.0f} |")
    L.append("")

    if sharded:
        by_batch = {r["batch"]: r for r in single}
        L.append("## Sharded over 2 fake XLA CPU devices (`jax.shard_map`, `check_vma=False`)\n")
        L.append("| batch | scan steps | node steps/s | CartPole steps/s | ratio node/CartPole | node speed-up vs 1 device | CartPole speed-up vs 1 device | node compile s | peak RSS MB (node / both) |")
        L.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in sharded:
            n, c = r["node"], r["cartpole"]
            one = by_batch.get(r["batch"])
            su = lambda k: f"{r[k]['steps_per_s'] / one[k]['steps_per_s']:.2f}x" if one else "-"  # noqa: E731
            L.append(f"| {r['batch']} | {r['steps']} | {fmt_rate(n['steps_per_s'])} | {fmt_rate(c['steps_per_s'])} | "
                     f"{n['steps_per_s'] / c['steps_per_s']:.3f} | {su('node')} | {su('cartpole')} | {n['compile_s']:.2f} | "
                     f"{n['rss_mb_after']:.0f} / {r['rss_mb']:.0f} |")
        L.append("\n(The speed-ups compare with the one-device subprocess run earlier in the same invocation.)\n")

    clusters = data.get("cluster") or []
    if clusters:
        L.append("## Cluster env: ten regions coupled by rebalancing (one XLA CPU device)\n")
        L.append("`ServingCluster` on the ten-region cluster file (`aro_jax/configs/cluster10.yaml`), `jit(scan(vmap(env.step)))` "
                 "over clusters with one random action per region; beside it, in the same process with calls interleaved, the "
                 "same ten regions as independent `ServingNode-v0` envs (vmap over regions with their own params, then over "
                 "clusters; the modelled peer instead of real ones) and CartPole at the same number of envs. Rates in "
                 "region-steps/s (one region's tick; CartPole: env steps/s). Cost ratio = independent rate / cluster rate.\n")
        L.append("| clusters | regions | scan steps | cluster region-steps/s | independent regions steps/s | CartPole steps/s | "
                 "cost ratio cluster/independent | cluster / CartPole | cluster compile s | independent compile s | peak RSS MB |")
        L.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in clusters:
            c, n, cp = r["cluster"], r["regions"], r["cartpole"]
            L.append(f"| {r['batch']} | {r['batch'] * r['num_regions']} | {r['steps']} | {fmt_rate(c['steps_per_s'])} | "
                     f"{fmt_rate(n['steps_per_s'])} | {fmt_rate(cp['steps_per_s'])} | {n['steps_per_s'] / c['steps_per_s']:.2f} | "
                     f"{c['steps_per_s'] / cp['steps_per_s']:.3f} | {c['compile_s']:.2f} | {n['compile_s']:.2f} | {r['rss_mb']:.0f} |")
        ok = [r for r in clusters if r["regions"]["steps_per_s"] / r["cluster"]["steps_per_s"] <= AIM_CLUSTER_COST]
        L.append(f"\nAim: a ten-region cluster tick costs <= {AIM_CLUSTER_COST:g}x ten independent region ticks: met at "
                 f"{len(ok)} of {len(clusters)} sizes ({', '.join(str(r['batch']) for r in ok) or 'none'}).\n")
    csh = data.get("cluster_sharded") or []
    if csh:
        L.append("### The cluster env on 2 fake XLA CPU devices: split the clusters or the regions\n")
        L.append("Same harness, `jit` on inputs placed by `NamedSharding` (XLA's automatic partitioning), in one process "
                 f"with `{flags2}`: the whole batch on one of the devices; the cluster batch split over the 2 devices (whole "
                 "clusters per device); or each cluster's region axis split (5 regions per device, the routing's sums over "
                 "peers exchanged every tick).\n")
        L.append("| clusters | scan steps | one device region-steps/s | clusters split | regions split | clusters split speed-up | regions split speed-up |")
        L.append("|---:|---:|---:|---:|---:|---:|---:|")
        for r in csh:
            one, a, b = r["one device"]["steps_per_s"], r["clusters split"]["steps_per_s"], r["regions split"]["steps_per_s"]
            L.append(f"| {r['batch']} | {r['steps']} | {fmt_rate(one)} | {fmt_rate(a)} | {fmt_rate(b)} | {a / one:.2f}x | {b / one:.2f}x |")
        best = ["clusters" if r["clusters split"]["steps_per_s"] >= r["regions split"]["steps_per_s"] else "regions" for r in csh]
        per_size = ", ".join(f"{r['batch']}: {b} split" for r, b in zip(csh, best))
        L.append(f"\nFaster layout per size: {per_size}.\n")

    L.append("## Aim\n")
    L.append(f"Aim: at batch >= {AIM_BATCH}, node env >= {AIM_RATIO:g} x CartPole's rate in the same run and > 1M node steps/s "
             "(one device).\n")
    for r in big:
        n, c = r["node"]["steps_per_s"], r["cartpole"]["steps_per_s"]
        ok = n >= AIM_RATIO * c and n > AIM_RATE
        L.append(f"- batch {r['batch']}: node {fmt_rate(n)}/s, ratio {n / c:.3f} -> "
                 f"{'met' if ok else 'NOT met'} (ratio {'ok' if n >= AIM_RATIO * c else 'short'}, "
                 f"rate {'ok' if n > AIM_RATE else 'short'})")
    if not big:
        L.append("- no batch >= 4096 was run")
    L.append(f"\n**Overall: {'met' if met else 'not met'}.**\n")

    if profile:
        parts = profile["parts"]
        full = parts[FULL]["ns_per_env_step"]
        L.append(f"## Where a node-env step's time goes (batch {profile['batch']}, {profile['steps']} scan steps, one device)\n")
        if data.get("profile_rerun"):
            L.append(f"({data['profile_rerun']}; its absolute figures come from a different load than the tables above.)\n")
        L.append("Same harness (`jit(scan(vmap(f)))`, random actions, fresh keys per step), all variants compiled first and "
                 "then timed interleaved in one process. Ablations: the full `env.step` with one component swapped "
                 "for a cheap stand-in (patched into the env module in the benchmark process while tracing; the env's "
                 "source is untouched); the saving is that component's cost in context. Parts alone: each component with "
                 "its inputs perturbed every step so XLA cannot hoist it out of the loop; these include the harness "
                 "(its own row), are not additive, and have no saving column. Compile s here is `lower().compile()` time.\n")
        L.append("| variant | ns per env step | vs env.step | saving vs env.step (ns) | steps/s | compile s |")
        L.append("|---|---:|---:|---:|---:|---:|")
        for name, t in parts.items():
            ns = t["ns_per_env_step"]
            saved = "-" if " alone" in name else f"{full - ns:+.0f}"
            L.append(f"| {name} | {ns:.0f} | {ns / full:.0%} | {saved} | {fmt_rate(1e9 / ns)} | {t['compile_s']:.2f} |")
        L.append("")

    L.append("## Interpretation\n")
    L.extend(interpretation(single, sharded, profile, met))
    L.append("")
    return "\n".join(L)

if __name__ == "__main__":
    main()
