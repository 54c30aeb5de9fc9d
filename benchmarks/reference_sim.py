"""Request-level reference simulator of one replica pool, for checking the fluid model.

N replicas, each an independent vLLM V1-like engine (iteration-level continuous batching
with chunked prefill), driven by the same `ServiceCurve` as `aro_jax.envs.serving`:

- Dispatch (default): each arrival goes to the engine with the fewest outstanding
  requests (waiting + in service; ties to the lowest index), the "least outstanding
  requests" policy of common L7 load balancers (join-the-shortest-queue). Round-robin and
  uniform random dispatch are options, for comparison.
- Queue: FCFS per engine. A request still waiting `queue_timeout_s` after its arrival
  is dropped (at arrival + timeout).
- Iterations with a token budget (vLLM V1 scheduler, max_num_batched_tokens): every
  iteration first gives each decoding sequence its one token, then the partially
  prefilled requests (in admission order) their next chunk, then admits waiting
  requests in FCFS order while the budget lasts, the batch has fewer than
  `max_batch_seqs` sequences and the KV cache can hold the request's whole footprint
  (prompt + output: full reservation, so no preemption); an admitted request's prompt
  is prefilled in chunks of whatever budget is left. The head of the queue blocks those
  behind it (no skipping), as in vLLM's FCFS scheduler.
- Iteration time: decode_base + decode cost of the B decoding sequences (the fit up to
  `decode_calibrated_seqs`, roofline increments beyond; `decode_lin_s`) + for each prefill
  chunk of c tokens at offset o, `prefill_s_per_token * c + prefill_s_per_token_sq *
  ((o + c)^2 - o^2)` (so a whole prompt costs its calibrated prefill time), plus the
  prefill base where it exceeds the decode base (the whole prefill base when no
  sequence decodes). The iteration completing a prompt emits its first token (TTFT); each
  decode iteration emits one token per decoding sequence. A request with n output tokens
  needs n - 1 decode iterations; at its j-th its context is L + j tokens.
- Token lengths: log-normal (TrafficParams), rounded; prompts from the log-normal
  truncated at max_context_tokens (the admitted ones: the server rejects longer prompts),
  outputs clipped to [1, max_context_tokens], as `traffic.token_stats` assumes.

All times are in seconds. Pure Python + numpy; a heap per engine finds finishing
sequences, so the cost is O(iterations + requests log B).
"""

from __future__ import annotations

import dataclasses
import heapq
from collections import deque

import numpy as np


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    """Service-time constants of one engine (plain floats, from a ServiceCurve)."""

    prefill_base_s: float
    prefill_s_per_token: float
    prefill_s_per_token_sq: float
    decode_base_s: float
    decode_s_per_context_token: float
    decode_s_per_seq: float
    kv_capacity_tokens: float
    max_batch_seqs: int
    token_budget: int = 1 << 30  # max_num_batched_tokens (default: unbounded)
    decode_calibrated_seqs: int = 1 << 30
    roof_s_per_seq: float = 0.0
    roof_s_per_context_token: float = 0.0

    @classmethod
    def from_curve(cls, curve) -> "EngineSpec":
        f = lambda name: float(getattr(curve, name))  # noqa: E731
        return cls(
            f("prefill_base_s"), f("prefill_s_per_token"), f("prefill_s_per_token_sq"),
            f("decode_base_s"), f("decode_s_per_context_token"), f("decode_s_per_seq"),
            f("kv_capacity_tokens"), int(f("max_batch_seqs")), int(f("token_budget")),
            int(f("decode_calibrated_seqs")), f("roof_s_per_seq"), f("roof_s_per_context_token"),
        )

    def prefill_s(self, tokens):
        return self.prefill_base_s + tokens * (self.prefill_s_per_token + tokens * self.prefill_s_per_token_sq)

    def isolated_prefill_s(self, tokens):
        """Prefill of one prompt alone on an idle engine: ceil(L / budget) iterations."""
        iters = np.ceil(np.asarray(tokens, float) / self.token_budget)
        return iters * self.prefill_base_s + tokens * (self.prefill_s_per_token + tokens * self.prefill_s_per_token_sq)

    def decode_lin_s(self, batch, context):
        """Decode step time above its base for `batch` sequences holding `context` tokens."""
        bc = self.decode_calibrated_seqs
        if batch <= bc:
            return self.decode_s_per_context_token * context + self.decode_s_per_seq * batch
        ctx = context / batch
        fit = self.decode_s_per_seq + self.decode_s_per_context_token * ctx
        roof = max(self.roof_s_per_seq, self.roof_s_per_context_token * ctx)
        return fit * bc + min(fit, roof) * (batch - bc)


@dataclasses.dataclass
class Requests:
    """Per-request inputs and outcomes (arrays of length n, times in s; NaN = never)."""

    arrival_s: np.ndarray
    input_tokens: np.ndarray
    output_tokens: np.ndarray
    admit_s: np.ndarray = None  # start of its prefill iteration
    first_token_s: np.ndarray = None
    finish_s: np.ndarray = None
    drop_s: np.ndarray = None  # arrival + timeout for dropped requests
    engine: np.ndarray = None


def sample_requests(rng: np.random.Generator, rate_rps: float, duration_s: float, traffic) -> Requests:
    """Poisson arrivals at `rate_rps` over [0, duration_s) with log-normal token lengths."""
    n = rng.poisson(rate_rps * duration_s)
    arrival = np.sort(rng.uniform(0.0, duration_s, n))
    cap = float(traffic.max_context_tokens)

    def lengths(log_mean, log_sd, truncate=False):
        x = np.rint(rng.lognormal(float(log_mean), float(log_sd), n))
        while truncate and (over := x > cap).any():  # redraw the rejected: the admitted stream
            x[over] = np.rint(rng.lognormal(float(log_mean), float(log_sd), int(over.sum())))
        return np.clip(x, 1.0, cap).astype(np.int64)

    return Requests(
        arrival, lengths(traffic.input_log_mean, traffic.input_log_sd, truncate=True),
        lengths(traffic.output_log_mean, traffic.output_log_sd),
    )


class _Engine:
    __slots__ = ("t", "queue", "running", "prefilling", "iters", "batch", "context", "kv_used", "outstanding", "busy")

    def __init__(self):
        self.t = np.inf  # time of its next scheduling decision (inf: idle)
        self.queue = deque()  # waiting request ids, FCFS
        self.running = []  # heap of (decode iteration it finishes after, request id)
        self.prefilling = []  # [request id, prompt tokens done] of admitted prompts, in order
        self.iters = 0  # decode iterations done so far
        self.batch = 0  # running sequences
        self.context = 0  # sum of their contexts at the next decode iteration
        self.kv_used = 0  # reserved KV tokens
        self.outstanding = 0  # waiting + admitted, not finished or dropped
        self.busy = 0.0  # seconds spent in iterations


DISPATCH = ("least_outstanding", "round_robin", "random")


def simulate(
    spec: EngineSpec, replicas: int, req: Requests, queue_timeout_s: float,
    dispatch: str = "least_outstanding", seed: int = 0,
) -> Requests:
    """Run the pool over all requests until every one is finished or dropped.

    Fills `req.admit_s`, `first_token_s`, `finish_s`, `drop_s`, `engine` in place and
    returns `req`. `req.arrival_s` must be sorted. `dispatch`: one of DISPATCH (`seed`
    drives "random").
    """
    if dispatch not in DISPATCH:
        raise ValueError(f"dispatch must be one of {DISPATCH}, got {dispatch!r}")
    n = len(req.arrival_s)
    if n and int((req.input_tokens + req.output_tokens).max()) > spec.kv_capacity_tokens:
        raise ValueError("a request's KV footprint exceeds the engine's KV capacity")
    arrival = req.arrival_s.tolist()
    tin = req.input_tokens.tolist()
    tout = req.output_tokens.tolist()
    admit = [np.nan] * n
    first = [np.nan] * n
    finish = [np.nan] * n
    drop = [np.nan] * n
    where = [-1] * n
    kv_cap, max_b = spec.kv_capacity_tokens, spec.max_batch_seqs
    d_base = spec.decode_base_s
    engines = [_Engine() for _ in range(replicas)]
    pick = np.random.default_rng(seed).integers(0, replicas, n) if dispatch == "random" else None

    def purge(e, now):
        q = e.queue
        while q and arrival[q[0]] + queue_timeout_s < now:
            r = q.popleft()
            drop[r] = arrival[r] + queue_timeout_s
            e.outstanding -= 1

    budget_max = spec.token_budget
    p_base, p_lin, p_sq = spec.prefill_base_s, spec.prefill_s_per_token, spec.prefill_s_per_token_sq
    extra_base = max(p_base - d_base, 0.0)
    decode_lin = spec.decode_lin_s

    def advance(e, until):
        """Run e's scheduling decisions at times <= until."""
        while e.t <= until:
            now = e.t
            purge(e, now)
            budget = budget_max - e.batch
            chunks = []  # (entry, tokens this iteration)
            for entry in e.prefilling:
                if budget <= 0:
                    break
                c = min(tin[entry[0]] - entry[1], budget)
                chunks.append((entry, c))
                budget -= c
            q = e.queue
            while q and budget > 0 and e.batch + len(e.prefilling) < max_b:
                r = q[0]
                need = tin[r] + tout[r]
                if e.kv_used + need > kv_cap:
                    break
                q.popleft()
                e.kv_used += need
                admit[r] = now
                entry = [r, 0]
                e.prefilling.append(entry)
                c = min(tin[r], budget)
                chunks.append((entry, c))
                budget -= c
            if not chunks and not e.batch:
                e.t = np.inf  # idle until the next dispatch (the queue is empty here)
                break
            dt = 0.0
            if e.batch:
                dt += d_base + decode_lin(e.batch, e.context)
            if chunks:
                dt += extra_base if e.batch else p_base
                for entry, c in chunks:
                    o = entry[1]
                    dt += p_lin * c + p_sq * ((o + c) * (o + c) - o * o)
            end = now + dt
            if e.batch:
                e.iters += 1
                e.context += e.batch
                run = e.running
                while run and run[0][0] == e.iters:
                    r = heapq.heappop(run)[1]
                    finish[r] = end
                    e.batch -= 1
                    e.context -= tin[r] + tout[r]
                    e.kv_used -= tin[r] + tout[r]
                    e.outstanding -= 1
            done_any = False
            for entry, c in chunks:
                entry[1] += c
                r = entry[0]
                if entry[1] < tin[r]:
                    continue
                done_any = True
                first[r] = end
                if tout[r] == 1:
                    finish[r] = end
                    e.kv_used -= tin[r] + 1
                    e.outstanding -= 1
                else:
                    heapq.heappush(e.running, (e.iters + tout[r] - 1, r))
                    e.batch += 1
                    e.context += tin[r] + 1
            if done_any:
                e.prefilling = [x for x in e.prefilling if x[1] < tin[x[0]]]
            e.busy += dt
            e.t = end

    for i in range(n):
        a = arrival[i]
        for e in engines:
            advance(e, a)
            purge(e, a)
        if dispatch == "least_outstanding":
            k = min(range(replicas), key=lambda j: engines[j].outstanding)
        elif dispatch == "round_robin":
            k = i % replicas
        else:
            k = int(pick[i])
        e = engines[k]
        e.queue.append(i)
        e.outstanding += 1
        where[i] = k
        if e.t == np.inf:
            e.t = a
    for e in engines:
        advance(e, np.inf)
        purge(e, np.inf)

    req.admit_s = np.array(admit)
    req.first_token_s = np.array(first)
    req.finish_s = np.array(finish)
    req.drop_s = np.array(drop)
    req.engine = np.array(where)
    return req


def ttft_budget_s(spec: EngineSpec, input_tokens, slo_ttft_s: float, slack: float):
    """A prompt's TTFT budget: the SLO, or `slack` x its idle prefill time if larger
    (the rule of aro_jax.envs.fluid.ttft_budget_s)."""
    return np.maximum(slo_ttft_s, slack * spec.isolated_prefill_s(np.asarray(input_tokens, float)))


def summarise(req: Requests, start_s: float, end_s: float, slo=None) -> dict[str, float]:
    """Metrics over the window [start_s, end_s): throughput from completions in it;
    latencies and drops of the requests that arrived in it; queues at end_s.

    `slo`: optional (spec, slo_ttft_s, slo_tpot_s, slack); adds `slo_attainment`, the share
    of the window's arrivals served with TTFT within its budget and time per output
    token ((finish - first token) / (n - 1)) within the TPOT SLO (drops miss)."""
    dropped = ~np.isnan(req.drop_s)
    completed = (req.finish_s >= start_s) & (req.finish_s < end_s)
    arrived = (req.arrival_s >= start_s) & (req.arrival_s < end_s)
    served = arrived & ~dropped
    e2e = (req.finish_s - req.arrival_s)[served]
    ttft = (req.first_token_s - req.arrival_s)[served]
    multi = served & (req.output_tokens > 1)
    tpot = ((req.finish_s - req.first_token_s) / np.maximum(req.output_tokens - 1, 1))[multi]
    left_queue_s = np.where(dropped, req.drop_s, req.admit_s)
    waiting = (req.arrival_s <= end_s) & (left_queue_s > end_s)
    # What the fluid model's queue holds: it drops at once the requests that cannot start
    # within the timeout, while here they wait until their timeout passes.
    waiting_to_serve = waiting & ~dropped
    out = {
        "throughput_rps": float(completed.sum()) / (end_s - start_s),
        "ttft_mean_s": float(ttft.mean()) if ttft.size else np.nan,
        "ttft_p95_s": float(np.percentile(ttft, 95)) if ttft.size else np.nan,
        "tpot_mean_s": float(tpot.mean()) if tpot.size else np.nan,
        "tpot_p95_s": float(np.percentile(tpot, 95)) if tpot.size else np.nan,
        "e2e_mean_s": float(e2e.mean()) if e2e.size else np.nan,
        "e2e_p95_s": float(np.percentile(e2e, 95)) if e2e.size else np.nan,
        "drop_fraction": float(dropped[arrived].mean()) if arrived.any() else 0.0,
        "queue_requests": float(waiting.sum()),
        "queue_to_serve_requests": float(waiting_to_serve.sum()),
    }
    if slo is not None:
        spec, slo_ttft_s, slo_tpot_s, slack = slo
        with np.errstate(invalid="ignore"):
            budget = ttft_budget_s(spec, req.input_tokens, slo_ttft_s, slack)
            ttft_ok = (req.first_token_s - req.arrival_s) <= budget
            tpot_all = (req.finish_s - req.first_token_s) / np.maximum(req.output_tokens - 1, 1)
            tpot_ok = (req.output_tokens <= 1) | (tpot_all <= slo_tpot_s)
        ok = ~dropped & ttft_ok & tpot_ok
        out["slo_attainment"] = float(ok[arrived].mean()) if arrived.any() else 1.0
        out["ttft_attainment"] = float((~dropped & ttft_ok)[arrived].mean()) if arrived.any() else 1.0
        out["tpot_attainment"] = float((~dropped & tpot_ok)[arrived].mean()) if arrived.any() else 1.0
    return out
