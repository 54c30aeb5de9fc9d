"""The contract between the simulator and the deployment side, importable without JAX.

What a serving node's policy sees and does: the observation fields (in order, natural
units), the action names and sets, the feasibility mask, and the observation
normaliser's format. The simulator (`aro_jax.envs`) computes these with `jax.numpy`, the
numpy-only export loader (`aro_jax.deploy.export`) with numpy: both call the functions
here with their own array module `xp`, so the two sides cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

ENV_VERSION = "aro-serving-v3"  # v2: the node descriptor follows the live fields; v3: the mask knows the pods' CPU and memory share

PAPER_ACTIONS = ("IncreaseCPU", "IncreaseGPU", "IncreaseMemory", "RebalanceWorkload", "MaintainCurrent")
EXTENDED_ACTIONS = PAPER_ACTIONS + (
    "DecreaseCPU",
    "DecreaseGPU",
    "DecreaseMemory",
    "PullBackWorkload",
    "DegradeQuality",  # route a larger share of requests to the small model
    "RestoreQuality",
)
ACTION_SETS = {"paper": PAPER_ACTIONS, "extended": EXTENDED_ACTIONS}
(INC_CPU, INC_GPU, INC_MEM, REBALANCE, MAINTAIN, DEC_CPU, DEC_GPU, DEC_MEM, PULL_BACK, DEGRADE, RESTORE) = range(11)
FALLBACK_ACTION = "MaintainCurrent"  # what a deployed policy does when it cannot decide

# Raw observation fields, in order and natural units; a node's observation scale divides
# them into O(1) values before the policy's normaliser.
OBS_FIELDS = (
    "request_rate_rps",
    "latency_e2e_mean_s",
    "cpu_util",
    "gpu_util",
    "memory_util",
    "queue_requests",
    "replicas_ready",
    "replicas_pending",
    "cpu_cores",
    "host_memory_gb",
    "forward_fraction",
    "small_model_fraction",
    "capacity_rps",
    "time_of_day_sin",
    "time_of_day_cos",
    "day_of_week_sin",
    "day_of_week_cos",
    "forecast_rate_rps",
    "drop_fraction",
    "slo_attainment",
)
FIELD_INDEX = {name: i for i, name in enumerate(OBS_FIELDS)}

# What a node is, in natural units: static facts of its deployment (model, parallelism,
# GPU, engine cache, SLO, load scale, replica limit) appended to the live fields, so one
# shared policy can condition on the region it runs in (regions differ in all of them:
# 7B and 70B, TP 1-8, H100 and A100, chat and code SLOs). The live fields are divided by
# the node's scale and so hide its size; these say it. Each maps to an O(1) feature by
# log2(value / reference) (the reference: None keeps the value as it is).
DESCRIPTOR_FIELDS = (
    ("model_weights_gb", 16.0),
    ("tensor_parallel", 1.0),
    ("gpu_usd_per_h", 2.0),
    ("kv_capacity_tokens", 2.0**17),
    ("slo_ttft_s", 1.0),
    ("slo_target", None),
    ("reference_rate_rps", 16.0),  # the planned mean load the rates are scaled by
    ("max_replicas", 16.0),
)
DESCRIPTOR_NAMES = tuple(name for name, _ in DESCRIPTOR_FIELDS)
# The policy's input: the scaled live fields, then the descriptor's features.
POLICY_INPUT_DIM = len(OBS_FIELDS) + len(DESCRIPTOR_FIELDS)


def descriptor_features(values, xp=np):
    """Natural-unit descriptor values (..., len(DESCRIPTOR_FIELDS)) -> O(1) features."""
    cols = [values[..., i] if ref is None else xp.log2(xp.maximum(values[..., i], 1e-9) / ref)
            for i, (_, ref) in enumerate(DESCRIPTOR_FIELDS)]
    return xp.stack(cols, axis=-1)

# The node limits the feasibility mask reads (EnvParams fields of the same names).
MASK_LIMITS = (
    "max_cpu_cores", "max_replicas", "max_host_memory_gb", "max_forward_fraction",
    "cpu_step_cores", "min_replicas", "memory_step_gb", "max_small_model_fraction",
    "tensor_parallel", "vcpus_per_gpu", "host_memory_gb_per_gpu",
)
# A replica's idle CPU demand (fluid.cpu_cores_per_replica): DecreaseCPU never takes the
# allocation below it, so at or under it the move changes nothing.
IDLE_CORES_PER_REPLICA = 1.0
# Relative slack for "below a cap": the learner's raw observations come back through a
# divide and multiply by the observation scale (float32, ~1e-7 relative error).
_CAP_SLACK = 1e-5

# Observation normaliser: obs = clip((scaled - mean) / sqrt(var + eps), -clip, clip).
NORMALIZE_EPS = 1e-8
NORMALIZE_CLIP = 10.0


def _limit(limits: Mapping[str, Any] | Any, name: str):
    return limits[name] if isinstance(limits, Mapping) else getattr(limits, name)


def feasible_actions(raw_obs, limits, xp=np):
    """Which of the 11 extended actions can change anything, from a raw observation
    (shape (..., len(OBS_FIELDS))) and a node's limits (a mapping or an object with the
    MASK_LIMITS attributes, e.g. EnvParams). Returns bool (..., 11); MaintainCurrent is
    always feasible. `xp` is numpy or jax.numpy."""
    f = lambda name: raw_obs[..., FIELD_INDEX[name]]  # noqa: E731
    lim = lambda name: _limit(limits, name)  # noqa: E731
    total = f("replicas_ready") + f("replicas_pending")
    true = xp.ones_like(total, dtype=bool)
    # Pods hold their CPU and memory within their GPU instances' share (serving.py, step
    # 1): past that share an increase is clipped back and changes nothing.
    pod_gpus = total * lim("tensor_parallel")
    cpu_cap = xp.minimum(lim("max_cpu_cores"), xp.maximum(pod_gpus * lim("vcpus_per_gpu"), lim("cpu_step_cores")))
    memory_cap = xp.minimum(lim("max_host_memory_gb"), xp.maximum(pod_gpus * lim("host_memory_gb_per_gpu"), lim("memory_step_gb")))
    return xp.stack([
        f("cpu_cores") < cpu_cap * (1 - _CAP_SLACK),
        total < lim("max_replicas"),
        f("host_memory_gb") < memory_cap * (1 - _CAP_SLACK),
        f("forward_fraction") < lim("max_forward_fraction"),
        true,
        f("cpu_cores") > xp.maximum(lim("cpu_step_cores"), f("replicas_ready") * IDLE_CORES_PER_REPLICA),
        f("replicas_ready") > lim("min_replicas"),
        f("host_memory_gb") > lim("memory_step_gb"),
        f("forward_fraction") > 0,
        f("small_model_fraction") < lim("max_small_model_fraction"),
        f("small_model_fraction") > 0,
    ], axis=-1)


def normalize(obs, mean, var, xp=np):
    """The learner's observation normaliser, in the exported format: the leading len(mean)
    dims of `obs` normalised, any trailing ones (the node descriptor's features, O(1) and
    constant per node) passed through."""
    d = mean.shape[-1]
    scaled = xp.clip((obs[..., :d] - mean) / xp.sqrt(var + NORMALIZE_EPS), -NORMALIZE_CLIP, NORMALIZE_CLIP)
    return scaled if obs.shape[-1] == d else xp.concatenate([scaled, obs[..., d:]], axis=-1)
