"""Fidelity of the serving model: every profile's capacity and latencies from the model
the policies train on, next to external published points, with the ratio; the burst fit
to the Azure traces; the price sets.

Writes benchmarks/fidelity.json and renders benchmarks/fidelity.md from it.

    python benchmarks/fidelity.py [--data-dir ../shared/data]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from aro_jax import capacity  # noqa: E402
from aro_jax.envs import bursts, fluid, hardware, scenarios  # noqa: E402
from aro_jax.envs.params import ServiceCurve  # noqa: E402

TRTLLM = "TensorRT-LLM v0.6.1 performance tables (NVIDIA/TensorRT-LLM docs/source/performance.md)"
VIDUR_DATA = "Vidur profiling data (microsoft/vidur@7d475133 data/profiling/compute/*/mlp.csv, via ../shared/data/calibration/vidur_llama_iter_ms.txt)"
VIDUR_ISSUE = "Vidur simulator, Qwen2-7B on one A30 at 1024 in / 128 out, saturates near 6 req/s (the figure of the fidelity issue)"

# External points: (profile, quantity, input tokens, output tokens, value, unit, source, note).
# TensorRT-LLM A100 FP16 rows: batch-1 first-token latency (low-latency table), and the
# offline throughput of static batches (TP1 rows, where per-GPU and total agree).
EXTERNAL = [
    ("llama2-7b-a100-tp1", "first-token latency, batch 1", 128, 1, 16.0, "ms", TRTLLM, "A100 FP16"),
    ("llama2-7b-a100-tp1", "first-token latency, batch 1", 2048, 1, 133.0, "ms", TRTLLM, "A100 FP16"),
    ("llama2-70b-a100-tp4", "first-token latency, batch 1", 128, 1, 47.0, "ms", TRTLLM, "A100 FP16, TP4"),
    ("llama2-70b-a100-tp4", "first-token latency, batch 1", 2048, 1, 377.0, "ms", TRTLLM, "A100 FP16, TP4"),
    ("llama2-7b-h100-tp1", "first-token latency, batch 1", 128, 1, 7.0, "ms", TRTLLM, "H100 FP8 (ours fp16)"),
    ("llama2-7b-h100-tp1", "first-token latency, batch 1", 2048, 1, 36.0, "ms", TRTLLM, "H100 FP8 (ours fp16)"),
    ("llama2-70b-h100-tp4", "first-token latency, batch 1", 128, 1, 26.0, "ms", TRTLLM, "H100 FP8 (ours fp16)"),
    ("llama2-70b-h100-tp4", "first-token latency, batch 1", 2048, 1, 109.0, "ms", TRTLLM, "H100 FP8 (ours fp16)"),
    ("llama2-7b-a100-tp1", "output tokens/s at saturation", 128, 128, 5586.0, "tok/s", TRTLLM, "A100 FP16, static batch 384"),
    ("llama2-7b-a100-tp1", "output tokens/s at saturation", 128, 2048, 1928.0, "tok/s", TRTLLM, "A100 FP16, static batch 60"),
    ("llama2-7b-a100-tp1", "output tokens/s at saturation", 2048, 128, 591.0, "tok/s", TRTLLM, "A100 FP16, static batch 52"),
    ("llama2-7b-a100-tp1", "max request rate", 1024, 128, 6.0, "req/s", VIDUR_ISSUE, "Qwen2-7B on A30"),
]
# Decode-step growth from 64 to 256 sequences at short context (no attention), ms: the
# roofline increments beyond the splitwise rows against Vidur's measured non-attention
# iteration times at num_tokens 64 and 256.
VIDUR_LINES = {
    "llama2-70b-a100-tp4": ("a100", "Llama-2-70b-hf", 4), "llama2-70b-a100-tp8": ("a100", "Llama-2-70b-hf", 8),
    "llama2-70b-h100-tp4": ("h100", "Llama-2-70b-hf", 4), "llama2-70b-h100-tp8": ("h100", "Llama-2-70b-hf", 8),
}

EXPLAIN = {
    "H100 FP8 (ours fp16)": "FP8 halves the bytes and doubles the peak of every GEMM; a fp16 engine is expected ~1.5-2x slower",
    "A100 FP16, static batch 384": "static batch of 384 with all prompts prefilled at once; vLLM's A100 default caps the batch at 256 sequences and chunked prefill shares iterations",
    "Qwen2-7B on A30": "A100: ~2x the A30's compute and bandwidth; Llama-2-7B: ~8x Qwen2-7B's KV bytes per token (smaller batches): the expected range is ~6-12 req/s",
}


def model_value(profile: str, quantity: str, L: int, n: int) -> float:
    prof = hardware.get_profile(profile)
    if quantity.startswith("first-token latency"):
        curve = ServiceCurve.from_profile(prof)
        return float(fluid.isolated_prefill_s(curve, float(L))) * 1e3
    rep = capacity.report(profile, capacity.fixed_mix(L, n, max_context_tokens=8192.0), loads=(0.5,))
    if quantity == "max request rate":
        return rep["max_rate_rps_per_replica"]
    return rep["max_decode_tokens_per_s_per_replica"]


def vidur_rows(data_dir: Path) -> list[dict]:
    path = data_dir / "calibration" / "vidur_llama_iter_ms.txt"
    if not path.exists():
        return []
    lines = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        head, points = line.split("]", 1)
        gpu, model, tp = head.split()[:3]
        lines[(gpu, model, int(tp.removeprefix("TP")))] = dict(tuple(map(float, p.split(":"))) for p in points.split())
    out = []
    for name, key in VIDUR_LINES.items():
        prof = hardware.get_profile(name)
        measured = lines[key][256.0] - lines[key][64.0]
        ours = prof.decode_step_ms(256, 256 * 1.0) - prof.decode_step_ms(64, 64 * 1.0)
        fit = prof.decode_fit_ms(256, 256.0) - prof.decode_fit_ms(64, 64.0)
        out.append({"profile": name, "vidur_ms": measured, "model_ms": ours, "fit_extrapolated_ms": fit, "ratio": ours / measured})
    return out


def profile_rows() -> list[dict]:
    rows = []
    for name in sorted(hardware.PROFILES):
        for mix in sorted(scenarios.TRAFFIC_MIXES):
            rep = capacity.report(name, capacity.named_mix(mix), loads=(0.5, 0.8), workload=scenarios.WORKLOAD_OF_MIX[mix])
            rows.append({
                "profile": name, "mix": mix, "max_rps": rep["max_rate_rps_per_replica"],
                "rps_at_95": rep["rate_at_target_attainment_rps_per_replica"],
                "tok_s": rep["max_decode_tokens_per_s_per_replica"],
                "ttft_50": rep["loads"][0]["ttft_mean_s"], "tpot_50": rep["loads"][0]["tpot_mean_s"],
                "att_80": rep["loads"][1]["slo_attainment"],
                "slo": f"{rep['slo_ttft_s']:g} s / {rep['slo_tpot_s']:g} s",
            })
    return rows


def burst_rows(data_dir: Path) -> list[dict]:
    from aro_jax.envs.trace import load_trace_csv

    out = []
    for mix, kind in (("conversation", "conv"), ("code", "code")):
        path = data_dir / "traces" / f"AzureLLMInferenceTrace_{kind}.csv"
        if not path.exists():
            continue
        tr = load_trace_csv(path)
        s30, s300 = bursts.count_stats(tr.arrival_s, 30.0), bursts.count_stats(tr.arrival_s, 300.0)
        cv, phi = bursts.fit_log_ar1_joint(s30["mean"], s30["cv"], s30["ac1"], s300["cv"], 10)
        sim = bursts.simulate_counts(np.random.default_rng(0), s30["mean"], cv, phi, 200_000)
        five = sim.reshape(-1, 10).sum(1)
        c = sim - sim.mean()
        out.append({
            "mix": mix, "trace": path.name, "mean_per_30s": s30["mean"], "cv_30s": s30["cv"], "ac1_30s": s30["ac1"], "cv_5min": s300["cv"],
            "burst_cv": cv, "burst_ac1": phi, "model_ac1": bursts.model_ac1(s30["mean"], cv, phi),
            "model_cv_5min": bursts.aggregated_cv(s30["mean"], cv, phi, 10),
            "sim_cv_30s": float(sim.std() / sim.mean()), "sim_cv_5min": float(five.std() / five.mean()),
            "sim_ac1": float(np.sum(c[1:] * c[:-1]) / np.sum(c * c)),
            "shipped": [scenarios.TRAFFIC_MIXES[mix]["burst_cv"], scenarios.TRAFFIC_MIXES[mix]["burst_ac1"]],
        })
    return out


def price_rows() -> list[dict]:
    rows = []
    for gpu, inst in hardware.INSTANCES.items():
        rows.append({
            "gpu": gpu, "instance": inst.name, "vcpus_per_gpu": inst.vcpus_per_gpu, "memory_gb_per_gpu": inst.memory_gb_per_gpu,
            "gpu_cloud_usd_per_gpu_h": hardware.gpu_price_usd_per_h(gpu, "gpu-cloud"),
            "hyperscaler_usd_per_gpu_h": hardware.gpu_price_usd_per_h(gpu, "hyperscaler"),
        })
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "fidelity.md")
    args = ap.parse_args()
    t0 = time.perf_counter()
    external = []
    for profile, qty, L, n, value, unit, source, note in EXTERNAL:
        ours = model_value(profile, qty, L, n)
        external.append({"profile": profile, "quantity": qty, "input_tokens": L, "output_tokens": n, "external": value, "unit": unit,
                         "model": ours, "ratio": ours / value, "source": source, "note": note, "explanation": EXPLAIN.get(note, "")})
    data = {
        "command": "python benchmarks/fidelity.py",
        "machine": f"{platform.machine()} CPU, jax {jax.__version__}, Python {platform.python_version()}",
        "external": external, "vidur_decode_growth": vidur_rows(args.data_dir), "profiles": profile_rows(),
        "bursts": burst_rows(args.data_dir), "prices": price_rows(),
        "engine_defaults": {g: {"token_budget": hardware._TOKEN_BUDGET[g], "max_num_seqs": hardware._MAX_NUM_SEQS[g]} for g in hardware._TOKEN_BUDGET},
    }
    data["wall_s"] = time.perf_counter() - t0
    json_path = args.out.with_suffix(".json")
    json_path.write_text(json.dumps(data, indent=1))
    args.out.write_text(render(data))
    print(render(data))
    print(f"wrote {json_path} and {args.out}")


def render(d: dict) -> str:
    f = lambda x: f"{x:.3g}"  # noqa: E731
    lines = [
        "# Simulator fidelity", "",
        f"Generated by `{d['command']}` ({d['machine']}, {d['wall_s']:.0f} s); every figure below comes from fidelity.json.", "",
        "## Against external published points", "",
        "Model: the fluid serving model as `aro capacity` reports it (max rate at saturation, fixed lengths), and the",
        "idle-instance prefill for first-token latency. Ratio = model / external. Within 1.5x unless explained.", "",
        "| profile | quantity | in / out tokens | external | model | ratio | note | source |", "|---|---|---|---|---|---|---|---|",
    ]
    for r in d["external"]:
        flag = "" if 1 / 1.5 <= r["ratio"] <= 1.5 else " (outside 1.5x)"
        lines.append(f"| {r['profile']} | {r['quantity']} | {r['input_tokens']} / {r['output_tokens']} | {f(r['external'])} {r['unit']} | "
                     f"{f(r['model'])} {r['unit']} | {r['ratio']:.2f}{flag} | {r['note']} | {r['source']} |")
    notes = sorted({(r["note"], r["explanation"]) for r in d["external"] if r["explanation"]})
    lines += ["", "Gaps explained:"] + [f"- {n}: {e}." for n, e in notes]
    if d["vidur_decode_growth"]:
        lines += [
            "", "## Decode beyond the calibration rows", "",
            "Growth of one decode step from 64 to 256 sequences at short context (the non-attention part), ms: the",
            "model's roofline increments beyond the splitwise rows (batch <= 64), the fit extrapolated, and Vidur's",
            f"measured non-attention iteration times at 64 and 256 tokens ({VIDUR_DATA}).", "",
            "| profile | Vidur ms | model ms | fit extrapolated ms | model / Vidur |", "|---|---|---|---|---|",
        ]
        for r in d["vidur_decode_growth"]:
            lines.append(f"| {r['profile']} | {f(r['vidur_ms'])} | {f(r['model_ms'])} | {f(r['fit_extrapolated_ms'])} | {r['ratio']:.2f} |")
        lines += ["", "On H100 the measured growth is below the FLOP floor because at 64-256 tokens a step is still bound by",
                  "reading the weights (time = max(bytes, FLOPs), not their sum); the model's linear increment is the",
                  "larger slope, so it never runs faster than the roofline."]
    lines += [
        "", "## Every profile on the two traffic mixes", "",
        "Per replica: max sustainable rate, the highest rate with >= 95% of requests meeting both SLOs, output tokens/s at",
        "saturation, mean TTFT and TPOT at 50% load, attainment at 80% load; SLOs of the mix's workload class (DistServe Table 1).", "",
        "| profile | mix | SLO TTFT / TPOT | max req/s | req/s at 95% | output tok/s | TTFT @50% s | TPOT @50% s | attainment @80% |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in d["profiles"]:
        lines.append(f"| {r['profile']} | {r['mix']} | {r['slo']} | {f(r['max_rps'])} | {f(r['rps_at_95'])} | {r['tok_s']:.0f} | "
                     f"{f(r['ttft_50'])} | {f(r['tpot_50'])} | {100 * r['att_80']:.1f}% |")
    lines += ["", "Engine defaults (vLLM V1, API server): " + "; ".join(
        f"{g}: max_num_batched_tokens {v['token_budget']}, max_num_seqs {v['max_num_seqs']}" for g, v in d["engine_defaults"].items())]
    if d["bursts"]:
        lines += [
            "", "## Burst fit (log-AR(1) modulation of 30 s counts)", "",
            "Azure 2023 traces (../shared/data/traces): count statistics per 30 s and 5 min, the fit",
            "(aro_jax.envs.bursts.fit_log_ar1_joint: modulation CV from the 30 s CV; AR coefficient the closest to the",
            "lag-1 autocorrelation that keeps the 5 min CV within 15%), and 200,000 simulated ticks.", "",
            "| mix | trace | mean / 30 s | CV 30 s | lag-1 ac | CV 5 min | burst_cv | burst_ac1 | model ac1 | sim CV 30 s | sim CV 5 min | sim ac1 |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in d["bursts"]:
            lines.append(f"| {r['mix']} | {r['trace']} | {r['mean_per_30s']:.1f} | {r['cv_30s']:.3f} | {r['ac1_30s']:.3f} | {r['cv_5min']:.3f} | "
                         f"{r['burst_cv']:.4f} | {r['burst_ac1']:.3f} | {r['model_ac1']:.3f} | {r['sim_cv_30s']:.3f} | {r['sim_cv_5min']:.3f} | {r['sim_ac1']:.3f} |")
    lines += [
        "", "## Price sets and pod shapes", "",
        "`env.prices: gpu-cloud` (default; Vidur's CoreWeave GPU-hour prices) or `hyperscaler` (AWS on-demand",
        "instance price per GPU). Both cover the pod's CPU and memory, which are bounded by its instance's share per GPU.", "",
        "| GPU | instance | vCPUs / GPU | memory GB / GPU | gpu-cloud $/GPU-h | hyperscaler $/GPU-h |", "|---|---|---|---|---|---|",
    ]
    for r in d["prices"]:
        lines.append(f"| {r['gpu']} | {r['instance']} | {r['vcpus_per_gpu']:g} | {r['memory_gb_per_gpu']:g} | "
                     f"{r['gpu_cloud_usd_per_gpu_h']:.2f} | {r['hyperscaler_usd_per_gpu_h']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
