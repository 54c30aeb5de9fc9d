"""Request-level reference simulator of one replica pool, for checking the fluid model.

N replicas, each an independent vLLM-like engine (iteration-level continuous batching,
no chunked prefill), driven by the same `ServiceCurve` as `aro_jax.envs.serving`:

- Dispatch (default): each arrival goes to the engine with the fewest outstanding
  requests (waiting + in service; ties to the lowest index), the "least outstanding
  requests" policy of common L7 load balancers (join-the-shortest-queue). Round-robin and
  uniform random dispatch are options, for comparison.
- Queue: FCFS per engine. A request still waiting `queue_timeout_s` after its arrival
  is dropped (at arrival + timeout).
- Admission, at every iteration boundary: take waiting requests in FCFS order while the
  batch has fewer than `max_batch_seqs` sequences and the KV cache can hold the request's
  whole footprint, prompt + output tokens. Full reservation (a token budget of prompt +
  output length, as TGI's router keeps) needs no preemption or recomputation. vLLM's
  incremental allocation holds about prompt + half the output instead; that changes
  little here: the 70B conversation batch is capped by `max_batch_seqs` either way, and
  code outputs are ~2% of the prompt. The head of the queue blocks those behind it (no
  skipping), as in vLLM's FCFS scheduler.
- Iterations, prefill first: if anything was admitted, one iteration runs all their
  prefills, lasting the sum of `prefill_s(L)`; it emits each request's first token
  (TTFT). Otherwise one decode iteration runs for all running sequences, lasting
  `decode_base + decode_per_context_token * sum(context) + decode_per_seq * B`, and
  emits one token for each. A request with n output tokens needs one prefill and n - 1
  decode iterations; at its j-th decode iteration its context is L + j tokens.
- Token lengths: log-normal (TrafficParams), rounded, clipped to [1, max_context_tokens]
  each, as `traffic.token_stats` assumes.

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

    @classmethod
    def from_curve(cls, curve) -> "EngineSpec":
        f = lambda name: float(getattr(curve, name))  # noqa: E731
        return cls(
            f("prefill_base_s"), f("prefill_s_per_token"), f("prefill_s_per_token_sq"),
            f("decode_base_s"), f("decode_s_per_context_token"), f("decode_s_per_seq"),
            f("kv_capacity_tokens"), int(f("max_batch_seqs")),
        )

    def prefill_s(self, tokens):
        return self.prefill_base_s + tokens * (self.prefill_s_per_token + tokens * self.prefill_s_per_token_sq)


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

    def lengths(log_mean, log_sd):
        x = np.rint(rng.lognormal(float(log_mean), float(log_sd), n))
        return np.clip(x, 1.0, cap).astype(np.int64)

    return Requests(
        arrival, lengths(traffic.input_log_mean, traffic.input_log_sd),
        lengths(traffic.output_log_mean, traffic.output_log_sd),
    )


class _Engine:
    __slots__ = ("t", "queue", "running", "iters", "batch", "context", "kv_used", "outstanding", "busy")

    def __init__(self):
        self.t = np.inf  # time of its next scheduling decision (inf: idle)
        self.queue = deque()  # waiting request ids, FCFS
        self.running = []  # heap of (decode iteration it finishes after, request id)
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
    d_base, d_ctx, d_seq = spec.decode_base_s, spec.decode_s_per_context_token, spec.decode_s_per_seq
    prefill_s = spec.prefill_s
    engines = [_Engine() for _ in range(replicas)]
    pick = np.random.default_rng(seed).integers(0, replicas, n) if dispatch == "random" else None

    def purge(e, now):
        q = e.queue
        while q and arrival[q[0]] + queue_timeout_s < now:
            r = q.popleft()
            drop[r] = arrival[r] + queue_timeout_s
            e.outstanding -= 1

    def advance(e, until):
        """Run e's scheduling decisions at times <= until."""
        while e.t <= until:
            now = e.t
            purge(e, now)
            q = e.queue
            new = []
            while q and e.batch + len(new) < max_b:
                r = q[0]
                need = tin[r] + tout[r]
                if e.kv_used + need > kv_cap:
                    break
                q.popleft()
                e.kv_used += need
                new.append(r)
            if new:
                dt = sum(prefill_s(tin[r]) for r in new)
                end = now + dt
                for r in new:
                    admit[r] = now
                    first[r] = end
                    if tout[r] == 1:
                        finish[r] = end
                        e.kv_used -= tin[r] + 1
                        e.outstanding -= 1
                    else:
                        heapq.heappush(e.running, (e.iters + tout[r] - 1, r))
                        e.batch += 1
                        e.context += tin[r] + 1
            elif e.batch:
                dt = d_base + d_ctx * e.context + d_seq * e.batch
                end = now + dt
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
            else:
                e.t = np.inf  # idle until the next dispatch (the queue is empty here)
                break
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


def summarise(req: Requests, start_s: float, end_s: float) -> dict[str, float]:
    """Metrics over the window [start_s, end_s): throughput from completions in it;
    latencies and drops of the requests that arrived in it; queues at end_s."""
    dropped = ~np.isnan(req.drop_s)
    completed = (req.finish_s >= start_s) & (req.finish_s < end_s)
    arrived = (req.arrival_s >= start_s) & (req.arrival_s < end_s)
    served = arrived & ~dropped
    e2e = (req.finish_s - req.arrival_s)[served]
    ttft = (req.first_token_s - req.arrival_s)[served]
    left_queue_s = np.where(dropped, req.drop_s, req.admit_s)
    waiting = (req.arrival_s <= end_s) & (left_queue_s > end_s)
    # What the fluid model's queue holds: it drops at once the requests that cannot start
    # within the timeout, while here they wait until their timeout passes.
    waiting_to_serve = waiting & ~dropped
    return {
        "throughput_rps": float(completed.sum()) / (end_s - start_s),
        "ttft_mean_s": float(ttft.mean()) if ttft.size else np.nan,
        "e2e_mean_s": float(e2e.mean()) if e2e.size else np.nan,
        "e2e_p95_s": float(np.percentile(e2e, 95)) if e2e.size else np.nan,
        "drop_fraction": float(dropped[arrived].mean()) if arrived.any() else 0.0,
        "queue_requests": float(waiting.sum()),
        "queue_to_serve_requests": float(waiting_to_serve.sum()),
    }
