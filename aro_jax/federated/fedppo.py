"""Federated PPO: one learner per node on a node axis, Byzantine-robust aggregation of
their parameter deltas inside the compiled loop.

A round: every node starts from the global parameters, runs K local PPO updates on its
own clusters and node profile, and sends its delta. Byzantine nodes (config) replace
theirs by an attack; deltas are optionally clipped and noised (DP); the robust
aggregator combines them once; the server applies the aggregate (server learning rate,
optional momentum) and broadcasts. "local" mode skips the aggregation (Local-only
baseline): every node keeps its own parameters and its own normaliser. Under
`dp_mechanism: central` the server instead Poisson-samples the regions, clips each
participant's delta and statistics, and noises their sum once (DP-FedAvg,
privacy.central_mean); only the mean has the bounded sensitivity that needs. With
personal policies (`personal_mix` < 1) a node starts from its own policy instead and
sends its delta, or its policy's offset from the global (`personal_sends`).

The shared observation normaliser is defended like the parameters. Every node sends the
mean and variance of the observations of its round with its delta; Byzantine nodes may
lie (attacks.apply_statistics_attack), DP privatises them with the update's noise
multiplier (privacy.privatise_statistics), and the defence aggregates them robustly
(aggregators.aggregate_statistics: a coordinate-wise trimmed mean with the defence's f,
the plain mean only under FedAvg). The counts the nodes report are not trusted: each node
weighs the same, and the round adds n_nodes x the median report to the normaliser's count
(honest nodes all report K x their static rollout size). A round the server rejects
(skipped) leaves the normaliser unchanged.
We chose this over per-node normalisers fixed from each node's own data because one
global normaliser is what a shared policy is trained and exported with (it also serves a
region the federation has not seen, which has no statistics of its own yet), and because
the trimmed mean gives a per-coordinate guarantee independent of the liars' values: the
round's mean lies inside the honest nodes' means, its variance below the honest nodes'
largest variance plus the square of the spread of their means, as long as at most f
nodes lie.

The local phase is mapped over the node axis by `node_map`: `vmap` on one device, or
`shard_map` over a mesh axis of N devices (and across processes under jax.distributed),
with the same code. Aggregation runs on the gathered (n_nodes, n_params) deltas, once.

Who attacks, how hard, and which (aggregator, f) defends are traced values in
`FedState.threat`, picked from static option lists by `lax.switch`: the config gives a
one-option program, and a robustness study can pass every attack and defence to
`make_federated_train` and run the whole grid through one compiled program.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from aro_jax.algorithms import ppo
from aro_jax.algorithms.networks import RunningStats
from aro_jax.federated import aggregators, attacks, privacy

NODE_AXIS = "node"


@dataclasses.dataclass
class FederatedConfig:
    """How the nodes learn together. "centralized": one learner on every node's pooled
    data (no federated round); "federated": one learner per node, deltas robustly
    aggregated each round; "local": one learner per node, no aggregation (the Local-only
    baseline). The `federated:` section of an experiment config."""

    mode: str = "centralized"
    aggregator: str = "krum"  # a name in aro_jax.federated.aggregators.AGGREGATORS
    pre_aggregators: list[str] = dataclasses.field(default_factory=list)  # e.g. [nnm] or [bucketing]
    num_byzantine: int = 0  # f the aggregator tolerates
    local_updates: int = 4  # K local PPO updates per node per round
    server_lr: float = 1.0
    server_momentum: float = 0.0
    # Each region sends the momentum of its deltas, m_r = beta m_(r-1) + (1 - beta) delta_r,
    # instead of the round's delta (worker momentum, Karimireddy et al., ICML 2021): the
    # average over rounds shrinks the spread of the honest messages, which bounds both a
    # robust aggregator's error and the room an in-distribution attack (ALIE) hides in.
    # On the ten-region cluster at 1.5M steps, beta = 0.9 hurt (benchmarks/robustness.md,
    # "momentum" rows): the messages lag the on-policy PPO deltas by ~10 rounds.
    worker_momentum: float = 0.0
    attack: str = "none"  # a name in aro_jax.federated.attacks.ATTACKS
    attack_strength: float = 1.0
    byzantine_nodes: list[int] = dataclasses.field(default_factory=list)  # indices of misbehaving nodes
    attack_start_round: int = 0
    dp_clip_norm: float = 0.0  # per-node update clip (L2); 0 disables DP
    dp_noise_multiplier: float = 0.0  # noise std / clip norm, added to each node's update
    dp_delta: float = 1e-5
    # L2 clip of each node's observation-statistics message [mean, std] (observations are
    # O(1) after the node's observation scale: on the ten-region cluster under an untrained
    # policy the honest messages measured 3.2-11.2, median 3.9); the noise is
    # dp_noise_multiplier x this.
    dp_stats_clip_norm: float = 10.0
    # Region-level mechanism: "local" (each region noises its own update, any aggregator)
    # or "central" (DP-FedAvg: the server noises the clipped mean once; aggregator "mean"
    # only, see privacy.CENTRAL_SENSITIVITY), with regions Poisson-sampled per round at
    # dp_node_sampling (central only: under local noise the server sees who sent).
    dp_mechanism: str = "local"
    dp_node_sampling: float = 1.0
    # Record-level DP inside each region (DP-SGD, unit: one simulated cluster-day): each
    # PPO step clips every sampled segment's gradient to segment_dp_clip_norm (0: off) and
    # adds noise segment_dp_noise_multiplier x that; segments are Poisson-sampled per step
    # with segment_dp_sampling_rate (0: 1 / ppo.num_minibatches). Any mode.
    segment_dp_clip_norm: float = 0.0
    segment_dp_noise_multiplier: float = 0.0
    segment_dp_sampling_rate: float = 0.0
    # With ppo.normalize_obs under DP-SGD: the normaliser's statistics per segment clipped
    # to segment_dp_stats_clip_norm and noised with this multiplier (0: normaliser refused).
    segment_dp_stats_clip_norm: float = 10.0
    segment_dp_stats_noise_multiplier: float = 0.0
    # Personalisation (federated mode): after each round a region's policy moves this share
    # of the way to the robust global (the interpolation of APFL, Deng et al. 2020): 1 =
    # every region runs the global policy; below 1 each region keeps its own policy, trained
    # on its own traffic with its own normaliser (as a local-only region) and pulled toward
    # the global, and sends its own round's delta. A Byzantine region reaches an honest one
    # only through the robust aggregate, scaled by it.
    personal_mix: float = 1.0
    # What a personalised region sends each round: "delta", its round's update (the global
    # integrates the aggregated updates), or "offset", its model minus the global (the
    # global becomes the robust centre of the regions' models: the mean-regularised
    # objective of Hanzely & Richtarik 2020 with a robust centre). Under "delta" nothing
    # anchors the global, so an in-distribution bias (ALIE) adds up over rounds and the
    # pull drags every region after it; under "offset" each round's bias is measured from
    # the honest models again and does not accumulate.
    personal_sends: str = "delta"
    # The pull follows the learning-rate schedule (ppo.anneal_lr): Ditto's pull toward the
    # global is a gradient step of the proximal term, lr x lambda, so it fades with the lr.
    # A constant pull outlasts the annealed local learning: over the last rounds, where the
    # lr is near 0, it draws every region's policy onto the global (at a pull of 3 % per
    # round the last 150 rounds keep 1 % of a region's own offset).
    personal_mix_anneal: bool = False
    # Networks of the actor-critic ("actor", "critic", "cost_critic") or their output layers
    # ("actor_out", ...) a personalised region keeps its own, never pulled toward the
    # global. A critic estimates the region's own returns and constraint costs: pulled
    # toward the centre of regions whose traffic meets its targets more easily, a code
    # region's cost critic reads its violations low. An own output layer over pulled hidden
    # layers is a personal head on a shared representation (FedPer, Arivazhagan et al. 2019).
    personal_own: tuple[str, ...] = ()
    # Iterate averaging (federated mode, one shared policy): the deployed policy is an
    # exponential moving average of the global parameters over rounds with this decay per
    # round (0: the last global). Under DP noise each step's noise is a random walk that the
    # average cancels while the signal's drift stays (De et al. 2022 average DP-SGD's
    # iterates the same way). Post-processing of the released globals: no privacy cost.
    global_ema: float = 0.0
    # Devices the node axis is sharded over (must divide the node count); in the cluster env
    # (coupled regions) the devices split the clusters instead (must divide env.num_clusters).
    devices: int = 1


@struct.dataclass
class Threat:
    """The round's adversary and defence, as traced values (see the module docstring)."""

    attack: jax.Array  # int32 index into the attack names
    strength: jax.Array  # float32, the attack's scale (attacks.apply_attack)
    byzantine: jax.Array  # (n_nodes,) bool, the nodes that misbehave
    defence: jax.Array  # int32 index into the (aggregator, f[, pre-aggregators]) defences


@struct.dataclass
class FedState:
    nodes: ppo.TrainState  # stacked over the node axis
    global_params: Any
    global_stats: RunningStats
    server_velocity: jax.Array  # (n_params,) server momentum buffer
    # (n_nodes, n_params): each node's last message before any attack: its round's delta, or
    # under worker momentum the momentum of its deltas (what the stale attack replays).
    previous_deltas: jax.Array
    key: jax.Array
    round: jax.Array
    threat: Threat
    global_average: Any = None  # the deployed average of global_params (global_ema > 0), else None


def node_map(fn, devices: int):
    """Map `fn(node_state, hp, node_params)` over the leading node axis of its first and
    last arguments (hp is shared): vmap on one device, or shard_map over a mesh of
    `devices` where each device vmaps its share of the nodes."""
    mapped = jax.vmap(fn, in_axes=(0, None, 0))
    if devices <= 1:
        return mapped
    mesh = Mesh(np.array(jax.devices()[:devices]), (NODE_AXIS,))
    # check_vma=False: the local phase's lax.scan carries mix replicated and per-node
    # values, which the varying-axes checker rejects on jax 0.10 (DESIGN "Speed").
    return jax.shard_map(mapped, mesh=mesh, in_specs=(P(NODE_AXIS), P(), P(NODE_AXIS)), out_specs=P(NODE_AXIS), check_vma=False)


def make_federated_train(
    learner: ppo.Learner,
    node_params,
    fed: FederatedConfig,
    attack_options: Sequence[str] | None = None,
    defence_options: Sequence[tuple] | None = None,
    coupled: ppo.EnvGrid | None = None,
    coupled_split: str = "clusters",
):
    """Build (init, train_chunk, learner) for federated or local-only PPO over the stacked
    `node_params` (one learner per node). `learner` is a PPO learner built on one node's
    params (a stack of one), whose init/update the round maps over the node axis.
    `coupled`: the nodes' envs step together on this (nodes, envs) grid (the regions of
    one cluster env); each node still acts with its own policy and learns from its own
    cells only (`coupled_local_phase`). Over fed.devices > 1 the coupled grid splits its
    batch of envs (`coupled_split` "clusters": every device steps whole clusters, the
    learners' gradients are reduced across devices) or its nodes ("regions": the routing
    exchanges between devices every tick); benchmarks/cluster_sharding.md measures both.

    `attack_options` (attack names) and `defence_options` ((aggregator, f) pairs, or
    (aggregator, f, pre-aggregators) triples; a pair uses fed.pre_aggregators) are the
    choices `FedState.threat` indexes; both default to the config's single choice, which
    `init` selects. Every defence's (n, f) requirement is checked here."""
    n_nodes = jax.tree.leaves(node_params)[0].shape[0]
    one_node = jax.tree.map(lambda x: x[:1], node_params)
    per_node_params = jax.tree.map(lambda x: x[:, None], node_params)  # (nodes, 1, ...)
    k_local = fed.local_updates
    attack_options = tuple(attack_options or (fed.attack,))
    defence_options = tuple((d[0], d[1], tuple(d[2]) if len(d) > 2 else tuple(fed.pre_aggregators))
                            for d in (defence_options or ((fed.aggregator, fed.num_byzantine),)))
    for name in attack_options:
        if name not in attacks.ATTACKS:
            raise ValueError(f"unknown attack {name!r}; valid names: {sorted(attacks.ATTACKS)}")
    if fed.mode == "federated":
        for name, f, _ in defence_options:
            aggregators.check_requirements(name, n_nodes, f)
        if fed.dp_clip_norm > 0 and not fed.dp_stats_clip_norm > 0:
            raise ValueError(f"dp_stats_clip_norm must be > 0 when DP is on (dp_clip_norm = {fed.dp_clip_norm}); got {fed.dp_stats_clip_norm}")
        if fed.dp_mechanism not in ("local", "central"):
            raise ValueError(f"dp_mechanism must be local or central, got {fed.dp_mechanism!r}")
        central = fed.dp_mechanism == "central" and fed.dp_clip_norm > 0
        if central:
            for name, _, pre in defence_options:
                privacy.check_central(name, pre)
        elif fed.dp_node_sampling != 1.0:
            raise ValueError("dp_node_sampling < 1 needs dp_mechanism central: under local noise the server sees which "
                             "regions sent, so sampling amplifies nothing against it")

    def attack_with(name, deltas, stats, active, key, strength, previous):
        sent = attacks.apply_attack(name, deltas, active, key, strength, previous)
        means, variances = attacks.apply_statistics_attack(name, stats.mean, stats.var, active, strength)
        return sent, means, variances

    attack_branches = [partial(attack_with, name) for name in attack_options]

    def defend(name, f, pre, sent, means, variances, key):
        aggregate, info = aggregators.aggregate(sent, name, f, pre=pre, key=key)
        mean, var, stats_info = aggregators.aggregate_statistics(means, variances, name, f)
        return aggregate, info["num_invalid"], info["skipped"], mean, var, stats_info["skipped"]

    defence_branches = [partial(defend, *d) for d in defence_options]

    def local_phase(state: ppo.TrainState, hp, params):
        """K local PPO updates of one node; returns its state, mean metrics, rollout stats."""

        def one(carry, _):
            s, stats = carry
            s, metrics, batch_stats = learner.update(s, hp, params)
            return (s, stats.merge(batch_stats)), metrics

        empty = RunningStats(jnp.zeros_like(state.obs_stats.mean), jnp.zeros_like(state.obs_stats.var), jnp.zeros((), jnp.float32))
        (state, stats), metrics = jax.lax.scan(one, (state, empty), None, k_local)
        return state, jax.tree.map(jnp.mean, metrics), stats

    if coupled is not None and fed.devices > 1:
        if coupled_split not in ("clusters", "regions"):
            raise ValueError(f"coupled_split must be 'clusters' or 'regions', got {coupled_split!r}")
        mesh = Mesh(np.array(jax.devices()[: fed.devices]), ("split",))
        cells = P(None, None, "split") if coupled_split == "clusters" else P("split")  # leaves (nodes, 1, envs, ...)
        place = lambda tree: jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, cells)), tree)  # noqa: E731
    else:
        place = lambda tree: tree  # noqa: E731

    def coupled_local_phase(nodes: ppo.TrainState, hp, params):
        """K local updates of every node in envs that step together: each tick every node
        acts on its own observations with its own policy, the coupled grid steps once, and
        each node records and learns from its own row of the grid (its own observations,
        rewards, costs): nothing of another node's trajectory reaches its learner."""
        effective = jax.vmap(learner.env_params, in_axes=(0, None))(params, hp)  # (nodes, 1, ...)
        row = lambda tree: jax.tree.map(lambda x: x[:, 0], tree)  # (nodes, 1, ...) -> (nodes, ...)  # noqa: E731
        unrow = lambda tree: jax.tree.map(lambda x: x[:, None], tree)  # noqa: E731
        num_envs = nodes.obs.shape[2]

        def env_step(nodes, carry):
            """One tick of every node with the nodes' current policies (`nodes`: the state
            the local updates' scan carries, so each rollout acts with the latest update)."""
            env_state, obs, keys = carry
            env_state, obs = place((env_state, obs))
            keys, k_act, k_env = jnp.moveaxis(jax.vmap(lambda k: jax.random.split(k, 3))(keys), 1, 0)
            action, acted = jax.vmap(learner.act)(nodes, obs, effective, k_act)
            env_keys = jax.vmap(lambda k: jax.random.split(k, num_envs))(k_env)
            stepped = unrow(coupled.step(env_keys, row(env_state), action[:, 0], row(effective)))
            tr, step_metrics = jax.vmap(learner.record)(nodes, acted, action, stepped, effective)
            return (stepped[1], stepped[0], keys), (tr, obs, step_metrics)

        def one(carry, _):
            nodes, stats = carry
            (env_state, obs, keys), collected = jax.lax.scan(lambda c, _: env_step(nodes, c), (nodes.env_state, nodes.obs, nodes.key),
                                                             None, learner.config.rollout_steps)
            nodes = nodes.replace(env_state=env_state, obs=obs, key=keys)
            collected = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), collected)  # (steps, nodes, ...) -> (nodes, steps, ...)
            nodes, metrics, batch_stats = jax.vmap(learner.learn, in_axes=(0, 0, None))(nodes, collected, hp)
            return (nodes, jax.vmap(RunningStats.merge)(stats, batch_stats)), metrics

        empty = jax.tree.map(jnp.zeros_like, nodes.obs_stats)
        (nodes, stats), metrics = jax.lax.scan(one, (nodes, empty), None, k_local)
        return nodes, jax.tree.map(lambda m: m.mean(0), metrics), stats

    if coupled is None:
        mapped_local = node_map(local_phase, fed.devices)
    else:
        mapped_local = coupled_local_phase
    personal = fed.mode == "federated" and fed.personal_mix < 1.0

    def init(key, hp) -> FedState:
        k_nodes, k_global, key = jax.random.split(key, 3)
        keys = jax.random.split(k_nodes, n_nodes)
        nodes = jax.vmap(lambda k, p: learner.init(k, hp, p))(keys, per_node_params)
        global_params = learner.init(k_global, hp, one_node).params
        if coupled is not None:  # one joint reset of the coupled grid, each node its row
            num_envs = nodes.obs.shape[2]
            k_grid = jax.random.fold_in(k_nodes, 1)
            effective = jax.vmap(learner.env_params, in_axes=(0, None))(per_node_params, hp)
            obs, env_state = coupled.reset(jax.random.split(k_grid, n_nodes * num_envs).reshape(n_nodes, num_envs, -1),
                                           jax.tree.map(lambda x: x[:, 0], effective))
            nodes = nodes.replace(env_state=jax.tree.map(lambda x: x[:, None], env_state), obs=obs[:, None])
        nodes = nodes.replace(params=jax.tree.map(lambda g, x: jnp.broadcast_to(g, x.shape), global_params, nodes.params))
        flat, _ = ravel_pytree(global_params)
        return FedState(
            nodes=nodes,
            global_params=global_params,
            global_stats=jax.tree.map(lambda x: x[0], nodes.obs_stats),
            server_velocity=jnp.zeros_like(flat),
            previous_deltas=jnp.zeros((n_nodes, flat.shape[0]), flat.dtype),
            key=key,
            round=jnp.zeros((), jnp.int32),
            threat=Threat(
                attack=jnp.zeros((), jnp.int32),
                strength=jnp.asarray(fed.attack_strength, jnp.float32),
                byzantine=jnp.isin(jnp.arange(n_nodes), jnp.asarray(fed.byzantine_nodes, jnp.int32)),
                defence=jnp.zeros((), jnp.int32),
            ),
            global_average=global_params if fed.global_ema > 0 else None,
        )

    def round_step(state: FedState, hp):
        key, k_attack, k_noise, k_agg = jax.random.split(state.key, 4)
        broadcast = lambda tree: jax.tree.map(lambda g: jnp.broadcast_to(g, (n_nodes,) + g.shape), tree)  # noqa: E731
        nodes = state.nodes
        flat_global, unravel = ravel_pytree(state.global_params)
        flat_of = jax.vmap(lambda p: ravel_pytree(p)[0])
        if fed.mode != "local":  # local-only nodes keep their own parameters and normaliser
            if not personal:  # personal policies keep their own normaliser, like local-only ones
                nodes = nodes.replace(params=broadcast(state.global_params), obs_stats=broadcast(state.global_stats))
        flat_start = flat_of(nodes.params)
        nodes, metrics, rollout_stats = mapped_local(nodes, hp, per_node_params)

        flat_nodes = flat_of(nodes.params)
        deltas = flat_nodes - flat_start
        beta = fed.worker_momentum
        if personal and fed.personal_sends == "offset":
            messages = flat_nodes - flat_global
        else:
            messages = beta * state.previous_deltas + (1.0 - beta) * deltas if beta > 0 else deltas

        # Each region has its own constraints: their costs and multipliers are also kept
        # per region, since a mean over regions hides the regions that violate theirs.
        by_region = {f"{k}_by_region": v for k, v in metrics.items() if re.fullmatch(r"(cost|multiplier)_\d+", k)}
        metrics = {**{k: v.mean() for k, v in metrics.items()}, **by_region}
        threat = state.threat
        if fed.mode == "local":  # nothing is shared: the global state stays as it is
            new_global, velocity, new_stats = state.global_params, state.server_velocity, state.global_stats
        else:
            active = threat.byzantine & (state.round >= fed.attack_start_round)
            sent, means, variances = jax.lax.switch(
                threat.attack, attack_branches, messages, rollout_stats, active, k_attack, threat.strength, state.previous_deltas
            )
            if fed.mode == "federated" and fed.dp_mechanism == "central" and fed.dp_clip_norm > 0:
                # DP-FedAvg: Poisson-sampled regions, clipped sum, noise once, fixed denominator.
                k_stats_noise, k_sample = jax.random.fold_in(k_noise, 1), jax.random.fold_in(k_noise, 2)
                participate = privacy.poisson_participation(k_sample, n_nodes, fed.dp_node_sampling)
                expected = fed.dp_node_sampling * n_nodes
                aggregate, num_invalid = privacy.central_mean(sent, participate, k_noise, fed.dp_noise_multiplier, fed.dp_clip_norm, expected)
                stats_mean, stats_var = privacy.central_statistics(
                    means, variances, participate, k_stats_noise, fed.dp_noise_multiplier, fed.dp_stats_clip_norm, expected
                )
                skipped = stats_skipped = jnp.zeros((), bool)
                metrics["participants"] = participate.sum().astype(jnp.float32)
            elif fed.dp_clip_norm > 0:
                k_stats_noise = jax.random.fold_in(k_noise, 1)
                sent = privacy.clip_updates(sent, fed.dp_clip_norm)
                if fed.dp_noise_multiplier > 0:
                    sent = privacy.add_noise(sent, k_noise, fed.dp_noise_multiplier, fed.dp_clip_norm)
                means, variances = privacy.privatise_statistics(
                    means, variances, k_stats_noise, fed.dp_noise_multiplier, fed.dp_stats_clip_norm
                )
            if not (fed.dp_mechanism == "central" and fed.dp_clip_norm > 0):
                aggregate, num_invalid, skipped, stats_mean, stats_var, stats_skipped = jax.lax.switch(
                    threat.defence, defence_branches, sent, means, variances, k_agg
                )
            metrics["num_invalid"] = num_invalid.astype(jnp.float32)
            metrics["skipped"] = skipped.astype(jnp.float32)
            metrics["stats_skipped"] = stats_skipped.astype(jnp.float32)
            velocity = fed.server_momentum * state.server_velocity + aggregate
            flat_new_global = flat_global + fed.server_lr * velocity
            new_global = unravel(flat_new_global)
            if personal:
                pull = fed.personal_mix
                if fed.personal_mix_anneal and learner.config.anneal_lr:  # the lr's share left after this round's updates
                    updates_done = (state.round + 1) * fed.local_updates
                    pull = pull * (1.0 - jnp.minimum(updates_done, learner.config.total_updates) / learner.config.total_updates)
                pulled = pulled_mask(state.global_params, fed.personal_own)
                mixed = flat_nodes + pull * pulled * (flat_new_global - flat_nodes)
                nodes = nodes.replace(params=jax.vmap(unravel)(mixed))
            # Every node reports the same count (K rollouts of a static size); the server
            # does not trust the numbers: the round counts n_nodes x the median report.
            round_count = n_nodes * jnp.median(rollout_stats.count)
            merged = state.global_stats.merge(RunningStats(stats_mean, stats_var, round_count))
            keep = skipped | stats_skipped
            new_stats = jax.tree.map(lambda old, new: jnp.where(keep, old, new), state.global_stats, merged)
            if not personal:
                nodes = nodes.replace(obs_stats=broadcast(new_stats))

        new_state = FedState(
            nodes=nodes,
            global_params=new_global,
            global_stats=new_stats,
            server_velocity=velocity,
            previous_deltas=messages,
            key=key,
            round=state.round + 1,
            threat=threat,
            global_average=None if state.global_average is None else jax.tree.map(
                lambda avg, new: fed.global_ema * avg + (1.0 - fed.global_ema) * new, state.global_average, new_global),
        )
        metrics["delta_norm"] = jnp.linalg.norm(deltas, axis=1).mean()
        return new_state, metrics

    def train_chunk(state: FedState, hp, num_rounds: int):
        return jax.lax.scan(lambda s, _: round_step(s, hp), state, None, num_rounds)

    return init, train_chunk, learner


def pulled_mask(params, own: tuple[str, ...]) -> jax.Array:
    """Per flat parameter (ravel_pytree order): 1 where the personal pull moves it, 0 in
    the networks or layers a region keeps its own (layers named NETWORK_i / NETWORK_out)."""
    def one(path, x):
        layer = str(path[-2].key)
        return jnp.full(x.shape, layer not in own and layer.rsplit("_", 1)[0] not in own, x.dtype)

    return ravel_pytree(jax.tree_util.tree_map_with_path(one, params))[0]


def privacy_spent(fed: FederatedConfig, rounds: int, sampling_rate: float | None = None, accountant: str = "rdp") -> float:
    """Region-level epsilon (at fed.dp_delta) after `rounds` rounds of `fed`'s round: each
    round releases the region's update and its observation statistics, both with noise
    multiplier fed.dp_noise_multiplier (privacy.combined_noise_multiplier), the round
    Poisson-sampled at `sampling_rate` (default: fed.dp_node_sampling under the central
    mechanism, 1 under local noise). inf without noise; 0 after no rounds."""
    if fed.dp_noise_multiplier <= 0 or fed.dp_clip_norm <= 0:
        return 0.0 if rounds == 0 else float("inf")
    if sampling_rate is None:
        sampling_rate = fed.dp_node_sampling if fed.dp_mechanism == "central" else 1.0
    sigma = privacy.combined_noise_multiplier(fed.dp_noise_multiplier, fed.dp_noise_multiplier)
    return privacy.epsilon(sigma, sampling_rate, rounds, fed.dp_delta, accountant=accountant)
