from pathlib import Path

import numpy as np
import pytest

from aro_jax.envs.hardware import PROFILES, QUALITY_TIER, fit_profiles, get_profile

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PREFILL = ("prefill_base_ms", "prefill_ms_per_token", "prefill_ms_per_token_sq")
DECODE = ("decode_base_ms", "decode_ms_per_context_token", "decode_ms_per_seq")
# Bounds on the fit's mean absolute % error; the worst fit in benchmarks/hardware_fit.md
# is 12% (70B H100 TP4 prefill, whose flat-then-linear shape a quadratic cannot follow).
MAPE_BOUND = 15.0
# Prompt lengths within the measured range (splitwise: 128..8192; Llama 2's context window
# is 4096, Touvron et al. 2023), so the quadratic fits are not extrapolated.
L_GRID = np.array([1, 16, 128, 512, 1024, 2048, 4096, 8192], float)
B_GRID = np.array([1, 8, 32, 64, 128, 256], float)


@pytest.fixture(scope="module")
def fits():
    if not (DATA_DIR / "calibration").is_dir():
        pytest.skip(f"calibration data not found at {DATA_DIR}")
    return fit_profiles(DATA_DIR)


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_committed_coefficients_match_refit(fits, name):
    prof, fit = PROFILES[name], fits[name]
    np.testing.assert_allclose([getattr(prof, f) for f in PREFILL], fit["prefill"], rtol=0.01)
    np.testing.assert_allclose([getattr(prof, f) for f in DECODE], fit["decode"], rtol=0.01)
    assert fit["prefill_err"][0] < MAPE_BOUND
    assert fit["decode_err"][0] < MAPE_BOUND


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_profile_is_physical(name):
    p = get_profile(name)
    assert np.all(np.diff(p.prefill_ms(L_GRID)) > 0)
    ctx = 512.0 * B_GRID
    assert np.all(np.diff(p.decode_step_ms(B_GRID, ctx)) > 0)
    assert np.all(np.diff(p.decode_step_ms(8.0, L_GRID)) > 0)
    assert np.all(np.diff(p.decode_step_ms(B_GRID, 4096.0)) > 0)
    assert p.kv_capacity_tokens > 0
    assert p.price_usd_per_h == pytest.approx(p.gpu_price_usd_per_h * p.tensor_parallel)
    assert 0 < p.quality <= 1
    assert QUALITY_TIER[name] in PROFILES


@pytest.mark.parametrize("model_tp", ["llama2-7b-{}-tp1", "llama2-70b-{}-tp4", "llama2-70b-{}-tp8"])
def test_h100_faster_than_a100(model_tp):
    a, h = get_profile(model_tp.format("a100")), get_profile(model_tp.format("h100"))
    assert np.all(h.prefill_ms(L_GRID) < a.prefill_ms(L_GRID))
    for ctx_per_seq in (128.0, 512.0, 2048.0):
        c = B_GRID * ctx_per_seq
        assert np.all(h.decode_step_ms(B_GRID, c) < a.decode_step_ms(B_GRID, c))


@pytest.mark.parametrize("gpu", ["a100", "h100"])
def test_tp8_vs_tp4(gpu):
    tp4, tp8 = get_profile(f"llama2-70b-{gpu}-tp4"), get_profile(f"llama2-70b-{gpu}-tp8")
    long = L_GRID[L_GRID >= 1024]  # short prompts are latency-bound: splitwise shows no gain
    assert np.all(tp8.prefill_ms(long) < tp4.prefill_ms(long))
    assert tp8.kv_capacity_tokens > tp4.kv_capacity_tokens
    # Splitwise decode barely changes from TP4 to TP8 (all-reduce bound): within 10% over
    # the measured range (batch <= 64, prompt 512 + half of 128 output tokens).
    b = B_GRID[B_GRID <= 64]
    assert np.all(tp8.decode_step_ms(b, 576 * b) < 1.1 * tp4.decode_step_ms(b, 576 * b))


def test_unknown_profile_names_valid_choices():
    with pytest.raises(ValueError, match="llama2-70b-h100-tp8"):
        get_profile("gpt-5-tpu")
