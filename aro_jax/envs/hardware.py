"""Service-time profiles of LLM replicas (model x GPU x tensor parallelism).

Prefill of one request with L prompt tokens: base + per_token*L + per_token_sq*L^2 ms.
One decode iteration with B sequences holding C context tokens in total:
base + per_context_token*C + per_seq*B ms.

The coefficients are fitted by `fit_profiles` from the calibration data in
../shared/data/calibration (refit and compare: benchmarks/fit_hardware.py, results in
benchmarks/hardware_fit.md) and hard-coded here, rounded to 4 significant figures, so
the package runs without the data. The fits cover prompts up to 8192 tokens (the largest
measured; Llama 2's context window is 4096, Touvron et al. 2023) and batches up to 64
(70B) or 256 (7B); beyond that a decode step grows by the roofline increment of each
further sequence (`ServiceProfile.decode_step_ms`), never by more than the fit's.
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np


@dataclasses.dataclass(frozen=True)
class ServiceProfile:
    name: str
    model: str
    gpu: str
    tensor_parallel: int  # GPUs per replica
    prefill_base_ms: float
    prefill_ms_per_token: float
    prefill_ms_per_token_sq: float
    decode_base_ms: float
    decode_ms_per_context_token: float
    decode_ms_per_seq: float
    kv_bytes_per_token: float
    gpu_memory_gb: float  # per GPU
    weights_gb: float  # fp16 weights, whole model
    gpu_price_usd_per_h: float  # per GPU
    max_batch_seqs: int  # the engine's max_num_seqs
    quality: float  # relative answer quality, 1.0 = Llama-2-70B
    # Chunked prefill: tokens per engine iteration (vLLM's max_num_batched_tokens).
    token_budget: int = 2048
    # Largest decode batch the calibration rows measured; beyond it the roofline rules.
    decode_calibrated_seqs: int = 64
    params_b: float = 0.0  # parameters, billions (FLOPs per token = 2 * params)
    hbm_gbps: float = 0.0  # per GPU
    peak_tflops: float = 0.0  # dense fp16/bf16 tensor-core peak per GPU

    @property
    def roof_ms_per_seq(self) -> float:
        """Compute floor of one more decode token: 2 * params FLOPs over the replica's peak."""
        return 2.0 * self.params_b * 1e9 / (self.peak_tflops * 1e12 * self.tensor_parallel) * 1e3

    @property
    def roof_ms_per_context_token(self) -> float:
        """Bandwidth floor of attending one more cached token: its KV bytes over HBM bandwidth."""
        return self.kv_bytes_per_token / (self.hbm_gbps * 1e9 * self.tensor_parallel) * 1e3

    @property
    def roof_base_ms(self) -> float:
        """Bandwidth floor of any decode step: reading the weights once."""
        return self.weights_gb / (self.hbm_gbps * self.tensor_parallel) * 1e3

    def roofline_step_ms(self, batch, context_tokens):
        """Hardware floor of a decode step: max(bytes / HBM bandwidth, FLOPs / peak)."""
        mem = self.roof_base_ms + self.roof_ms_per_context_token * np.asarray(context_tokens, float)
        return np.maximum(mem, self.roof_ms_per_seq * np.asarray(batch, float))

    @property
    def kv_capacity_tokens(self) -> float:
        """KV-cache tokens one replica holds: 0.9 of GPU memory minus weights."""
        usable = 0.9 * self.gpu_memory_gb * self.tensor_parallel * 1e9 - self.weights_gb * 1e9
        return usable / self.kv_bytes_per_token

    @property
    def price_usd_per_h(self) -> float:
        return self.gpu_price_usd_per_h * self.tensor_parallel

    def prefill_ms(self, prompt_tokens):
        L = prompt_tokens
        return self.prefill_base_ms + L * (self.prefill_ms_per_token + L * self.prefill_ms_per_token_sq)

    def decode_fit_ms(self, batch, context_tokens):
        """The calibrated fit, extrapolated as is."""
        return (
            self.decode_base_ms
            + self.decode_ms_per_context_token * context_tokens
            + self.decode_ms_per_seq * batch
        )

    def decode_step_ms(self, batch, context_tokens):
        """Decode step: the fit up to `decode_calibrated_seqs`; beyond, each further
        sequence costs its roofline increment (the larger of its KV read and its FLOPs),
        never more than the fit's own increment. `decode_step_s` (fluid.py) is the same
        rule on a ServiceCurve."""
        b = np.asarray(batch, float)
        c = np.asarray(context_tokens, float)
        ctx = c / np.maximum(b, 1.0)
        bc = np.minimum(b, self.decode_calibrated_seqs)
        fit_per_seq = self.decode_ms_per_seq + self.decode_ms_per_context_token * ctx
        roof_per_seq = np.maximum(self.roof_ms_per_seq, self.roof_ms_per_context_token * ctx)
        return self.decode_base_ms + fit_per_seq * bc + np.minimum(fit_per_seq, roof_per_seq) * (b - bc)


# --- Constants (README of ../shared/data unless noted) -------------------------------
_HARDWARE = {"a100": "a100-80gb", "h100": "h100-80gb"}  # splitwise names, non power-capped
_GPU_MEMORY_GB = 80.0  # both are the 80 GB parts
_GPU_PRICE = {"a100-80gb": 2.21, "h100-80gb": 4.25}  # USD/h per GPU, Vidur (CoreWeave Feb 2024)
# fp16 KV bytes/token = 2*2*head_dim*kv_heads*layers (README).
_KV_BYTES = {"llama2-7b": 524_288.0, "llama2-70b": 327_680.0}
# fp16 = 2 bytes/param; 6.74e9 and 68.98e9 params (Touvron et al. 2023, Llama 2).
_WEIGHTS_GB = {"llama2-7b": 13.5, "llama2-70b": 138.0}
# MMLU 5-shot relative to 70B (Touvron et al. 2023, Table 3: 7B 45.3, 70B 68.9).
_QUALITY = {"llama2-7b": 45.3 / 68.9, "llama2-70b": 1.0}
# vLLM V1 engine defaults for the OpenAI API server (vllm/engine/arg_utils.py,
# EngineArgs batch defaults, vLLM 0.9-0.11): GPUs with >= 70 GiB that are not A100 get
# max_num_batched_tokens 8192 and max_num_seqs 1024; others (A100 included, PR #17885)
# 2048 and 256. Chunked prefill is always on in V1.
_TOKEN_BUDGET = {"a100-80gb": 2048, "h100-80gb": 8192}
_MAX_NUM_SEQS = {"a100-80gb": 256, "h100-80gb": 1024}
_DECODE_FIT_MAX_TOKENS = 256  # 7B decode fit: vidur points with num_tokens <= 256
# Largest measured decode batch: splitwise rows batch_size 1..64 (70B); the 7B fit's range.
_CALIBRATED_SEQS = {"llama2-7b": 256, "llama2-70b": 64}
# Parameter counts (Touvron et al. 2023, Llama 2): 6.74e9 and 68.98e9.
_PARAMS_B = {"llama2-7b": 6.74, "llama2-70b": 68.98}
# Dense fp16/bf16 tensor-core peak, TFLOPS: A100 SXM 312 (NVIDIA A100 datasheet), H100
# SXM 989 (NVIDIA H100 datasheet; 1979 is with sparsity).
_PEAK_TFLOPS = {"a100-80gb": 312.0, "h100-80gb": 989.0}

# 7B has no splitwise rows; it borrows two terms from DistServe's OPT-13B A100 fit (README).
_OPT13B_PREFILL_SQ = 7.12e-6  # ms/token^2, prefill attention
_OPT13B_DECODE_CTX = 6.27e-4  # ms per context token, decode attention
# Prefill attention FLOPs ~ layers*hidden*L^2: Llama-2-7B 32x4096 (Touvron et al. 2023),
# OPT-13B 40x5120 (Zhang et al. 2022, Table 1).
_ATTN_FLOP_RATIO_7B = (32 * 4096) / (40 * 5120)
# Decode attention streams the KV cache; OPT-13B has Llama-2-13B's 40x5120 MHA shape,
# so its KV bytes/token are the README's 819,200.
_KV_RATIO_7B = _KV_BYTES["llama2-7b"] / 819_200.0
# HBM bandwidth, GB/s: A100-80GB SXM 2039, H100 SXM 3350 (NVIDIA datasheets).
_HBM_GBPS = {"a100-80gb": 2039.0, "h100-80gb": 3350.0}
# Splitwise rows that contradict the batch trend: TP2, prompt 512, batch 64 (prompt_time
# drops ~8x from batch 32). Not used by the TP4/TP8 fits; dropped in case TP2 is fitted.
_ANOMALOUS = {(2, 512, 64)}  # (tensor_parallel, prompt_size, batch_size)

# --- Fitted coefficients (4 s.f.; regenerate with benchmarks/fit_hardware.py) ---------
# name: ((prefill base, /token, /token^2), (decode base, /context token, /seq)), ms.
# 70B: splitwise_perf_model.csv, model=llama2-70b, hardware=<gpu>-80gb, tensor_parallel=TP;
#   prefill from the batch_size=1 rows (prompt 128..8192), decode from all rows.
# 7B: vidur_llama_iter_ms.txt "<gpu> Llama-2-7b-hf TP1" line (+ DistServe terms above).
_FITTED = {
    "llama2-7b-a100-tp1": ((8.102, 0.04345, 1.022e-05), (8.67, 0.0004013, 0.0315)),
    "llama2-7b-h100-tp1": ((5.295, 0.01323, 3.099e-06), (5.36, 0.0002442, 0.01239)),
    "llama2-70b-a100-tp4": ((43.77, 0.1531, 1.58e-05), (43.35, 0.0003546, 0.1917)),
    "llama2-70b-h100-tp4": ((36.95, 0.06127, 7.011e-06), (28.83, 9.285e-05, 0.266)),
    "llama2-70b-a100-tp8": ((48.87, 0.08662, 1.243e-05), (44.09, 0.000324, 0.1943)),
    "llama2-70b-h100-tp8": ((46.42, 0.02286, 1.028e-05), (29.88, 0.0001622, 0.209)),
}


def _parse_name(name: str) -> tuple[str, str, int]:
    model_a, model_b, gpu, tp = name.split("-")
    return f"{model_a}-{model_b}", _HARDWARE[gpu], int(tp.removeprefix("tp"))


def _make(name: str) -> ServiceProfile:
    model, gpu, tp = _parse_name(name)
    prefill, decode = _FITTED[name]
    return ServiceProfile(
        name, model, gpu, tp, *prefill, *decode,
        kv_bytes_per_token=_KV_BYTES[model],
        gpu_memory_gb=_GPU_MEMORY_GB,
        weights_gb=_WEIGHTS_GB[model],
        gpu_price_usd_per_h=_GPU_PRICE[gpu],
        max_batch_seqs=_MAX_NUM_SEQS[gpu],
        quality=_QUALITY[model],
        token_budget=_TOKEN_BUDGET[gpu],
        decode_calibrated_seqs=_CALIBRATED_SEQS[model],
        params_b=_PARAMS_B[model],
        hbm_gbps=_HBM_GBPS[gpu],
        peak_tflops=_PEAK_TFLOPS[gpu],
    )


PROFILES: dict[str, ServiceProfile] = {name: _make(name) for name in _FITTED}

# --- GPU instances and price sets ---------------------------------------------------
@dataclasses.dataclass(frozen=True)
class InstanceType:
    name: str
    gpus: int
    vcpus: int
    memory_gb: float  # GiB as the vendor lists it
    usd_per_h: float  # on-demand list price of the whole instance

    @property
    def vcpus_per_gpu(self) -> float:
        return self.vcpus / self.gpus

    @property
    def memory_gb_per_gpu(self) -> float:
        return self.memory_gb / self.gpus


# A replica's pod runs on one of these; its CPU and memory requests are bounded by the
# instance's share per GPU. AWS EC2 instance types page and on-demand pricing, us-east-1,
# Linux (2024): p4de.24xlarge 8x A100-80GB, 96 vCPUs, 1152 GiB, $40.96/h; p5.48xlarge
# 8x H100-80GB, 192 vCPUs, 2048 GiB, $98.32/h (also The Next Platform, 2023-07-27).
INSTANCES = {
    "a100-80gb": InstanceType("p4de.24xlarge", 8, 96, 1152.0, 40.96),
    "h100-80gb": InstanceType("p5.48xlarge", 8, 192, 2048.0, 98.32),
}
# Other hyperscalers' 8x H100 on-demand list prices for comparison (2024 list pages):
# Azure ND96isr H100 v5 (96 vCPUs, 1900 GiB) $98.32/h, East US (about $98/h still in
# 2026, rmmartins.com "Cost engineering for AI", 2026-06-11); GCP a3-highgpu-8g
# (208 vCPUs, 1872 GB) $88.25/h, us-central1. These are 2024 prices: AWS cut P4 and P5
# on-demand prices in June 2025 (P5 by up to 45 %, usage.ai "LLM cost optimization on
# AWS", 2026), so for AWS today the "hyperscaler" set is an upper bound.
HYPERSCALER_H100_USD_PER_H = {"aws p5.48xlarge": 98.32, "azure ND96isr_H100_v5": 98.32, "gcp a3-highgpu-8g": 88.25}

# Price sets: "gpu-cloud" prices the GPU-hour (Vidur's CoreWeave Feb 2024 figures, above),
# "hyperscaler" the instance share per GPU. Either covers the pod's CPU and memory
# (CoreWeave bills a GPU pod at the GPU price, which includes the host's vCPUs and RAM;
# docs.coreweave.com, "Billing and charges"). Default: gpu-cloud.
PRICE_SETS = ("gpu-cloud", "hyperscaler")
DEFAULT_PRICE_SET = "gpu-cloud"


def gpu_price_usd_per_h(gpu: str, price_set: str = DEFAULT_PRICE_SET) -> float:
    """Price of one GPU-hour of `gpu` (splitwise name) under a price set."""
    if price_set not in PRICE_SETS:
        raise ValueError(f"prices must be one of {list(PRICE_SETS)}, got {price_set!r}")
    if gpu not in INSTANCES:
        raise ValueError(f"no price or instance shape for GPU {gpu!r}; known: {sorted(INSTANCES)}")
    if price_set == "gpu-cloud":
        return _GPU_PRICE[gpu]
    inst = INSTANCES[gpu]
    return inst.usd_per_h / inst.gpus


# The cheaper quality tier of a node is Llama-2-7B on the node's GPU type (7B nodes map
# to themselves: the data has nothing smaller than 7B).
QUALITY_TIER: dict[str, str] = {
    name: f"llama2-7b-{name.split('-')[2]}-tp1" for name in PROFILES
}


def is_profile_file(name: str) -> bool:
    return str(name).endswith((".yaml", ".yml"))


def get_profile(name: str) -> ServiceProfile:
    """A named profile, or a profile YAML file (as `aro calibrate` writes)."""
    if is_profile_file(name):
        return load_profile(name)
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; valid: {sorted(PROFILES)} or a profile .yaml file") from None


def quality_tier_of(profile: ServiceProfile) -> str:
    """The small model of a profile's quality tier: Llama-2-7B on the same GPU type."""
    short = {v: k for k, v in _HARDWARE.items()}.get(profile.gpu)
    return QUALITY_TIER.get(profile.name) or (f"llama2-7b-{short}-tp1" if short else "llama2-7b-a100-tp1")


_PROFILE_KEYS = {f.name for f in dataclasses.fields(ServiceProfile)}


def profile_to_dict(p: ServiceProfile) -> dict:
    return {f: getattr(p, f) for f in (x.name for x in dataclasses.fields(ServiceProfile))}


def load_profile(path) -> ServiceProfile:
    """Read a profile YAML file: every ServiceProfile field, by name; errors name the file."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: profile file not found") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of profile fields, got {type(data).__name__}")
    missing = sorted(_PROFILE_KEYS - set(data) - {"token_budget", "decode_calibrated_seqs"})
    unknown = sorted(set(data) - _PROFILE_KEYS)
    if missing or unknown:
        raise ValueError(f"{path}: " + "; ".join(
            x for x in (f"missing fields {missing}" if missing else "", f"unknown fields {unknown}" if unknown else "") if x
        ))
    types = {f.name: f.type for f in dataclasses.fields(ServiceProfile)}
    out = {}
    for k, v in data.items():
        want = types[k]
        try:
            out[k] = str(v) if want == "str" else (int(v) if want == "int" else float(v))
        except (TypeError, ValueError):
            raise ValueError(f"{path}: field {k!r} must be a {want}, got {v!r}") from None
        if want != "str" and k != "quality" and not out[k] > 0 and k not in ("prefill_ms_per_token_sq", "decode_ms_per_context_token"):
            raise ValueError(f"{path}: field {k!r} must be > 0, got {v!r}")
    return ServiceProfile(**out)


# --- Fitting -------------------------------------------------------------------------

def _rel_lstsq(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares on relative residuals (X@c - y)/y, so short and long requests are
    fitted to the same percentage accuracy instead of the longest dominating."""
    return np.linalg.lstsq(X / y[:, None], np.ones_like(y), rcond=None)[0]


def _pct_err(pred: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    e = 100.0 * np.abs(pred / y - 1.0)
    return float(e.mean()), float(e.max())


def _load_splitwise(path: Path, hardware: str, tp: int) -> dict[str, np.ndarray]:
    cols = ("prompt_size", "batch_size", "token_size", "prompt_time", "token_time")
    with open(path, newline="") as f:
        rows = [
            [float(r[c]) for c in cols]
            for r in csv.DictReader(f)
            if r["model"] == "llama2-70b" and r["hardware"] == hardware
            and int(r["tensor_parallel"]) == tp
            and (tp, int(r["prompt_size"]), int(r["batch_size"])) not in _ANOMALOUS
        ]
    return dict(zip(cols, np.array(rows).T))


def _load_vidur(path: Path) -> dict[tuple[str, str, int], tuple[np.ndarray, np.ndarray]]:
    """Lines like 'a100 Llama-2-7b-hf TP1 [...] 1:9.3 8:9.1 ...' -> (num_tokens, ms)."""
    out = {}
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        head, points = line.split("]", 1)
        gpu, model, tp = head.split()[:3]
        n, ms = np.array([p.split(":") for p in points.split()], float).T
        out[(gpu, model, int(tp.removeprefix("TP")))] = (n, ms)
    return out


def _fit_splitwise(d: dict[str, np.ndarray]) -> dict:
    P, B, T = d["prompt_size"], d["batch_size"], d["token_size"]
    # Prefill: batch_size=1 rows, one point per prompt size (repeats and the token_size
    # sweep averaged, since prefill does not depend on output length).
    one = B == 1
    L = np.unique(P[one])
    y = np.array([d["prompt_time"][one & (P == x)].mean() for x in L])
    prefill = _rel_lstsq(np.stack([L**0, L, L**2], 1), y)
    # Decode: mean token_time per (P, B, T) config. Average context over the generation
    # is B*(P + T/2) tokens.
    cfg, inv = np.unique(np.stack([P, B, T], 1), axis=0, return_inverse=True)
    inv = inv.ravel()
    y_dec = np.bincount(inv, d["token_time"]) / np.bincount(inv)
    def feats(p, b, t):
        return np.stack([b**0, b * (p + t / 2), b], 1)

    decode = _rel_lstsq(feats(*cfg.T), y_dec)
    return dict(
        prefill=tuple(prefill), decode=tuple(decode),
        prefill_err=_pct_err(np.stack([P**0, P, P**2], 1)[one] @ prefill, d["prompt_time"][one]),
        decode_err=_pct_err(feats(P, B, T) @ decode, d["token_time"]),
        prefill_rows=int(one.sum()), decode_rows=len(P),
    )


def _fit_vidur_7b(vidur: dict, gpu: str) -> dict:
    hw = _HARDWARE[gpu]
    n, ms = vidur[(gpu, "Llama-2-7b-hf", 1)]
    # Prefill of L tokens is one iteration with num_tokens=L; vidur excludes attention,
    # so add DistServe's OPT-13B attention term scaled to 7B by attention FLOPs, and to
    # H100 by vidur's compute-bound speedup at the largest num_tokens (4096).
    prefill = _rel_lstsq(np.stack([n**0, n, n**2], 1), ms)
    speedup = ms[-1] / vidur[("a100", "Llama-2-7b-hf", 1)][1][-1]
    attn_sq = _OPT13B_PREFILL_SQ * _ATTN_FLOP_RATIO_7B * speedup
    # Decode: one iteration with num_tokens=B; fit base + per_seq*B up to 256 sequences.
    # Per-context-token cost is KV streaming (memory-bound): DistServe's term scaled by
    # KV bytes/token and by HBM bandwidth relative to A100 (DistServe's GPU).
    dec = n <= _DECODE_FIT_MAX_TOKENS
    base, per_seq = _rel_lstsq(np.stack([n[dec] ** 0, n[dec]], 1), ms[dec])
    per_ctx = _OPT13B_DECODE_CTX * _KV_RATIO_7B * _HBM_GBPS["a100-80gb"] / _HBM_GBPS[hw]
    return dict(
        prefill=(prefill[0], prefill[1], prefill[2] + attn_sq),
        decode=(base, per_ctx, per_seq),
        # Errors are against vidur's non-attention points (attention not in the data).
        prefill_err=_pct_err(np.stack([n**0, n, n**2], 1) @ prefill, ms),
        decode_err=_pct_err(base + per_seq * n[dec], ms[dec]),
        prefill_rows=len(n), decode_rows=int(dec.sum()),
    )


def fit_profiles(data_dir: str | Path) -> dict[str, dict]:
    """Refit every profile in PROFILES from the calibration data.

    Returns {name: {"prefill": (base, per_token, per_token_sq), "decode": (base,
    per_context_token, per_seq), "prefill_err"/"decode_err": (MAPE %, max %),
    "prefill_rows"/"decode_rows": rows compared, "source": data file}}.
    """
    cal = Path(data_dir) / "calibration"
    vidur = _load_vidur(cal / "vidur_llama_iter_ms.txt")
    fits = {}
    for name in PROFILES:
        model, hw, tp = _parse_name(name)
        gpu = name.split("-")[2]
        if model == "llama2-70b":
            fit = _fit_splitwise(_load_splitwise(cal / "splitwise_perf_model.csv", hw, tp))
            fit["source"] = "splitwise_perf_model.csv"
        else:
            fit = _fit_vidur_7b(vidur, gpu)
            fit["source"] = "vidur_llama_iter_ms.txt + DistServe"
        fits[name] = fit
    return fits
