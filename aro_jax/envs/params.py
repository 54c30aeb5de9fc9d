"""EnvParams: everything a serving scenario varies, as one vmappable pytree (with the
service-time curves of its models and its reward weights)."""

from __future__ import annotations

import dataclasses

import jax
from flax import struct
from gymnax.environments import environment

from aro_jax.envs.hardware import ServiceProfile
from aro_jax.envs.traffic import TrafficParams, token_stats


@struct.dataclass
class ServiceCurve:
    """Service-time model of one serving instance, in seconds (from a ServiceProfile)."""

    prefill_base_s: float
    prefill_s_per_token: float
    prefill_s_per_token_sq: float
    decode_base_s: float
    decode_s_per_context_token: float
    decode_s_per_seq: float
    kv_capacity_tokens: float
    max_batch_seqs: float  # the engine's max_num_seqs (the KV cap is applied per mix)
    instances_per_replica: float  # parallel copies one replica's GPUs hold (small model)
    quality: float
    token_budget: float  # chunked prefill: tokens per iteration (max_num_batched_tokens)
    decode_calibrated_seqs: float  # beyond this batch, roofline increments (hardware.py)
    roof_s_per_seq: float  # FLOPs floor of one decode token
    roof_s_per_context_token: float  # KV-read floor of one cached token

    @classmethod
    def from_profile(cls, profile: ServiceProfile, replica_gpus: int | None = None) -> "ServiceCurve":
        gpus = replica_gpus or profile.tensor_parallel
        return cls(
            prefill_base_s=profile.prefill_base_ms / 1e3,
            prefill_s_per_token=profile.prefill_ms_per_token / 1e3,
            prefill_s_per_token_sq=profile.prefill_ms_per_token_sq / 1e3,
            decode_base_s=profile.decode_base_ms / 1e3,
            decode_s_per_context_token=profile.decode_ms_per_context_token / 1e3,
            decode_s_per_seq=profile.decode_ms_per_seq / 1e3,
            kv_capacity_tokens=float(profile.kv_capacity_tokens),
            max_batch_seqs=float(profile.max_batch_seqs),
            instances_per_replica=float(max(gpus // profile.tensor_parallel, 1)),
            quality=float(profile.quality),
            token_budget=float(profile.token_budget),
            decode_calibrated_seqs=float(profile.decode_calibrated_seqs),
            roof_s_per_seq=profile.roof_ms_per_seq / 1e3,
            roof_s_per_context_token=profile.roof_ms_per_context_token / 1e3,
        )

    def prefill_s(self, tokens):
        return self.prefill_base_s + self.prefill_s_per_token * tokens + self.prefill_s_per_token_sq * tokens**2



@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RewardWeights:
    """The reward's weights (the paper's alpha, beta, gamma, plus two penalties): the one
    home of these values. A config's `env.reward` section, EnvParams.reward and the
    env part of a sweep's hyperparameters are all a RewardWeights (a pytree; a plain
    dataclass so that configs can override its fields)."""

    alpha: float = 1.0  # weight of the served share of demand
    beta: float = 0.5  # weight of (1 - normalised latency)
    cost_weight: float = 1.0  # the paper's gamma: weight of normalised cost
    slo_penalty: float = 3.0  # weight of the share of requests missing the SLO
    # Weight of quality lost by serving on the small model (without it, the small model
    # would be a free lunch).
    quality_penalty: float = 2.0


@struct.dataclass
class EnvParams(environment.EnvParams):
    """One node's scenario. Every field is a pytree leaf, so stacks of params vmap."""

    max_steps_in_episode: int = 2880  # one day of 30 s ticks
    tick_s: float = 30.0  # BLIS autoscaler decision interval
    traffic: TrafficParams = struct.field(default_factory=TrafficParams)
    model: ServiceCurve = None  # filled by scenarios.node_params
    small_model: ServiceCurve = None
    replica_price_usd_per_h: float = 0.0
    weights_gb: float = 0.0
    tensor_parallel: float = 1.0
    min_replicas: float = 1.0
    max_replicas: float = 16.0
    initial_replicas: float = 2.0
    cpu_step_cores: float = 8.0
    max_cpu_cores: float = 256.0
    initial_cpu_cores: float = 32.0
    memory_step_gb: float = 64.0
    max_host_memory_gb: float = 2048.0
    initial_host_memory_gb: float = 256.0
    # Cold start from remote storage, BLIS autoscaler config: N(240 s, 30 s).
    cold_start_mean_s: float = 240.0
    cold_start_sd_s: float = 30.0
    queue_timeout_s: float = 60.0
    max_queue_requests: float = 1e5
    peer_rtt_s: float = 0.05
    peer_spare_rps: float = 2.0
    # The single-region env's peer: a region serving the same model in its own time zone,
    # with its own mean load and the capacity of its static fleet (scenarios.node_params: a
    # twin of this region; scenarios.cluster_params: the nearest same-model region of the
    # cluster file). It lends at most peer_spare_rps and never past fluid.PEER_SPARE_UTIL
    # of that capacity, serves at its load-dependent speed, and is judged on TTFT and TPOT.
    peer_tz_offset_h: float = 0.0
    peer_mean_rate_rps: float = 0.0
    peer_capacity_rps: float = 0.0
    max_forward_fraction: float = 0.5
    forward_step: float = 0.1
    quality_step: float = 0.1
    max_small_model_fraction: float = 0.8
    # SLOs of the node's workload class for each model (DistServe, OSDI'24, Table 1; set
    # per node by scenarios.node_params). A prompt's TTFT budget is the larger of the SLO
    # and ttft_prefill_slack x its prefill time on an idle instance (fluid.ttft_budget_s).
    slo_ttft_s: float = 2.5
    slo_tpot_s: float = 0.15
    small_slo_ttft_s: float = 0.25
    small_slo_tpot_s: float = 0.1
    ttft_prefill_slack: float = 2.0
    # The operator's attainment target for this region (objective.slo_target, or its
    # workload's objective.slo_targets entry): the env ignores it; the constrained
    # learner's cost reads it (training.trainers.serving_costs).
    slo_target: float = 0.9
    # Quality tier on dedicated small-model GPUs (vLLM fixes an engine's KV memory at
    # start, so two engines sharing a GPU would need a static split and a restart of both
    # to change it; whole GPUs keep each engine's full memory): a change of the share
    # restarts the GPUs it moves, one cold start (the mean of BLIS's N(240 s, 30 s)), and
    # they serve nothing meanwhile.
    tier_switch_s: float = 240.0
    # Pod bounds per GPU from the replica's instance type (defaults: AWS p4de.24xlarge,
    # 96 vCPUs and 1152 GiB over 8 GPUs; hardware.INSTANCES), and what the pods' CPU and
    # memory requests cost on top of the GPUs: nothing under either price set, whose GPU
    # price covers the host's vCPUs and RAM (CoreWeave's billing docs: a GPU pod is billed
    # at the GPU price, which includes them; AWS bills the instance). A price here would
    # be right only where freed cores and memory are sold to other work.
    vcpus_per_gpu: float = 12.0
    host_memory_gb_per_gpu: float = 144.0
    cpu_usd_per_core_h: float = 0.0
    memory_usd_per_gb_h: float = 0.0
    reward: RewardWeights = dataclasses.field(default_factory=RewardWeights)
    cost_ref_usd_per_h: float = 1.0  # normalises cost: static allocation for peak load
    rate_ref_rps: float = 1.0  # normalises rates: the node's mean load
    outage_start_s: float = -1.0
    outage_duration_s: float = 0.0
    outage_capacity_loss: float = 0.0  # fraction of ready replicas lost during the outage
    start_time_s: float = 0.0
    random_start: float = 1.0  # 1: each episode starts at a random time of the week
    # Training surges (domain randomisation, Tobin et al. 2017): with this probability an
    # episode carries one flash crowd of a random size in [SURGE_MIN_MULTIPLIER,
    # surge_max_multiplier] x demand, lasting SURGE_DURATION_S, at a random time of the
    # episode (serving.draw_surge), so a policy meets its replica limit in training. The
    # scenarios evaluated (apply_scenario) carry none.
    surge_prob: float = 0.0
    surge_max_multiplier: float = 3.0
    # Cluster-wide surges (ServingCluster only): in this share of training episodes one
    # surge hits every region at once (the same start, length and multiplier), in place of
    # the regions' own draws, so forwarding to peers is no escape from a demand event that
    # loads them all (a launch, a news cycle: the held-out traces load every region at once).
    surge_shared_prob: float = 0.0
    # Training token lengths (domain randomisation): in this share of episodes the prompt
    # and answer lengths' log-means move by uniform offsets up to the gap between the chat
    # and code mixes (serving.draw_token_shift); the scenarios evaluated carry none.
    token_shift_prob: float = 0.0
    # Where the shifts' range is centred: this fraction of the way from the region's own
    # lengths to the other mix's (the other mix's log-means minus the region's, set by
    # scenarios.node_params); 0: on its own, so the other mix's lengths lie at the range's edge.
    token_shift_toward: float = 0.0
    # In this share of the episodes the shift sets in at a uniform random time of the
    # episode, not at its start (serving.draw_token_shift_onset): the work per request
    # changes under a running fleet sized for the old lengths, while the request rate stays.
    token_shift_onset_prob: float = 0.0
    other_mix_input_log_offset: float = 0.0
    other_mix_output_log_offset: float = 0.0
    # Training burstiness (domain randomisation): in this share of a chat region's episodes
    # the arrivals follow the code trace's burst process, and in smooth_shift_prob of a code
    # region's the conversation trace's (serving.with_burst_shift); the scenarios evaluated
    # carry none.
    burst_shift_prob: float = 0.0
    smooth_shift_prob: float = 0.0
    # Training starting fleets (domain randomisation): in this share of episodes the fleet
    # starts at a whole number of replicas drawn uniformly in [min_replicas, max_replicas],
    # with the CPU and memory that size it (serving.draw_start_fleet), instead of
    # initial_replicas; the scenarios evaluated carry none.
    random_fleet_prob: float = 0.0
    # Training demand phases (domain randomisation): in this share of episodes the demand
    # runs a uniform 0-24 h ahead of the daily shape the clock would predict
    # (serving.draw_demand_phase); the observed clock and the forecaster keep local time.
    # The scenarios evaluated carry none.
    demand_phase_prob: float = 0.0
    # Training demand levels (domain randomisation): each episode's demand is the region's
    # times a log-uniform factor in [1 / demand_scale_max, demand_scale_max]
    # (serving.draw_demand_scale), while its descriptor keeps the planned rate, so the
    # observed load, not the plan, says how much fleet it needs; 1: none. The scenarios
    # evaluated carry none.
    demand_scale_max: float = 1.0
    forecast_horizon_s: float = 300.0  # covers the cold start plus one tick



def e2e_budget(params: EnvParams):
    """End-to-end latency budget (s) the SLOs imply for a mean-length request: it
    normalises latency in the reward, the observation and the Reactive rule."""
    return params.slo_ttft_s + token_stats(params.traffic)["output_mean"] * params.slo_tpot_s
