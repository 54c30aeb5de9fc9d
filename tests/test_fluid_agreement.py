"""The fluid serving model against the request-level reference simulator (a short version
of benchmarks/fluid_agreement.py), and unit checks of the reference itself."""

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from fluid_agreement import CASES, case_params, capacity_rps, run_fluid, run_reference  # noqa: E402
from reference_sim import EngineSpec, Requests, simulate, summarise  # noqa: E402

REPLICAS = 2
SEEDS = (0, 1)
WARMUP_S, WINDOW_S = 300.0, 900.0
# Aims of the agreement (issue): throughput within 5%, mean end-to-end latency within
# 20% and per-request SLO attainment within 5 points at 0.3-0.9 load; above capacity, the
# share of arrivals not served in the window (drops plus queue growth) within 0.1 absolute
# (the KV-bound engines shed long prompts: benchmarks/fluid_agreement.md).
THROUGHPUT_RTOL, E2E_RTOL, UNSERVED_ATOL, ATTAINMENT_ATOL = 0.05, 0.20, 0.10, 0.05
# One point is looser in this short version (2 seeds, 900 s): 70B chat at 0.7 load, on the
# steep part of its TPOT attainment curve (mean TPOT next to the SLO), where the reference's
# own attainment moves from 0.21 to 0.36 between seed pairs; the fluid model's 0.276 lies
# inside that range, and the benchmark's 3 seeds x 1800 s put the two 4.7 points apart
# (benchmarks/fluid_agreement.md). The bound still fails if the models drift further apart.
KNOWN_ATTAINMENT_GAPS = {("llama2-70b-a100-tp4", "conversation", 0.7): 0.08}


def _compare(profile, mix, load):
    params = case_params(profile, mix)
    rate = load * capacity_rps(params, REPLICAS)
    ref = run_reference(params, REPLICAS, rate, SEEDS, WARMUP_S, WINDOW_S)
    fluid = run_fluid(params, REPLICAS, rate, WARMUP_S, WINDOW_S)
    return ref, fluid


@pytest.mark.parametrize("load", [0.3, 0.5, 0.7, 0.9])
@pytest.mark.parametrize("profile,mix", CASES)
def test_below_capacity_throughput_latency_and_attainment_agree(profile, mix, load):
    ref, fluid = _compare(profile, mix, load)
    assert fluid["throughput_rps"] == pytest.approx(ref["throughput_rps"], rel=THROUGHPUT_RTOL)
    assert fluid["e2e_mean_s"] == pytest.approx(ref["e2e_mean_s"], rel=E2E_RTOL)
    tolerance = KNOWN_ATTAINMENT_GAPS.get((profile, mix, load), ATTAINMENT_ATOL)
    assert fluid["slo_attainment_fraction"] == pytest.approx(ref["slo_attainment_fraction"], abs=tolerance)
    assert ref["drop_fraction"] == 0.0 and fluid["drop_fraction"] == 0.0


@pytest.mark.parametrize("profile,mix", CASES)
def test_tpot_rises_smoothly_with_load_in_both_models(profile, mix):
    """Prefill chunks share iterations with decodes: TPOT grows with every step of load
    (no jump), in the reference and in the fluid model."""
    loads = (0.2, 0.4, 0.6, 0.8)
    ref = [_compare(profile, mix, x) for x in loads]
    for model in (0, 1):
        tpot = np.array([r[model]["tpot_mean_s"] for r in ref])
        assert np.all(np.diff(tpot) > 0)
        assert np.all(tpot[1:] / tpot[:-1] < 2.5)


@pytest.mark.parametrize("load", [1.2, 2.0])
@pytest.mark.parametrize("profile,mix", CASES)
def test_above_capacity_both_shed_a_consistent_share(profile, mix, load):
    ref, fluid = _compare(profile, mix, load)
    offered_excess = 1.0 - 1.0 / load  # what a server at exactly the fluid capacity cannot serve
    assert ref["unserved_fraction"] > 0.5 * offered_excess and fluid["unserved_fraction"] > 0.5 * offered_excess
    assert fluid["unserved_fraction"] == pytest.approx(ref["unserved_fraction"], abs=UNSERVED_ATOL)
    # Both hold a backlog of about the timeout's worth of service.
    assert fluid["queue_to_serve_requests"] == pytest.approx(ref["queue_to_serve_requests"], rel=0.25)


# --- The reference simulator on hand-checkable cases -----------------------------------

SPEC = EngineSpec(
    prefill_base_s=0.01, prefill_s_per_token=1e-4, prefill_s_per_token_sq=0.0,
    decode_base_s=0.02, decode_s_per_context_token=1e-5, decode_s_per_seq=1e-3,
    kv_capacity_tokens=1000.0, max_batch_seqs=8,
)


def _requests(arrival, tokens_in, tokens_out):
    return Requests(np.array(arrival, float), np.array(tokens_in), np.array(tokens_out))


def test_single_request_timeline():
    req = simulate(SPEC, 1, _requests([1.0], [100], [4]), queue_timeout_s=60.0)
    prefill = 0.01 + 100 * 1e-4
    # Three decode iterations (the prefill emitted token 1) at contexts 101, 102, 103.
    decode = sum(0.02 + 1e-5 * c + 1e-3 for c in (101, 102, 103))
    assert req.first_token_s[0] == pytest.approx(1.0 + prefill)
    assert req.finish_s[0] == pytest.approx(1.0 + prefill + decode)


def test_arrivals_during_an_iteration_share_the_next_one_with_the_decodes():
    req = simulate(SPEC, 1, _requests([0.0, 0.025, 0.026], [100, 100, 100], [3, 2, 2]), queue_timeout_s=60.0)
    prefill = 0.01 + 100 * 1e-4
    first_decode_end = prefill + 0.02 + 1e-5 * 101 + 1e-3
    assert req.admit_s[1:].tolist() == pytest.approx([first_decode_end] * 2)
    # One iteration: request 0's second decode token plus both prompts (the decode base
    # exceeds the prefill base, so no extra base).
    mixed = 0.02 + 1e-5 * 102 + 1e-3 + 2 * 100 * 1e-4
    assert req.first_token_s[1:].tolist() == pytest.approx([first_decode_end + mixed] * 2)
    assert req.finish_s[0] == pytest.approx(first_decode_end + mixed)


def test_a_long_prompt_is_prefilled_in_budget_chunks_beside_the_decodes():
    spec = dataclasses.replace(SPEC, token_budget=64)
    # Request 0 (10 tokens, 20 out) is decoding when request 1 (150 tokens) arrives.
    req = simulate(spec, 1, _requests([0.0, 0.021], [10, 150], [20, 2]), queue_timeout_s=60.0)
    # Alone, request 0's decode iterations would take 0.02 + 1e-5 * ctx + 1e-3 each; with
    # request 1 the budget leaves 63 prompt tokens per iteration: chunks 63, 63, 24.
    chunks = [63, 63, 24]
    t0 = 0.01 + 10 * 1e-4  # request 0's prefill
    t1 = t0 + 0.02 + 1e-5 * 11 + 1e-3  # its first decode; request 1 waits for its end
    t = t1
    for i, c in enumerate(chunks):
        t += 0.02 + 1e-5 * (12 + i) + 1e-3 + c * 1e-4
    assert req.admit_s[1] == pytest.approx(t1)
    assert req.first_token_s[1] == pytest.approx(t)
    # The isolated prefill of 150 tokens would be ceil(150 / 64) = 3 iterations.
    assert spec.isolated_prefill_s(150) == pytest.approx(3 * 0.01 + 150 * 1e-4)


def test_per_request_attainment_counts_both_slos_and_drops():
    req = simulate(SPEC, 1, _requests([0.0, 0.001], [100, 100], [50, 50]), queue_timeout_s=60.0)
    ttft = req.first_token_s - req.arrival_s
    tpot = (req.finish_s - req.first_token_s) / 49
    # A TTFT SLO between the two requests' TTFTs and a TPOT SLO both meet: half attain.
    slo = (SPEC, float(ttft.mean()), float(tpot.max()) * 1.01, 0.0)
    m = summarise(req, 0.0, 1.0, slo)
    assert m["slo_attainment"] == pytest.approx(0.5)
    slo = (SPEC, 10.0, float(tpot.min()) * 0.99, 0.0)
    assert summarise(req, 0.0, 1.0, slo)["slo_attainment"] == 0.0


def test_kv_admission_is_fcfs_without_skipping():
    # 600 + 900 reserved tokens exceed the KV (1000): the second waits for the first to
    # finish, and the third (101 tokens, would fit) may not skip ahead of it.
    arrivals, tokens_in, tokens_out = [0.0, 0.001, 0.002], [500, 600, 100], [100, 300, 1]
    req = simulate(SPEC, 1, _requests(arrivals, tokens_in, tokens_out), queue_timeout_s=60.0)
    assert req.admit_s[1] == pytest.approx(req.finish_s[0])
    assert req.admit_s[2] >= req.finish_s[1]
    # With a 1 s timeout both waiting requests are dropped at arrival + timeout.
    req = simulate(SPEC, 1, _requests(arrivals, tokens_in, tokens_out), queue_timeout_s=1.0)
    assert np.isnan(req.admit_s[1:]).all() and req.drop_s[1:].tolist() == pytest.approx([1.001, 1.002])


def test_every_request_is_served_or_dropped_and_dispatch_balances():
    rng = np.random.default_rng(0)
    n = 2000
    req = _requests(np.sort(rng.uniform(0, 100, n)), rng.integers(1, 400, n), rng.integers(1, 50, n))
    simulate(SPEC, 3, req, queue_timeout_s=5.0)
    served, dropped = ~np.isnan(req.finish_s), ~np.isnan(req.drop_s)
    assert np.all(served ^ dropped)
    assert np.all(req.first_token_s[served] <= req.finish_s[served])
    assert np.all(req.admit_s[served] - req.arrival_s[served] <= 5.0)
    assert np.bincount(req.engine, minlength=3).min() > 0.25 * n
    m = summarise(req, 0.0, 100.0)
    assert 0.0 <= m["drop_fraction"] <= 1.0 and m["queue_to_serve_requests"] <= m["queue_requests"]
