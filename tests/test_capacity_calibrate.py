"""`aro capacity` and `aro calibrate` on good and bad input."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from aro_jax import calibrate
from aro_jax.cli import main
from aro_jax.envs import hardware
from aro_jax.envs.scenarios import NodeSpec, node_params

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from reference_sim import EngineSpec, Requests, simulate  # noqa: E402

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SPLITWISE = DATA_DIR / "calibration" / "splitwise_perf_model.csv"


def _run(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_capacity_json_for_llama2_7b_a100_is_in_the_regime_of_vidur(capsys):
    rc, out, _ = _run(capsys, "capacity", "llama2-7b-a100-tp1", "--input-tokens", "1024", "--output-tokens", "128", "--json", "--target-rps", "40")
    assert rc == 0
    rep = json.loads(out)
    # Vidur: Qwen2-7B on an A30 saturates near 6 req/s at 1024/128 tokens; an A100 has ~2x
    # its compute and bandwidth, Llama-2-7B ~8x the KV bytes per token (a smaller batch).
    assert 3.0 < rep["max_rate_rps_per_replica"] < 12.0
    att = [r["slo_attainment"] for r in rep["loads"]]
    assert att == sorted(att, reverse=True) and att[0] > 0.95
    tpot = [r["tpot_mean_s"] for r in rep["loads"]]
    assert tpot == sorted(tpot)
    assert rep["replicas_needed"] >= int(np.ceil(40 / rep["max_rate_rps_per_replica"]))
    assert rep["rate_at_target_attainment_rps_per_replica"] <= rep["max_rate_rps_per_replica"]


def test_capacity_text_for_a_named_mix(capsys):
    rc, out, _ = _run(capsys, "capacity", "llama2-70b-h100-tp8", "--mix", "conversation", "--loads", "0.5,0.9")
    assert rc == 0 and "| 0.50 |" in out and "| 0.90 |" in out and "req/s" in out


@pytest.mark.parametrize("argv,msg", [
    (("capacity", "gpt-9", "--mix", "code"), "unknown profile"),
    (("capacity", "llama2-7b-a100-tp1", "--input-tokens", "0", "--output-tokens", "5"), ">= 1"),
    (("capacity", "llama2-7b-a100-tp1", "--input-tokens", "100"), "both --input-tokens and --output-tokens"),
    (("capacity", "llama2-7b-a100-tp1", "--mix", "code", "--input-tokens", "5", "--output-tokens", "5"), "give one token mix"),
    (("capacity", "llama2-7b-a100-tp1", "--mix", "poetry"), "--mix must be one of"),
    (("capacity", "llama2-7b-a100-tp1", "--mix", "code", "--loads", "0.5,1.5"), "--loads"),
    (("capacity", "llama2-7b-a100-tp1", "--mix", "code", "--prices", "spot"), "prices"),
])
def test_capacity_bad_input_is_a_clear_error(capsys, argv, msg):
    rc, _, err = _run(capsys, *argv)
    assert rc == 2 and msg in err and err.startswith("error:")


@pytest.mark.skipif(not SPLITWISE.exists(), reason=f"calibration data not found at {SPLITWISE}")
def test_calibrate_splitwise_reproduces_the_shipped_profile_and_the_yaml_is_a_profile(tmp_path, capsys):
    out = tmp_path / "mine.yaml"
    rc, text, _ = _run(capsys, "calibrate", str(SPLITWISE), "--like", "llama2-70b-h100-tp4", "--name", "mine", "--out", str(out))
    assert rc == 0 and "fit error" in text and "splitwise_perf_model.csv:" in text  # per-point errors name the row
    prof, ref = hardware.get_profile(str(out)), hardware.PROFILES["llama2-70b-h100-tp4"]
    for f in ("prefill_base_ms", "prefill_ms_per_token", "prefill_ms_per_token_sq", "decode_base_ms", "decode_ms_per_context_token", "decode_ms_per_seq"):
        assert getattr(prof, f) == pytest.approx(getattr(ref, f), rel=0.01)
    assert prof.name == "mine" and prof.decode_calibrated_seqs == 64
    p = node_params(NodeSpec(profile=str(out)))
    assert float(p.model.decode_base_s) == pytest.approx(ref.decode_base_ms / 1e3, rel=0.01)
    from aro_jax.config import load_config

    nodes = ", ".join(f"{{name: n{i}, profile: {out}}}" for i in range(9))
    cfg = load_config(None, [f"cluster.nodes=[{nodes}]"])
    assert cfg.cluster.nodes[0].profile == str(out)


def _vllm_result(path, spec, rate, rng, n=400):
    L = rng.integers(64, 2048, n)
    out = rng.integers(16, 256, n)
    req = Requests(np.sort(rng.uniform(0, n / rate, n)), L, out)
    simulate(spec, 1, req, 1e9)
    tpot = (req.finish_s - req.first_token_s) / np.maximum(out - 1, 1)
    data = {"input_lens": L.tolist(), "output_lens": out.tolist(), "ttfts": (req.first_token_s - req.arrival_s).tolist(),
            "request_throughput": n / (np.nanmax(req.finish_s) - req.arrival_s[0]), "mean_itl_ms": float(np.mean(tpot)) * 1e3}
    path.write_text(json.dumps(data))
    return path


def test_calibrate_from_vllm_benchmark_results(tmp_path):
    truth = hardware.PROFILES["llama2-7b-h100-tp1"]
    spec = EngineSpec.from_curve(node_params(NodeSpec(profile=truth.name)).model)
    rng = np.random.default_rng(0)
    files = [_vllm_result(tmp_path / f"run{i}.json", spec, rate, rng) for i, rate in enumerate((0.5, 6.0, 12.0))]
    res = calibrate.calibrate(files, like="llama2-7b-a100-tp1")
    prof = res["profile"]
    L = np.array([256.0, 1024.0, 2000.0])
    np.testing.assert_allclose(prof.prefill_ms(L), truth.prefill_ms(L), rtol=0.15)
    assert len(res["points"]) == 400 + 3 and np.isfinite(res["mape"])
    assert "request" in calibrate.render(res)


@pytest.mark.parametrize("name,content,msg", [
    ("a.csv", "model,hardware\nx,y\n", "line 1: missing column(s) prompt_size"),
    ("b.csv", "model,hardware,prompt_size,batch_size,token_size,prompt_time,token_time,tensor_parallel\nm,h,128,1,128,abc,5,4\n", "line 2: prompt_time 'abc' is not a number"),
    ("c.csv", "model,hardware,prompt_size,batch_size,token_size,prompt_time,token_time,tensor_parallel\nm,h,128,1,128,-3,5,4\n", "line 2: prompt_time must be a positive number"),
    ("d.json", '{"input_lens": [1, 2,\n oops]}', "d.json line 2: not valid JSON"),
    ("e.json", '{"input_lens": [1]}', "missing key(s) output_lens"),
    ("f.txt", "hello", "expected a .csv"),
])
def test_calibrate_bad_files_name_file_line_and_problem(tmp_path, capsys, name, content, msg):
    path = tmp_path / name
    path.write_text(content)
    rc, _, err = _run(capsys, "calibrate", str(path))
    assert rc == 2 and msg in err and str(path) in err


def test_calibrate_missing_file(tmp_path, capsys):
    rc, _, err = _run(capsys, "calibrate", str(tmp_path / "none.csv"))
    assert rc == 2 and "file not found" in err


def test_capacity_from_a_trace_file(tmp_path, capsys):
    rng = np.random.default_rng(0)
    rows = ["TIMESTAMP,ContextTokens,GeneratedTokens"] + [
        f"2023-11-16 18:00:{i // 10:02d}.{i % 10}000000,{int(x)},{int(y)}"
        for i, (x, y) in enumerate(zip(rng.lognormal(6.6, 0.9, 200), rng.lognormal(5.0, 0.8, 200)))
    ]
    path = tmp_path / "t.csv"
    path.write_text("\n".join(rows) + "\n")
    rc, out, _ = _run(capsys, "capacity", "llama2-7b-h100-tp1", "--trace", str(path), "--json")
    assert rc == 0
    rep = json.loads(out)
    assert 400 < rep["input_tokens_mean"] < 2000 and rep["max_rate_rps_per_replica"] > 0
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    rc, _, err = _run(capsys, "capacity", "llama2-7b-h100-tp1", "--trace", str(bad))
    assert rc == 2 and str(bad) in err
