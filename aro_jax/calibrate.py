"""Fit a hardware profile from a user's own measurements (`aro calibrate`).

Inputs:
- CSV in the splitwise perf-model format (../shared/data/calibration/splitwise_perf_model.csv):
  model, hardware, prompt_size, batch_size, token_size, prompt_time (ms), token_time (ms),
  tensor_parallel. Prefill from the batch_size = 1 rows, decode from all rows, as
  aro_jax.envs.hardware fits the shipped profiles.
- JSON result files of vLLM's benchmark_serving (per-request `input_lens`, `output_lens`,
  `ttfts` in s, and the run's `request_throughput`, `mean_itl_ms` or `itls`). Prefill from the
  per-request TTFTs of the least loaded file (TTFT there is mostly the prefill); one decode
  point per file: the mean inter-token latency at that file's mean decode batch (Little's
  law: throughput x decode time) and context. With fewer than three files the per-sequence
  and per-context-token costs are not identifiable and stay at the `--like` profile's.

The profile keeps the `--like` profile's model, GPU, memory, price and engine facts and
replaces the service-time coefficients; the YAML it writes can be named as a node's
profile in a cluster file.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import yaml

from aro_jax.envs import hardware

SPLITWISE_COLUMNS = ("model", "hardware", "prompt_size", "batch_size", "token_size", "prompt_time", "token_time", "tensor_parallel")
NUMERIC = SPLITWISE_COLUMNS[2:]


class CalibrationError(ValueError):
    """A measurement file that cannot be used; the message names the file, line and problem."""


def _rel_lstsq(X, y):
    return np.linalg.lstsq(X / y[:, None], np.ones_like(y), rcond=None)[0]


def read_splitwise_csv(path: Path) -> list[dict]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise CalibrationError(f"{path}: file not found") from None
    except UnicodeDecodeError:
        raise CalibrationError(f"{path}: not UTF-8 text; expected a CSV with columns {','.join(SPLITWISE_COLUMNS)}") from None
    reader = csv.DictReader(text.splitlines())
    if reader.fieldnames is None:
        raise CalibrationError(f"{path} line 1: empty file; expected a header {','.join(SPLITWISE_COLUMNS)}")
    missing = [c for c in SPLITWISE_COLUMNS if c not in [f.strip() for f in reader.fieldnames]]
    if missing:
        raise CalibrationError(f"{path} line 1: missing column(s) {', '.join(missing)}; expected {','.join(SPLITWISE_COLUMNS)}")
    rows = []
    for i, r in enumerate(reader, start=2):
        r = {k.strip(): (v or "").strip() for k, v in r.items() if k is not None}
        row = {"line": i, "model": r["model"], "hardware": r["hardware"]}
        for c in NUMERIC:
            try:
                row[c] = float(r[c])
            except ValueError:
                raise CalibrationError(f"{path} line {i}: {c} {r[c]!r} is not a number") from None
            if not (math.isfinite(row[c]) and row[c] > 0):
                raise CalibrationError(f"{path} line {i}: {c} must be a positive number, got {r[c]!r}")
        rows.append(row)
    if not rows:
        raise CalibrationError(f"{path}: no data rows after the header")
    return rows


def fit_splitwise(path: Path, like: hardware.ServiceProfile) -> dict:
    rows = read_splitwise_csv(path)
    key = lambda r: (r["model"], r["hardware"], int(r["tensor_parallel"]))  # noqa: E731
    groups = sorted({key(r) for r in rows})
    want = (like.model, like.gpu, like.tensor_parallel)
    pick = want if want in groups else (groups[0] if len(groups) == 1 else None)
    if pick is None:
        raise CalibrationError(
            f"{path}: rows for several (model, hardware, tensor_parallel) groups {groups} and none is "
            f"--like's {want}; pass --like a profile of the group to fit, or one group per file"
        )
    rows = [r for r in rows if key(r) == pick]
    col = lambda c: np.array([r[c] for r in rows])  # noqa: E731
    P, B, T = col("prompt_size"), col("batch_size"), col("token_size")
    one = B == 1
    if len(np.unique(P[one])) < 3:
        raise CalibrationError(f"{path}: prefill needs batch_size=1 rows at >= 3 prompt sizes, found {len(np.unique(P[one]))}")
    Xp = np.stack([P**0, P, P**2], 1)
    # One point per prompt size (repeats averaged) and per decode configuration, as the
    # shipped profiles are fitted (hardware._fit_splitwise).
    sizes = np.unique(P[one])
    y_pre = np.array([col("prompt_time")[one & (P == x)].mean() for x in sizes])
    prefill = _rel_lstsq(np.stack([sizes**0, sizes, sizes**2], 1), y_pre)
    Xd = np.stack([B**0, B * (P + T / 2), B], 1)
    if np.linalg.matrix_rank(Xd) < 3:
        raise CalibrationError(f"{path}: decode needs rows at several batch sizes and prompt sizes")
    cfg, inv = np.unique(np.stack([P, B, T], 1), axis=0, return_inverse=True)
    inv = inv.ravel()
    y_dec = np.bincount(inv, col("token_time")) / np.bincount(inv)
    decode = _rel_lstsq(np.stack([cfg[:, 1] ** 0, cfg[:, 1] * (cfg[:, 0] + cfg[:, 2] / 2), cfg[:, 1]], 1), y_dec)
    points = []
    for r, pp, pd in zip(rows, Xp @ prefill, Xd @ decode):
        if r["batch_size"] == 1:
            points.append({"source": f"{path}:{r['line']}", "phase": "prefill", "x": f"L={r['prompt_size']:.0f}",
                           "measured_ms": r["prompt_time"], "fitted_ms": float(pp)})
        points.append({"source": f"{path}:{r['line']}", "phase": "decode", "x": f"B={r['batch_size']:.0f} L={r['prompt_size']:.0f}",
                       "measured_ms": r["token_time"], "fitted_ms": float(pd)})
    return {"prefill": tuple(map(float, prefill)), "decode": tuple(map(float, decode)), "points": points,
            "calibrated_seqs": int(B.max()), "group": pick}


def _load_vllm_json(path: Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise CalibrationError(f"{path}: file not found") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CalibrationError(f"{path} line {e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise CalibrationError(f"{path}: expected a vLLM benchmark_serving result object, got {type(data).__name__}")
    need = ("input_lens", "output_lens", "ttfts", "request_throughput")
    missing = [k for k in need if k not in data]
    if missing:
        raise CalibrationError(f"{path}: missing key(s) {', '.join(missing)} (save per-request results with benchmark_serving --save-result)")
    try:
        L = np.asarray(data["input_lens"], float)
        n = np.asarray(data["output_lens"], float)
        ttft = np.asarray(data["ttfts"], float)
        rps = float(data["request_throughput"])
    except (TypeError, ValueError):
        raise CalibrationError(f"{path}: input_lens, output_lens and ttfts must be lists of numbers") from None
    if not (len(L) == len(n) == len(ttft) and len(L) > 0):
        raise CalibrationError(f"{path}: input_lens, output_lens and ttfts must have the same non-zero length, got {len(L)}, {len(n)}, {len(ttft)}")
    ok = np.isfinite(L) & np.isfinite(n) & np.isfinite(ttft) & (ttft > 0) & (L > 0)
    if ok.sum() < 3 or not rps > 0:
        raise CalibrationError(f"{path}: fewer than 3 usable requests or request_throughput <= 0")
    if "mean_itl_ms" in data:
        itl_s = float(data["mean_itl_ms"]) / 1e3
    elif "itls" in data:
        flat = [x for r in data["itls"] for x in r]
        itl_s = float(np.mean(flat)) if flat else math.nan
    else:
        raise CalibrationError(f"{path}: missing mean_itl_ms or itls (the inter-token latencies)")
    if not (math.isfinite(itl_s) and itl_s > 0):
        raise CalibrationError(f"{path}: the mean inter-token latency must be a positive number")
    return {"path": path, "L": L[ok], "n": n[ok], "ttft": ttft[ok], "rps": rps, "itl_s": itl_s}


def fit_vllm(paths, like: hardware.ServiceProfile) -> dict:
    runs = [_load_vllm_json(p) for p in paths]
    quiet = min(runs, key=lambda r: r["rps"])
    L, y = quiet["L"], quiet["ttft"] * 1e3
    X = np.stack([L**0, L, L**2], 1)
    if len(np.unique(L)) >= 3:
        prefill = _rel_lstsq(X, y)
    else:  # one prompt length: keep --like's shape, scale it to the measurement
        prefill = np.array([like.prefill_base_ms, like.prefill_ms_per_token, like.prefill_ms_per_token_sq]) * float(np.mean(y / like.prefill_ms(L)))
    points = [{"source": f"{quiet['path']}:request {i}", "phase": "prefill", "x": f"L={l:.0f}", "measured_ms": float(m), "fitted_ms": float(f)}
              for i, (l, m, f) in enumerate(zip(L, y, X @ prefill))]
    feats, ys = [], []
    for r in runs:
        decode_s = np.maximum(r["n"] - 1, 0) * r["itl_s"]
        batch = r["rps"] * float(decode_s.mean())
        ctx = float(np.mean(r["L"] + r["n"] / 2))
        feats.append((1.0, batch * ctx, max(batch, 1.0)))
        ys.append(r["itl_s"] * 1e3)
    F, Y = np.array(feats), np.array(ys)
    if len(runs) >= 3 and np.linalg.matrix_rank(F) == 3:
        decode = _rel_lstsq(F, Y)
    else:
        fixed = np.array([like.decode_ms_per_context_token, like.decode_ms_per_seq])
        base = float(np.mean(Y - F[:, 1:] @ fixed))
        if not base > 0:
            raise CalibrationError(f"{paths[0]}: the measured ITL is below --like's per-sequence cost; pass >= 3 files at different loads")
        decode = np.array([base, *fixed])
    for r, f, yy in zip(runs, F, Y):
        points.append({"source": str(r["path"]), "phase": "decode", "x": f"B={f[2]:.1f} C={f[1]:.0f}", "measured_ms": float(yy), "fitted_ms": float(f @ decode)})
    return {"prefill": tuple(map(float, prefill)), "decode": tuple(map(float, decode)), "points": points,
            "calibrated_seqs": int(max(1, math.ceil(F[:, 2].max()))), "group": (like.model, like.gpu, like.tensor_parallel)}


def calibrate(files, like: str = "llama2-7b-a100-tp1", name: str | None = None) -> dict:
    """Fit a profile; returns {"profile": ServiceProfile, "points": [...], "mape": %, "max_error": %}."""
    try:
        base = hardware.get_profile(like)
    except (ValueError, FileNotFoundError) as e:
        raise CalibrationError(f"--like: {e}") from None
    files = [Path(f) for f in files]
    kinds = {f.suffix.lower() for f in files}
    if not kinds <= {".csv", ".json"}:
        raise CalibrationError(f"{[str(f) for f in files if f.suffix.lower() not in ('.csv', '.json')][0]}: expected a .csv (splitwise format) or .json (vLLM benchmark_serving) file")
    if kinds == {".csv", ".json"}:
        raise CalibrationError("give either splitwise CSV files or vLLM JSON files, not both")
    if ".csv" in kinds:
        if len(files) != 1:
            raise CalibrationError("one splitwise CSV file at a time")
        fit = fit_splitwise(files[0], base)
    else:
        fit = fit_vllm(files, base)
    (pb, pt, psq), (db, dc, ds) = fit["prefill"], fit["decode"]
    if min(pb, pt, db, ds) <= 0 or psq < 0 or dc < 0:
        raise CalibrationError(f"{files[0]}: the fit gave a non-physical coefficient (prefill {fit['prefill']}, decode {fit['decode']}); measure more prompt sizes and batch sizes")
    prof = dataclasses.replace(
        base, name=name or f"calibrated-{base.name}", prefill_base_ms=pb, prefill_ms_per_token=pt, prefill_ms_per_token_sq=psq,
        decode_base_ms=db, decode_ms_per_context_token=dc, decode_ms_per_seq=ds, decode_calibrated_seqs=fit["calibrated_seqs"],
    )
    err = np.array([100.0 * abs(p["fitted_ms"] / p["measured_ms"] - 1.0) for p in fit["points"]])
    return {"profile": prof, "points": fit["points"], "mape": float(err.mean()), "max_error": float(err.max()), "group": fit["group"]}


def render(result: dict) -> str:
    p = result["profile"]
    lines = [
        f"profile {p.name}: {p.model} on {p.tensor_parallel}x {p.gpu} (rows of {result['group']})",
        f"prefill ms = {p.prefill_base_ms:.4g} + {p.prefill_ms_per_token:.4g} L + {p.prefill_ms_per_token_sq:.4g} L^2",
        f"decode step ms = {p.decode_base_ms:.4g} + {p.decode_ms_per_context_token:.4g} C + {p.decode_ms_per_seq:.4g} B",
        f"fit error: mean {result['mape']:.1f}%, max {result['max_error']:.1f}% over {len(result['points'])} points",
        "",
        "| source | phase | point | measured ms | fitted ms | error |",
        "|---|---|---|---|---|---|",
    ]
    for q in result["points"]:
        lines.append(f"| {q['source']} | {q['phase']} | {q['x']} | {q['measured_ms']:.4g} | {q['fitted_ms']:.4g} | {100 * (q['fitted_ms'] / q['measured_ms'] - 1):+.1f}% |")
    return "\n".join(lines)


def profile_yaml(p: hardware.ServiceProfile) -> str:
    return yaml.safe_dump(hardware.profile_to_dict(p), sort_keys=False)
