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
