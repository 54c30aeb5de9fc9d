"""ServingCluster: the regions of one cluster coupled by rebalancing, as a gymnax 1.x env.

The state is the regions' `EnvState`s stacked on a leading region axis plus the forwarded
requests still on the wire. Every tick each region acts (one action per region); the
requests a region forwards (RebalanceWorkload) are routed to peers that serve the same
model, nearest by round-trip time first, within the spare capacity those peers
advertised at the end of the previous tick. They join the peer's queue, are served at
the peer's load-dependent speed and judged there on TTFT (plus the round trip) and TPOT;
the sender pays the egress and the peer's price per request. Requests are conserved
across the cluster every tick:

    sum(arrivals) = sum(served + served_for_peers + dropped + rejected)
                    + sum(queue' - queue) + (in_flight' - in_flight)

A region observes its own `ServingNode-v0` observation (contract.OBS_FIELDS, then its
node descriptor's features) plus one field, the spare capacity its compatible peers
advertise (CLUSTER_OBS_FIELDS): no peer's raw traffic. The region axis stays inside one
device; batches of clusters vmap and shard over devices (regions interact every tick, so
splitting them across devices would need an exchange per tick).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from gymnax.environments import environment, spaces

from aro_jax.contract import ACTION_SETS, DESCRIPTOR_NAMES, OBS_FIELDS, POLICY_INPUT_DIM
from aro_jax.envs import fluid, hardware, scenarios, serving
from aro_jax.envs.autoreset import StateObservedEnv, batched_step
from aro_jax.envs.scenarios import rtt_matrix_s, site_of
from aro_jax.envs.params import EnvParams
from aro_jax.envs.serving import EnvState

CLUSTER_OBS_FIELDS = OBS_FIELDS + DESCRIPTOR_NAMES + ("peer_spare_rps",)

# Peers advertise spare capacity up to this utilisation of their own capacity (the
# single-region env's modelled peer lends up to the same).
SPARE_TARGET_UTIL = fluid.PEER_SPARE_UTIL
DEFAULT_CLUSTER_FILE = Path(__file__).resolve().parents[1] / "configs" / "cluster10.yaml"


@struct.dataclass
class ClusterParams(environment.EnvParams):
    """A cluster: stacked per-region EnvParams (leading region axis) and the links."""

    nodes: EnvParams = None
    rtt_s: jax.Array = None  # (R, R) round trips
    # (R-1, R, R): rank[k, i, j] = 1 where j is i's k-th nearest peer serving the same
    # model (rows run out where a region has fewer such peers).
    rank: jax.Array = None
    compatible: jax.Array = None  # (R, R) 1 where j may serve i's requests
    forwarding: float = 1.0  # 0: forwarded requests stay local (routing off)
    max_steps_in_episode: int = 2880


@struct.dataclass
class ClusterState(environment.EnvState):
    time: int
    nodes: EnvState  # stacked, leading region axis
    in_flight: jax.Array  # (R,) forwarded requests reaching each region next tick
    spare_rps: jax.Array  # (R,) spare capacity each region advertises


def make_cluster_params(nodes: EnvParams, names, models, rtt_s=None, forwarding: bool = True) -> ClusterParams:
    """ClusterParams from stacked node params, the regions' names (their sites) and the
    model each serves (only a peer serving the same model can take a request: a 70B
    request answered by a 7B deployment is the quality tier's lever, priced as such)."""
    names, models = list(names), list(models)
    r = len(names)
    tz = np.asarray(nodes.traffic.tz_offset_h, np.float64).reshape(-1)
    if rtt_s is None:
        rtt_s = rtt_matrix_s([site_of(n, float(tz[i])) for i, n in enumerate(names)])
    rtt_s = np.asarray(rtt_s, np.float64)
    tick = float(np.max(np.asarray(nodes.tick_s)))
    if r > 1 and np.max(rtt_s) / 2 >= tick:
        raise ValueError(f"one-way delays must be shorter than a tick ({tick} s); got max RTT {np.max(rtt_s)} s")
    compatible = np.array([[float(i != j and models[i] == models[j]) for j in range(r)] for i in range(r)])
    rank = np.zeros((max(r - 1, 0), r, r))
    for i in range(r):
        peers = sorted((j for j in range(r) if compatible[i, j] > 0), key=lambda j: (rtt_s[i, j], j))
        for k, j in enumerate(peers):
            rank[k, i, j] = 1.0
    steps = int(np.max(np.asarray(nodes.max_steps_in_episode)))
    return ClusterParams(
        nodes=nodes, rtt_s=jnp.asarray(rtt_s, jnp.float32), rank=jnp.asarray(rank, jnp.float32),
        compatible=jnp.asarray(compatible, jnp.float32), forwarding=float(forwarding), max_steps_in_episode=steps,
    )


def cluster_links(cfg, nodes: EnvParams, forwarding: bool = True) -> ClusterParams:
    """ClusterParams joining stacked node params of `cfg`'s regions (any scenario's, or
    replayed traces) by the regions' sites and models."""
    names = [n.name for n in cfg.cluster.nodes]
    models = [hardware.get_profile(n.profile).model for n in cfg.cluster.nodes]
    return make_cluster_params(nodes, names, models, forwarding=forwarding)


def file_cluster_params(path, episode_ticks: int = 2880, tick_s: float = 30.0, forwarding: bool = True) -> ClusterParams:
    """ClusterParams of a cluster YAML file's `cluster.nodes` (default reward weights)."""
    import yaml

    nodes = yaml.safe_load(Path(path).read_text())["cluster"]["nodes"]
    return specs_cluster_params([scenarios.NodeSpec(**n) for n in nodes], episode_ticks, tick_s, forwarding)


def specs_cluster_params(specs, episode_ticks: int = 2880, tick_s: float = 30.0, forwarding: bool = True, **kw) -> ClusterParams:
    """ClusterParams from scenarios.NodeSpecs (tests, benchmarks)."""
    nodes = scenarios.stack_params([scenarios.node_params(s, episode_ticks, tick_s) for s in specs])
    models = [hardware.get_profile(s.profile).model for s in specs]
    return make_cluster_params(nodes, [s.name for s in specs], models, forwarding=forwarding, **kw)


def route(want, spare, rank):
    """Flows (R, R) of forwarded requests: each sender asks its nearest compatible peer
    first, then the next, for what is still unplaced; a peer asked for more than its
    spare grants every sender the same share. Nearest first because a request's TTFT
    carries the round trip and the egress price is the same across a continent, so the
    closest peer with room is the cheapest place to meet the SLO (Llumnix and SkyServe
    route by the same preference); what no peer has room for stays local."""
    r = want.shape[0]
    flows = jnp.zeros((r, r))
    left, room = want, spare
    for k in range(rank.shape[0]):  # R - 1 rounds, unrolled (R is static)
        ask = left[:, None] * rank[k]
        asked = ask.sum(0)
        # The granted share is clipped to [0, 1] and what is left floored at 0: a peer's
        # room that rounding left a hair below 0 must not turn a later ask into a negative
        # flow (sent back and counted as work by both ends).
        grant = ask * jnp.clip(room / jnp.maximum(asked, 1e-9), 0.0, 1.0)[None, :]
        flows = flows + grant
        left = jnp.maximum(left - grant.sum(1), 0.0)
        room = jnp.maximum(room - grant.sum(0), 0.0)
    return flows


def _spare_rps(capacity_rps, load_rps):
    return jnp.maximum(SPARE_TARGET_UTIL * capacity_rps - load_rps, 0.0)


class ServingCluster(StateObservedEnv):
    """All regions of one cluster. Actions: (R,) ints, one per region; observations
    (R, len(CLUSTER_OBS_FIELDS)); rewards (R,), each region's own reward."""

    def __init__(self, action_set: str = "extended", num_regions: int | None = None):
        super().__init__()
        if action_set not in ACTION_SETS:
            raise ValueError(f"action_set must be one of {sorted(ACTION_SETS)}, got {action_set!r}")
        self.node = serving.ServingNodeEnv(action_set)
        self.action_set = action_set
        self.action_names = ACTION_SETS[action_set]
        self.num_regions = num_regions

    @property
    def name(self) -> str:
        return "ServingCluster-v0"

    @property
    def num_actions(self) -> int:
        return len(self.action_names)

    @property
    def default_params(self) -> ClusterParams:
        return file_cluster_params(DEFAULT_CLUSTER_FILE)

    def action_space(self, params: ClusterParams | None = None) -> spaces.Discrete:
        return spaces.Discrete(self.num_actions)  # per region

    def observation_space(self, params: ClusterParams) -> spaces.Box:
        r = params.rtt_s.shape[0]
        return spaces.Box(-jnp.inf, jnp.inf, (r, len(CLUSTER_OBS_FIELDS)), jnp.float32)

    # ---- reset ------------------------------------------------------------------------

    def reset_state(self, key, params: ClusterParams) -> ClusterState:
        r = params.rtt_s.shape[0]
        k_clock, k_nodes = jax.random.split(key)
        # One UTC clock for the whole cluster (the regions' time zones are offsets of it).
        nodes = params.nodes
        tick = nodes.tick_s[0]
        random_start = jnp.floor(jax.random.uniform(k_clock, (), maxval=7 * 86_400.0) / tick) * tick
        clock = jnp.where(nodes.random_start[0] > 0.5, random_start, nodes.start_time_s[0])
        nodes = nodes.replace(random_start=jnp.zeros((r,)), start_time_s=jnp.full((r,), clock))
        state = self.reset_regions_state(jax.random.split(k_nodes, r), params.replace(nodes=nodes))
        # A cluster-wide surge (surge_shared_prob of the episodes): one draw, from the
        # cluster's own stream, replaces every region's (the first region's episode length).
        k_on, k_surge = jax.random.split(jax.random.fold_in(k_clock, 1))
        first = jax.tree.map(lambda x: x[0], nodes)
        shared = serving.draw_surge(k_surge, clock, first.replace(surge_prob=1.0))
        on = jax.random.uniform(k_on) < first.surge_shared_prob
        surge = jnp.where(on, jnp.broadcast_to(shared, state.nodes.surge.shape), state.nodes.surge)
        return state.replace(nodes=state.nodes.replace(surge=surge))

    def reset_regions_state(self, keys, params: ClusterParams) -> ClusterState:
        """Reset each region with its own key (regions' own start times)."""
        states = jax.vmap(self.node.reset_state)(keys, params.nodes)
        last = states.last
        return ClusterState(
            time=0, nodes=states, in_flight=jnp.zeros_like(states.queue_requests),
            spare_rps=_spare_rps(last["capacity_rps"], last["arrivals"] / params.nodes.tick_s),
        )

    def reset_regions(self, keys, params: ClusterParams):
        """(observation, state) of `reset_regions_state`."""
        state = self.reset_regions_state(keys, params)
        return self.get_obs(state, params), state

    # ---- step -------------------------------------------------------------------------

    def advance(self, key, state: ClusterState, action, params: ClusterParams):
        state, metrics, reward = self.transition(jax.random.split(key, params.rtt_s.shape[0]), state, action, params)
        return state, reward, {"metrics": metrics}

    def transition(self, keys, state: ClusterState, action, params: ClusterParams):
        """(state, metrics (R,) each, rewards (R,)) after one tick; `keys`: one per region."""
        nodes = params.nodes
        tick = nodes.tick_s
        plans = jax.vmap(serving.begin_tick)(keys, state.nodes, jnp.asarray(action, jnp.int32), nodes)
        # 1. Route what each region forwards within the spare its peers advertised.
        want = plans["fwd"] * plans["admitted"] * params.forwarding
        flows = route(want, state.spare_rps * tick, params.rank)
        forwarded = flows.sum(1)
        # A request forwarded at a uniform time within the tick travels one way in RTT/2:
        # the share RTT/(2 tick) of a tick's flow lands after the tick ends and joins the
        # peer's next tick (in flight); the rest joins the peer's queue this tick.
        late = flows * (params.rtt_s / (2.0 * tick[:, None]))
        received = (flows - late).sum(0) + state.in_flight
        in_flight = late.sum(0)
        rtt_in = jnp.sum(flows * params.rtt_s, 0) / jnp.maximum(flows.sum(0), 1e-9)
        # 2. Every region serves its kept arrivals and its peers' requests at its own load.
        core, queue = jax.vmap(serving.serve_planned)(plans, state.nodes, nodes, forwarded, received, rtt_in)
        # The sender pays each peer's price at dispatch; the peer is credited the same.
        price = core["peer_usd_per_request"]
        core = {**core, "peer_credit_usd": (flows * price[None, :]).sum(0)}
        # 3. The forwarded requests' outcome, per sender: the flow-weighted mean over the
        # peers that served them, their round trip added to TTFT and end-to-end latency.
        w = flows / jnp.maximum(forwarded[:, None], 1e-9)
        peer = {
            "ttft_s": (w * (core["peer_ttft_s"][None, :] + params.rtt_s)).sum(1),
            "e2e_s": (w * (core["peer_e2e_s"][None, :] + params.rtt_s)).sum(1),
            "ok": (w * core["peer_ok"][None, :]).sum(1),
            "usd_per_request": (w * price[None, :]).sum(1),
            "quality": (w * core["peer_quality"][None, :]).sum(1),
        }
        node_states, metrics, reward = jax.vmap(serving.end_tick)(state.nodes, plans, core, queue, forwarded, peer, nodes)
        load = (metrics["served"] + metrics["served_for_peers"] + queue) / tick
        new_state = ClusterState(
            time=state.time + 1, nodes=node_states, in_flight=in_flight,
            spare_rps=_spare_rps(metrics["capacity_rps"], load),
        )
        metrics = {**metrics, "in_flight": in_flight}
        return new_state, metrics, reward

    # ---- observation ------------------------------------------------------------------

    def get_obs(self, state: ClusterState, params: ClusterParams, key=None) -> jax.Array:
        return self._with_spare(jax.vmap(self.node.get_obs)(state.nodes, params.nodes), state, params)

    def _with_spare(self, node_obs, state: ClusterState, params: ClusterParams) -> jax.Array:
        advertised = params.compatible @ state.spare_rps
        return jnp.concatenate([node_obs, (advertised / params.nodes.rate_ref_rps)[:, None]], axis=1).astype(jnp.float32)

    def is_terminated(self, state: ClusterState, params: ClusterParams) -> jax.Array:
        return jnp.array(False)

    def action_mask(self, state: ClusterState, params: ClusterParams) -> jax.Array:
        """(R, num_actions) feasible actions of each region."""
        return jax.vmap(self.node.action_mask)(state.nodes, params.nodes)

    def action_mask_from_obs(self, obs: jax.Array, params: ClusterParams) -> jax.Array:
        return jax.vmap(self.node.action_mask_from_obs)(obs[..., :POLICY_INPUT_DIM], params.nodes)


def _swap(x):
    return jnp.swapaxes(x, 0, 1)


def _swap_regions(state: ClusterState) -> ClusterState:
    """The two leading axes of every per-region leaf swapped (the clock is the caller's)."""
    return state.replace(nodes=jax.tree.map(_swap, state.nodes), in_flight=_swap(state.in_flight), spare_rps=_swap(state.spare_rps))


class RegionGrid:
    """A batch of clusters seen the way a learner steps its envs: a (regions, clusters) grid
    (ppo.EnvGrid). States and observations carry the region axis first, then the clusters
    (the stacked ClusterStates with their two leading axes swapped and the clock broadcast
    over regions), so a region's slice of the grid is its own envs; the cells of one cluster
    step together. A region's observation is its ServingNode-v0 observation (OBS_FIELDS and
    its descriptor, the deployment contract an exported policy is served with): the spare
    capacity its peers advertise decides, inside the env, how much of what it forwards
    they take.

    `links`: the cluster's ClusterParams; its node params are replaced by those the learner
    passes (the same regions, with e.g. the run's reward weights)."""

    def __init__(self, env: ServingCluster, links: ClusterParams):
        self.links = links
        self._reset = jax.vmap(env.reset, in_axes=(0, None))
        self._step = batched_step(env, lambda f: jax.vmap(f, in_axes=(0, 0, 0, None)))

    @staticmethod
    def to_grid(state: ClusterState, regions: int):
        """(clusters, regions, ...) ClusterStates -> the grid layout."""
        return _swap_regions(state).replace(time=jnp.broadcast_to(state.time, (regions,) + state.time.shape))

    @staticmethod
    def from_grid(state: ClusterState) -> ClusterState:
        return _swap_regions(state).replace(time=state.time[0])

    def reset(self, keys, node_params: EnvParams):
        obs, state = self._reset(keys[0], self.links.replace(nodes=node_params))
        return self._node_obs(obs), self.to_grid(state, keys.shape[0])

    def step(self, keys, state: ClusterState, action, node_params: EnvParams):
        regions = keys.shape[0]
        obs, state, reward, terminated, truncated, info = self._step(keys[0], self.from_grid(state), _swap(action),
                                                                      self.links.replace(nodes=node_params))
        per_region = lambda x: jnp.broadcast_to(x, (regions,) + x.shape)  # noqa: E731
        info = {**info, "metrics": jax.tree.map(_swap, info["metrics"]), "terminated": per_region(info["terminated"]),
                "truncated": per_region(info["truncated"]), "final_observation": self._node_obs(info["final_observation"])}
        return (self._node_obs(obs), self.to_grid(state, regions), _swap(reward), per_region(terminated), per_region(truncated), info)

    @staticmethod
    def _node_obs(obs):  # (clusters, regions, CLUSTER_OBS_FIELDS) -> (regions, clusters, POLICY_INPUT_DIM)
        return _swap(obs[..., :POLICY_INPUT_DIM])


def conservation_gap(metrics: dict, queue_before, in_flight_before) -> jax.Array:
    """Cluster-wide request balance of one tick (zero up to rounding): arrivals minus
    everything they became (served, served for peers, dropped, rejected, queued, in flight)."""
    out = metrics["served"] + metrics["served_for_peers"] + metrics["dropped"] + metrics["rejected"]
    out = out.sum(-1) + (metrics["queue_requests"] - queue_before).sum(-1) + metrics["in_flight"].sum(-1) - in_flight_before.sum(-1)
    return metrics["arrivals"].sum(-1) - out


__all__ = ["ServingCluster", "RegionGrid", "ClusterParams", "ClusterState", "CLUSTER_OBS_FIELDS", "make_cluster_params",
           "cluster_links", "file_cluster_params", "specs_cluster_params", "route", "rtt_matrix_s", "conservation_gap"]
