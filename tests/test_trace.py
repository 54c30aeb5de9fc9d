from pathlib import Path

import numpy as np
import pytest

from aro_jax.envs.trace import (
    RequestTrace,
    TraceFormatError,
    fit_lognormal,
    inter_arrival_cv,
    load_trace_csv,
    resample_rates,
)

HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"
GOOD = (
    HEADER
    + "2023-11-16 18:17:03.9799600,4808,10\n"
    + "2023-11-16 18:17:04.0319600,3180,8\n"
    + "2023-11-16 18:17:04.0319600,0,0\n"  # equal timestamps are allowed
    + "2023-11-16 18:17:06.5000001,12,3\n"
)
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TRACES = DATA / "traces"


def write(tmp_path, text, name="trace.csv"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_good_file_round_trips(tmp_path):
    t = load_trace_csv(write(tmp_path, GOOD))
    np.testing.assert_allclose(t.arrival_s, [0.0, 0.052, 0.052, 2.5200401], atol=1e-9)
    assert t.arrival_s.dtype == np.float64 and t.input_tokens.dtype == np.int64
    assert t.input_tokens.tolist() == [4808, 3180, 0, 12]
    assert t.output_tokens.tolist() == [10, 8, 0, 3]
    assert t.source.endswith("trace.csv")
    assert t.duration_s == pytest.approx(2.5200401)
    assert t.mean_rate_rps == pytest.approx(4 / 2.5200401)


def test_float_seconds_and_extra_columns(tmp_path):
    text = "id,TIMESTAMP,GeneratedTokens,ContextTokens\na,10.5,1,2\nb,11,3,4\nc,13.25,5,6\n"
    t = load_trace_csv(write(tmp_path, text))
    np.testing.assert_allclose(t.arrival_s, [0.0, 0.5, 2.75])
    assert t.input_tokens.tolist() == [2, 4, 6]
    assert t.output_tokens.tolist() == [1, 3, 5]


def test_trace_arrays_are_read_only(tmp_path):
    t = load_trace_csv(write(tmp_path, GOOD))
    with pytest.raises(ValueError):
        t.arrival_s[0] = 1.0


@pytest.mark.parametrize(
    "text, fragments",
    [
        (
            "TIMESTAMP,ContextTokens,Other\n2023-11-16 18:17:03.1,1,2\n",
            ["line 1", "GeneratedTokens", "found columns: TIMESTAMP, ContextTokens, Other"],
        ),
        (
            HEADER + "2023-11-16 18:17:05.0,1,2\n2023-11-16 18:17:04.0,1,2\n",
            ["line 3", "2023-11-16 18:17:04.0", "2023-11-16 18:17:05.0", "sorted"],
        ),
        (
            HEADER + "2023-11-16 18:17:05.0,1,2\n2023-13-16 18:17:06.0,1,2\n",
            ["line 3", "'2023-13-16 18:17:06.0'", "not a valid timestamp"],
        ),
        (HEADER + "soon,1,2\n", ["line 2", "'soon'", "not a valid timestamp"]),
        (
            HEADER + "1.0,5,1\n2.0,-3,1\n",
            ["line 3", "ContextTokens", "'-3'", "is negative", "non-negative integer"],
        ),
        (
            HEADER + "1.0,5,2.5\n",
            ["line 2", "GeneratedTokens", "'2.5'", "not an integer"],
        ),
        (HEADER + "1.0,abc,1\n", ["line 2", "ContextTokens", "'abc'", "not an integer"]),
        (HEADER + "1.0,5\n", ["line 2", "2 fields", "expected 3"]),
        ("", ["empty", "header"]),
        (HEADER, ["line 1", "no data rows"]),
    ],
    ids=[
        "missing-column",
        "unsorted",
        "bad-date",
        "bad-timestamp",
        "negative-tokens",
        "fractional-tokens",
        "non-integer-tokens",
        "short-row",
        "empty-file",
        "header-only",
    ],
)
def test_bad_input_raises_clear_error(tmp_path, text, fragments):
    path = write(tmp_path, text, name="bad_trace.csv")
    with pytest.raises(TraceFormatError) as info:
        load_trace_csv(path)
    msg = str(info.value)
    assert "bad_trace.csv" in msg
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)


@pytest.mark.parametrize(
    "content, fragments",
    [
        ((HEADER + "1.0,5,1\n2.0,caf\u00e9,1\n").encode("latin-1"), ["line 3", "byte 0xe9 is not UTF-8"]),
        (b"\x89PNG\r\n\x1a\n" + bytes(range(256)), ["line 1", "byte 0x89 is not UTF-8"]),
        (HEADER.encode() + b"1.0,5\x00,1\n", ["line 2", "ContextTokens", "not an integer"]),
    ],
    ids=["latin-1", "binary", "nul-byte"],
)
def test_any_bytes_give_a_clear_error_with_the_full_path(tmp_path, content, fragments):
    path = tmp_path / "bad_trace.csv"
    path.write_bytes(content)
    with pytest.raises(TraceFormatError) as info:
        load_trace_csv(path)
    msg = str(info.value)
    assert msg.startswith(f"{path} line") and "\n" not in msg
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)


def test_missing_file_raises_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.csv.*not found"):
        load_trace_csv(tmp_path / "nope.csv")


def _synthetic(n=1000, seed=0):
    arrivals = np.sort(np.random.default_rng(seed).uniform(0, 100.0, n))
    arrivals -= arrivals[0]
    ones = np.ones(n, dtype=np.int64)
    return RequestTrace(arrivals, ones, ones, "synthetic")


@pytest.mark.parametrize("tick_s", [0.1, 1.0, 7.0, 1000.0])
def test_resample_conserves_requests(tick_s):
    trace = _synthetic()
    rates = resample_rates(trace, tick_s)
    assert len(rates) == max(1, int(np.ceil(trace.duration_s / tick_s)))
    assert rates.sum() * tick_s == pytest.approx(trace.num_requests)


def test_resample_hits_target_mean_and_keeps_shape():
    trace = _synthetic()
    raw = resample_rates(trace, 5.0)
    scaled = resample_rates(trace, 5.0, target_mean_rps=3.0)
    assert scaled.mean() == pytest.approx(3.0)
    np.testing.assert_allclose(scaled / scaled.sum(), raw / raw.sum())


def test_resample_last_arrival_on_tick_boundary():
    ones = np.ones(3, dtype=np.int64)
    trace = RequestTrace(np.array([0.0, 1.0, 2.0]), ones, ones, "edge")
    np.testing.assert_allclose(resample_rates(trace, 1.0), [1.0, 2.0])


@pytest.mark.parametrize("kwargs", [{"tick_s": 0.0}, {"tick_s": -1.0},
                                    {"tick_s": 1.0, "target_mean_rps": 0.0}])
def test_resample_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        resample_rates(_synthetic(), **kwargs)


def test_fit_lognormal_recovers_parameters_and_ignores_zeros():
    rng = np.random.default_rng(1)
    tokens = np.round(rng.lognormal(5.0, 0.7, 200_000)).astype(np.int64)
    mu, sd = fit_lognormal(np.concatenate([tokens, np.zeros(1000, np.int64)]))
    assert mu == pytest.approx(5.0, abs=0.01) and sd == pytest.approx(0.7, abs=0.01)
    with pytest.raises(ValueError, match="no positive"):
        fit_lognormal([0, 0])


def test_inter_arrival_cv_of_poisson_is_near_one():
    gaps = np.random.default_rng(2).exponential(1.0, 50_000)
    arrivals = np.concatenate([[0.0], np.cumsum(gaps)])
    ones = np.ones(len(arrivals), dtype=np.int64)
    cv = inter_arrival_cv(RequestTrace(arrivals, ones, ones, "poisson"))
    assert cv == pytest.approx(1.0, abs=0.03)


# Figures from shared/data/README.md: (input mu, sd), (output mu, sd), req/min.
REAL = {
    "code": ((7.00, 1.36), (2.79, 0.85), 152),
    "conv": ((6.63, 0.99), (5.02, 0.86), 328),
}


@pytest.mark.skipif(not TRACES.is_dir(), reason=f"real traces not found at {TRACES}")
@pytest.mark.parametrize("kind", sorted(REAL))
def test_real_trace_matches_readme(kind):
    trace = load_trace_csv(TRACES / f"AzureLLMInferenceTrace_{kind}.csv")
    (in_mu, in_sd), (out_mu, out_sd), per_min = REAL[kind]
    assert fit_lognormal(trace.input_tokens) == pytest.approx((in_mu, in_sd), abs=0.02)
    assert fit_lognormal(trace.output_tokens) == pytest.approx((out_mu, out_sd), abs=0.02)
    # The README's rate is the mean of per-minute counts; the span-average agrees too.
    assert resample_rates(trace, 60.0).mean() * 60 == pytest.approx(per_min, rel=0.03)
    assert trace.mean_rate_rps * 60 == pytest.approx(per_min, rel=0.03)


# --- Every format, format detection, replay through the env, the CLI -----------------------

import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from functools import partial  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from aro_jax import cli  # noqa: E402
from aro_jax.config import ConfigError, default_data_dir, load_config, trace_entries  # noqa: E402
from aro_jax.envs import serving as sv  # noqa: E402
from aro_jax.envs.scenarios import ALL_REGIONS, TraceReplay, replay_cluster_params  # noqa: E402
from aro_jax.envs.trace import load_trace  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "data" / "traces"
# fixture -> (format, requests per 30 s tick, prompts over the 4096-token context per tick)
SMALL = {
    "azure2023_small.csv": ("azure", [3, 0, 2, 4, 1], [1, 0, 0, 1, 0]),
    "azure2024_small.csv": ("azure", [2, 1, 0, 3], [1, 0, 0, 1]),
    "burstgpt_small.csv": ("burstgpt", [1, 2, 0, 0, 2, 1], [0, 1, 0, 0, 0, 0]),
    "mooncake_small.jsonl": ("mooncake", [3, 1, 2, 1], [1, 1, 0, 0]),
}
REGIONS = ("r-a23", "r-a24", "r-burst", "r-moon")  # one region per fixture, in SMALL's order
RATES = (2.0, 1.5, 1.0, 3.0)
SMALL_CLUSTER = "cluster:\n  name: small\n  nodes:\n" + "".join(
    f"    - {{name: {r}, profile: llama2-7b-a100-tp1, mean_rate_rps: {m}}}\n" for r, m in zip(REGIONS, RATES)
) + "env: {episode_ticks: 8}\neval: {num_seeds: 1, baselines: [reactive]}\n"


@pytest.fixture(scope="module")
def small_cfg(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "small.yaml"
    path.write_text(SMALL_CLUSTER)
    return load_config(path)


def _per_region(scale=1.0, loop=False):
    return {r: TraceReplay(str(FIXTURES / f), scale=scale, loop=loop) for r, f in zip(REGIONS, SMALL)}


@partial(jax.jit, static_argnames=("action_set", "num_ticks"))
def _replay(params, action_set: str, num_ticks: int):
    """Per-tick metrics (nodes, ticks) of every node from reset, holding the allocation."""
    env = sv.ServingNodeEnv(action_set)

    def one(p):
        _, state = env.reset_env(jax.random.PRNGKey(0), p)

        def tick(s, k):
            s, m, _ = env.transition(k, s, jnp.int32(sv.MAINTAIN), p)
            return s, m

        return jax.lax.scan(tick, state, jax.random.split(jax.random.PRNGKey(1), num_ticks))[1]

    return jax.vmap(one)(params)


def _padded(counts, n):
    return np.pad(np.asarray(counts, np.float64), (0, n - len(counts)))


@pytest.mark.parametrize("name", sorted(SMALL))
def test_each_format_is_detected_and_read(name):
    fmt, counts, _ = SMALL[name]
    for forced in (None, fmt):
        t = load_trace(FIXTURES / name, forced)
        assert t.format == fmt and t.num_requests == sum(counts)
        assert np.all(np.diff(t.arrival_s) >= 0) and t.arrival_s[0] == 0.0


def test_azure_2024_offsets_and_burstgpt_failures():
    t = load_trace(FIXTURES / "azure2024_small.csv")
    # 02:00:31+02:00 is 00:00:31 UTC, between its neighbours; a 7th digit-free fraction.
    np.testing.assert_allclose(t.arrival_s[:3], [0.0, 12.49007, 30.99007], atol=1e-9)
    b = load_trace(FIXTURES / "burstgpt_small.csv")
    assert b.output_tokens.tolist() == [18, 301, 212, 95, 0, 150]  # the failed request still arrives
    np.testing.assert_allclose(b.arrival_s, [0, 31, 35, 121, 125, 155])


def test_replay_reproduces_each_trace_per_tick_in_the_env(small_cfg):
    """Every fixture's own per-tick counts are the env's arrivals, from tick 0, with no
    cycle on top and no loop: the shorter traces end in zero arrivals."""
    plan = replay_cluster_params(small_cfg, _per_region())
    assert plan.num_ticks == 6  # the longest trace (BurstGPT: 155 s) in 30 s ticks
    m = _replay(plan.params, small_cfg.env.action_set, plan.num_ticks)
    for i, (name, (_, counts, over)) in enumerate(SMALL.items()):
        np.testing.assert_allclose(m["arrivals"][i], _padded(counts, 6), rtol=1e-6, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(m["rejected"][i], _padded(over, 6), rtol=1e-5, atol=1e-5, err_msg=name)
        assert float(m["rejected"][i].sum()) == pytest.approx(sum(over), rel=1e-5)
    padded = [n for n in plan.notes if "padded with" in n]
    assert any("r-moon" in n and "padded with 2 ticks of zero arrivals" in n for n in padded)
    assert not any("r-burst" in n for n in padded)


def test_context_rejects_are_counted_not_capped(small_cfg, tmp_path):
    """A trace whose prompts are all over the 4096-token window: every request is rejected
    and counted; none is served."""
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps({"timestamp": 1000 * s, "input_length": 5000 + s, "output_length": 10}) + "\n" for s in range(0, 180, 10)))
    plan = replay_cluster_params(small_cfg, {ALL_REGIONS: TraceReplay(str(path))})
    m = _replay(plan.params, small_cfg.env.action_set, plan.num_ticks)
    assert plan.num_ticks == 6
    np.testing.assert_allclose(m["rejected"], m["arrivals"], rtol=1e-6)
    assert float(m["rejected"].sum()) == pytest.approx(18 * 4, rel=1e-5)
    assert float(m["served"].sum()) == pytest.approx(0.0, abs=1e-3)
    assert all("18 (100.0 %) longer than the 4096-token context, rejected" in n for n in plan.notes)


@pytest.mark.parametrize("scale", [2.5, "fit"])
def test_trace_scale(small_cfg, scale):
    plan = replay_cluster_params(small_cfg, _per_region(scale))
    m = _replay(plan.params, small_cfg.env.action_set, plan.num_ticks)
    for i, (name, (_, counts, _)) in enumerate(SMALL.items()):
        native = len(counts)
        # fit: the trace's mean over its own ticks is the region's configured mean rate
        factor = 2.5 if scale != "fit" else RATES[i] * native * 30.0 / sum(counts)
        np.testing.assert_allclose(m["arrivals"][i], _padded(counts, 6) * factor, rtol=1e-5, err_msg=name)
        assert float(plan.params.traffic.mean_rate_rps[i]) == pytest.approx(sum(counts) * factor / (native * 30.0), rel=1e-6)


def test_loop_only_when_asked(small_cfg):
    plan = replay_cluster_params(small_cfg, {ALL_REGIONS: TraceReplay(str(FIXTURES / "azure2024_small.csv"), loop=True)})
    assert plan.num_ticks == small_cfg.env.episode_ticks == 8
    np.testing.assert_allclose(plan.params.traffic.replay_arrivals[0], [2, 1, 0, 3, 2, 1, 0, 3])
    assert "looped 2.00 times" in plan.notes[0] and plan.notes[0].startswith("regions r-a23, r-a24, r-burst, r-moon:")
    once = replay_cluster_params(small_cfg, {ALL_REGIONS: TraceReplay(str(FIXTURES / "azure2024_small.csv"))})
    assert once.num_ticks == 4 and "loop" not in once.notes[0]


def test_regions_without_a_trace_run_the_scenario(small_cfg):
    plan = replay_cluster_params(small_cfg, {"r-moon": TraceReplay(str(FIXTURES / "mooncake_small.jsonl"))}, "diurnal")
    assert plan.num_ticks == 4
    assert plan.params.traffic.replay_weight.tolist() == [0.0, 0.0, 0.0, 1.0]
    assert plan.params.random_start.tolist() == [0.0] * 4  # the same day for every policy
    assert any("no trace; runs scenario diurnal" in n for n in plan.notes)


# Bad files of the new formats: (file name, content, forced format, fragments of the message)
BURST_HEADER = "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
BAD_FILES = {
    "burst-missing-column": ("b.csv", "Timestamp,Model,Request tokens,Total tokens\n1,m,2,3\n", "burstgpt",
                             ["line 1", "missing required column(s) Response tokens", "found columns: Timestamp, Model"]),
    "burst-unsorted": ("b.csv", BURST_HEADER + "5,m,1,1,2,x\n3,m,1,1,2,x\n", None, ["line 3", "'3' is earlier than", "'5'", "sort the file by time"]),
    "burst-negative": ("b.csv", BURST_HEADER + "5,m,-1,1,0,x\n", None, ["line 2", "Request tokens '-1' is negative", "non-negative integer"]),
    "burst-fractional": ("b.csv", BURST_HEADER + "5,m,1,2.5,3,x\n", None, ["line 2", "Response tokens '2.5' is not an integer"]),
    "burst-timestamp": ("b.csv", BURST_HEADER + "soon,m,1,2,3,x\n", None, ["line 2", "Timestamp 'soon' is not a valid timestamp", "seconds"]),
    "burst-short-row": ("b.csv", BURST_HEADER + "5,m,1\n", None, ["line 2", "3 fields", "expected 6"]),
    "burst-header-only": ("b.csv", BURST_HEADER, None, ["line 1", "no data rows"]),
    "burst-empty": ("b.csv", "", "burstgpt", ["file is empty", "Timestamp,Request tokens,Response tokens"]),
    "moon-missing-key": ("m.jsonl", '{"timestamp": 0, "input_length": 5, "output_length": 1}\n{"timestamp": 1, "input_length": 5}\n', None,
                         ["line 2", "missing key(s) output_length", "found keys: timestamp, input_length"]),
    "moon-unsorted": ("m.jsonl", '{"timestamp": 9, "input_length": 5, "output_length": 1}\n{"timestamp": 2, "input_length": 5, "output_length": 1}\n', None,
                      ["line 2", "timestamp 2 is earlier than the previous row's 9", "sort the file by time"]),
    "moon-negative": ("m.jsonl", '{"timestamp": 0, "input_length": -4, "output_length": 1}\n', None, ["line 1", "input_length -4 is negative"]),
    "moon-fractional": ("m.jsonl", '{"timestamp": 0, "input_length": 4, "output_length": 1.5}\n', None, ["line 1", "output_length 1.5 is not an integer"]),
    "moon-string-length": ("m.jsonl", '{"timestamp": 0, "input_length": "4", "output_length": 1}\n', None, ["line 1", 'input_length "4" is not an integer']),
    "moon-bool-length": ("m.jsonl", '{"timestamp": 0, "input_length": true, "output_length": 1}\n', None, ["line 1", "input_length true is not an integer"]),
    "moon-bad-timestamp": ("m.jsonl", '{"timestamp": NaN, "input_length": 4, "output_length": 1}\n', None, ["line 1", "timestamp NaN is not a valid timestamp", "milliseconds"]),
    "moon-bad-json": ("m.jsonl", '{"timestamp": 0, "input_length": 4, "output_length": 1}\n\n{"timestamp": 1, "input_length": 4,\n', None,
                      ["line 3", "not valid JSON", "one object per line"]),
    "moon-not-object": ("m.jsonl", '{"timestamp": 0, "input_length": 4, "output_length": 1}\n[1, 2, 3]\n', "mooncake", ["line 2", "a JSON list, not an object"]),
    "moon-empty": ("m.jsonl", "\n  \n", "mooncake", ["file is empty", "timestamp, input_length, output_length"]),
    "auto-empty": ("t.csv", "", None, ["file is empty", "Azure", "BurstGPT", "Mooncake"]),
    "auto-unknown-header": ("t.csv", "time,prompt,answer\n1,2,3\n", None, ["line 1", "cannot tell the trace format", "--trace-format"]),
    "auto-nul": ("t.jsonl", '\n\x00\x00\x00\n{"timestamp": 0}\n', None, ["line 2", "NUL byte", "binary"]),
    "moon-nul": ("t.jsonl", '{"timestamp": 0, "input_length": 4, "output_length": 1}\n\x00\x00\n', None, ["line 2", "not valid JSON"]),
    "forced-json-on-csv": ("t.csv", BURST_HEADER + "5,m,1,1,2,x\n", "mooncake", ["line 1", "not valid JSON"]),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_files_of_the_new_formats(tmp_path, case):
    name, content, fmt, fragments = BAD_FILES[case]
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(TraceFormatError) as info:
        load_trace(path, fmt)
    msg = str(info.value)
    assert msg.startswith(str(path)) and "\n" not in msg
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_binary_file_of_any_format(tmp_path, suffix):
    path = tmp_path / f"blob{suffix}"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    for fmt in (None, "burstgpt", "mooncake"):
        with pytest.raises(TraceFormatError, match=r"line 1: byte 0x89 is not UTF-8"):
            load_trace(path, fmt)


def test_unknown_format_and_directory(tmp_path):
    with pytest.raises(ValueError, match="unknown trace format 'parquet'"):
        load_trace(FIXTURES / "burstgpt_small.csv", "parquet")
    with pytest.raises(FileNotFoundError, match="is a directory"):
        load_trace(tmp_path)


def test_config_traces_resolve_against_the_config_file(tmp_path, monkeypatch):
    cfg_dir = tmp_path / "configs"
    (cfg_dir / "t").mkdir(parents=True)
    for f in ("mooncake_small.jsonl", "burstgpt_small.csv"):
        (cfg_dir / "t" / f).write_text((FIXTURES / f).read_text())
    (cfg_dir / "cluster.yaml").write_text(
        SMALL_CLUSTER + "traces:\n  '*': t/burstgpt_small.csv\n  r-moon: {path: t/mooncake_small.jsonl, scale: fit, loop: false}\n"
    )
    (cfg_dir / "exp.yaml").write_text("include: [cluster.yaml]\nenv: {data_dir: mydata}\n")
    monkeypatch.chdir(tmp_path / "..")  # anywhere but the config's directory
    cfg = load_config(cfg_dir / "exp.yaml")
    assert cfg.env.data_dir == str(cfg_dir / "mydata")
    entries = trace_entries(cfg)
    assert entries["*"] == {"path": str(cfg_dir / "t" / "burstgpt_small.csv"), "format": None, "scale": None, "loop": None}
    assert entries["r-moon"]["path"] == str(cfg_dir / "t" / "mooncake_small.jsonl") and entries["r-moon"]["scale"] == "fit"
    specs = {r: TraceReplay(e["path"], e["format"], e["scale"] or 1.0, bool(e["loop"])) for r, e in entries.items()}
    plan = replay_cluster_params(cfg, specs)
    assert plan.num_ticks == 6 and plan.params.traffic.replay_arrivals[0].tolist() == [1, 2, 0, 0, 2, 1]


@pytest.mark.parametrize(
    "traces, key, fragment",
    [
        ("{nowhere: a.csv}", "traces.nowhere", "has no region 'nowhere'"),
        ("{r-a23: {path: a.csv, scale: 0}}", "traces.r-a23.scale", "positive number or 'fit'"),
        ("{r-a23: {path: a.csv, scale: lots}}", "traces.r-a23.scale", "positive number or 'fit'"),
        ("{r-a23: {path: a.csv, format: parquet}}", "traces.r-a23.format", "azure, burstgpt, mooncake"),
        ("{r-a23: {path: a.csv, loop: 3}}", "traces.r-a23.loop", "true or false"),
        ("{r-a23: {format: azure}}", "traces.r-a23.path", "path is required"),
        ("{r-a23: {path: a.csv, speed: 2}}", "traces.r-a23.speed", "unknown trace setting"),
    ],
    ids=["unknown-region", "zero-scale", "word-scale", "format", "loop", "no-path", "unknown-key"],
)
def test_config_traces_validation(tmp_path, traces, key, fragment):
    path = tmp_path / "c.yaml"
    path.write_text(SMALL_CLUSTER + f"traces: {traces}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert f"config key '{key}'" in str(info.value) and fragment in str(info.value)


def test_default_data_dir_does_not_depend_on_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("ARO_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    expected = str((REPO.parent / "shared" / "data").resolve())
    assert default_data_dir() == expected and load_config().env.data_dir == expected
    monkeypatch.setenv("ARO_DATA_DIR", str(tmp_path / "elsewhere"))
    assert load_config().env.data_dir == str(tmp_path / "elsewhere")
    # A run directory's config.yaml written before paths resolved against their file.
    (tmp_path / "run").mkdir()
    legacy = SMALL_CLUSTER.replace("env: {episode_ticks: 8}", "env: {data_dir: ../shared/data, episode_ticks: 8}")
    (tmp_path / "run" / "config.yaml").write_text(legacy)
    assert load_config(tmp_path / "run" / "config.yaml").env.data_dir == str(tmp_path / "elsewhere")


def test_cli_trace_errors_are_one_line_before_compiling(tmp_path, capsys, small_cfg):
    cfg_path = tmp_path / "small.yaml"
    cfg_path.write_text(SMALL_CLUSTER)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"timestamp": 0, "input_length": 4, "output_length": 1}\n{"timestamp": 5, "input_length": -1, "output_length": 1}\n')
    cases = [
        (["--trace", str(bad)], [f"--trace {bad}: {bad} line 2", "input_length -1 is negative"]),
        (["--trace", f"r-moon={bad}"], [f"--trace r-moon={bad}: {bad} line 2"]),
        (["--trace", f"nope={bad}"], ["has no region 'nope'", "r-a23"]),
        (["--trace", str(tmp_path / "absent.csv")], ["absent.csv: trace file not found"]),
        (["--trace", str(bad), "--trace-scale", "-2"], ["--trace-scale", "positive number or 'fit'"]),
        (["--trace-loop"], ["give --trace FILE"]),
    ]
    for extra, fragments in cases:
        code = cli.main(["evaluate", "--policy", "reactive", "--config", str(cfg_path), "--out", str(tmp_path / "out"), *extra])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), (extra, err)
        for fragment in fragments:
            assert fragment in err, (fragment, err)
        assert not (tmp_path / "out").exists()


def test_cli_evaluate_replays_a_trace_from_any_directory(tmp_path):
    """`aro evaluate --policy reactive --trace FILE` from an unrelated directory, with the
    trace given only by its path, prints the replay and the KPI table."""
    cfg_path = tmp_path / "cfg" / "small.yaml"
    cfg_path.parent.mkdir()
    cfg_path.write_text(SMALL_CLUSTER)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(
        [sys.executable, "-m", "aro_jax.cli", "evaluate", "--policy", "reactive", "--config", str(cfg_path),
         "--trace", str(FIXTURES / "burstgpt_small.csv"), "--trace", f"r-moon={FIXTURES / 'mooncake_small.jsonl'}", "--out", "eval"],
        cwd=cwd, capture_output=True, text=True, timeout=300, env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert "replay: regions r-a23, r-a24, r-burst: burstgpt trace" in text
    assert "replay: region r-moon: mooncake trace" in text and "padded with 2 ticks of zero arrivals" in text
    assert "episode of 6 ticks" in text
    for kpi in ("goodput", "dropped_pct", "rejected_pct", "_all_"):  # goodput, drops, rejects, all-arrival latency
        assert kpi in text, (kpi, text[-2000:])
    assert list((cwd / "eval").glob("kpis_replay*.json"))


def _flags(*traces, fmt=None, scale=None, loop=False):
    import argparse

    return argparse.Namespace(trace=list(traces) or None, trace_format=fmt, trace_scale=scale, trace_loop=loop)


def test_cli_traces_over_the_config_map(tmp_path):
    """A bare --trace replaces the config's traces: map for every region; REGION=FILE sets
    one region over the map; the flags' scale and loop fill what an entry leaves unset."""
    path = tmp_path / "c.yaml"
    path.write_text(SMALL_CLUSTER + f"traces:\n  '*': {FIXTURES / 'burstgpt_small.csv'}\n  r-a23: {{path: {FIXTURES / 'azure2023_small.csv'}, scale: 2}}\n")
    cfg = load_config(path)
    name, plan = cli._replay_plan(cfg, _flags(f"r-moon={FIXTURES / 'mooncake_small.jsonl'}", scale="3"))
    arrivals = np.asarray(plan.params.traffic.replay_arrivals)
    np.testing.assert_allclose(arrivals[0], _padded([3, 0, 2, 4, 1], 6) * 2)  # the entry's own scale
    np.testing.assert_allclose(arrivals[1], np.array([1, 2, 0, 0, 2, 1]) * 3)  # '*' with the flag's scale
    np.testing.assert_allclose(arrivals[3], _padded([3, 1, 2, 1], 6) * 3)  # the flag's region
    assert name == "replay"
    name, plan = cli._replay_plan(cfg, _flags(str(FIXTURES / "mooncake_small.jsonl"), loop=True))
    assert name == "replay-mooncake_small" and plan.num_ticks == 8
    assert plan.notes == ("regions r-a23, r-a24, r-burst, r-moon: mooncake trace " + str(FIXTURES / "mooncake_small.jsonl")
                          + ", 7 requests over 95 s = 4 ticks; scale 1: mean 0.0583 req/s; 2 (28.6 %) longer than the "
                          "4096-token context, rejected; looped 2.00 times to fill env.episode_ticks",)
    with pytest.raises(TraceFormatError, match="not valid JSON"):  # --trace-format applies to every trace
        cli._replay_plan(cfg, _flags(str(FIXTURES / "burstgpt_small.csv"), fmt="mooncake"))
    (tmp_path / "none.yaml").write_text(SMALL_CLUSTER)
    assert cli._replay_plan(load_config(tmp_path / "none.yaml"), _flags()) is None


def test_cli_names_the_config_key_of_a_bad_trace(tmp_path, capsys):
    bad = tmp_path / "t" / "bad.csv"
    bad.parent.mkdir()
    bad.write_text(BURST_HEADER + "5,m,1,1,2,x\n3,m,1,1,2,x\n")
    path = tmp_path / "c.yaml"
    path.write_text(SMALL_CLUSTER + "traces: {r-burst: t/bad.csv}\n")
    code = cli.main(["evaluate", "--policy", "reactive", "--config", str(path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"error: config key 'traces.r-burst': {bad} line 3: Timestamp '3' is earlier"), err


def test_replayed_regions_carry_no_training_randomisation(small_cfg):
    """A run trained with surges and token-length shifts replays its traces as recorded:
    the training distribution's draws stay out of every evaluated region."""
    import dataclasses

    trained = dataclasses.replace(small_cfg, env=dataclasses.replace(small_cfg.env, surge_prob=0.5, token_shift_prob=0.5))
    plan = replay_cluster_params(trained, {"r-moon": TraceReplay(str(FIXTURES / "mooncake_small.jsonl"))}, "diurnal")
    assert plan.params.surge_prob.tolist() == [0.0] * 4
    assert plan.params.token_shift_prob.tolist() == [0.0] * 4
    m = _replay(plan.params, small_cfg.env.action_set, plan.num_ticks)
    plain = _replay(replay_cluster_params(small_cfg, {"r-moon": TraceReplay(str(FIXTURES / "mooncake_small.jsonl"))}, "diurnal").params,
                    small_cfg.env.action_set, plan.num_ticks)
    np.testing.assert_array_equal(m["arrivals"], plain["arrivals"])
    np.testing.assert_array_equal(m["served"], plain["served"])


def test_a_trace_scenario_is_built_only_with_its_own_length(tmp_path):
    """A trace scenario lasts its trace: cluster_params (whose callers run env.episode_ticks)
    refuses it, and scenario_plan, which every evaluation uses, carries the trace's ticks."""
    from aro_jax.config import load_config
    from aro_jax.envs.scenarios import cluster_params, scenario_plan

    traces = tmp_path / "data" / "traces"
    traces.mkdir(parents=True)
    rows = "".join(f"{t}.0,{100 + t},{10 + t}\n" for t in range(0, 100, 5))  # 100 s: 4 ticks of 30 s
    (traces / "AzureLLMInferenceTrace_code.csv").write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + rows)
    cfg = load_config(None, [f"env.data_dir={tmp_path / 'data'}"])
    with pytest.raises(ValueError, match="trace's own length.*scenario_plan"):
        cluster_params(cfg, "trace-code")
    plan = scenario_plan(cfg, "trace-code")
    assert plan.num_ticks == 4 < cfg.env.episode_ticks
    assert scenario_plan(cfg, "diurnal").num_ticks == cfg.env.episode_ticks
