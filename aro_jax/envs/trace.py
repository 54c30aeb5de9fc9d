"""Loading and summarising real request traces (pure numpy, no JAX).

The expected CSV layout is the Azure LLM inference trace
(``TIMESTAMP,ContextTokens,GeneratedTokens``); extra columns are ignored.
"""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass
from datetime import datetime
from fractions import Fraction
from pathlib import Path

import numpy as np

TIME_COL = "TIMESTAMP"
INPUT_COL = "ContextTokens"
OUTPUT_COL = "GeneratedTokens"
REQUIRED_COLUMNS = (TIME_COL, INPUT_COL, OUTPUT_COL)

_EPOCH = datetime(1970, 1, 1)
_DATETIME_RE = re.compile(r"(\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2})(?:\.(\d+))?")
_INT_RE = re.compile(r"-?\d+")


class TraceFormatError(ValueError):
    """A trace file that cannot be used; the message names file, line and fix."""


@dataclass(frozen=True, eq=False)  # eq=False: element-wise array equality has no bool
class RequestTrace:
    arrival_s: np.ndarray  # float64, seconds since the first request, sorted
    input_tokens: np.ndarray  # int64
    output_tokens: np.ndarray  # int64
    source: str

    def __post_init__(self):
        n = len(self.arrival_s)
        if n == 0 or len(self.input_tokens) != n or len(self.output_tokens) != n:
            raise ValueError(
                f"{self.source}: trace needs >= 1 request and equal-length arrays, got "
                f"{n}, {len(self.input_tokens)}, {len(self.output_tokens)}"
            )
        # Frozen in spirit too: callers share these arrays, so forbid in-place edits.
        for arr in (self.arrival_s, self.input_tokens, self.output_tokens):
            arr.setflags(write=False)

    @property
    def num_requests(self) -> int:
        return len(self.arrival_s)

    @property
    def duration_s(self) -> float:
        return float(self.arrival_s[-1] - self.arrival_s[0])

    @property
    def mean_rate_rps(self) -> float:
        """Requests per second over the trace span (nan for a zero-length span)."""
        d = self.duration_s
        return self.num_requests / d if d > 0 else math.nan


def _parse_timestamp(text: str) -> Fraction:
    """Exact seconds: the trace has 7 fractional digits, beyond datetime's 6,
    and float64 epoch seconds would lose the last digit."""
    text = text.strip()
    m = _DATETIME_RE.fullmatch(text)
    if m:
        whole = datetime.strptime(m.group(1).replace("T", " "), "%Y-%m-%d %H:%M:%S")
        seconds = Fraction(int((whole - _EPOCH).total_seconds()))
        frac = m.group(2) or "0"
        return seconds + Fraction(int(frac), 10 ** len(frac))
    # float() rejects forms Fraction would take (e.g. "1/2"); finiteness is checked too.
    if not math.isfinite(float(text)):
        raise ValueError(text)
    return Fraction(text)


def _parse_tokens(text: str, where: str, column: str) -> int:
    s = text.strip()
    if not _INT_RE.fullmatch(s):
        raise TraceFormatError(
            f"{where}: {column} {text!r} is not an integer; expected a non-negative integer"
        )
    value = int(s)
    if value < 0:
        raise TraceFormatError(
            f"{where}: {column} {text!r} is negative; expected a non-negative integer"
        )
    return value


def _read_text(path: Path) -> str:
    """The file as text, or a TraceFormatError naming the line of the first byte that is
    not UTF-8 (binary files, latin-1 exports)."""
    data = path.read_bytes()
    try:
        # utf-8-sig: a BOM would otherwise become part of the first column name.
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise TraceFormatError(
            f"{path} line {line}: byte 0x{data[e.start]:02x} is not UTF-8 text "
            f"(a binary file, or another encoding such as latin-1); expected a UTF-8 "
            f"CSV file with columns {','.join(REQUIRED_COLUMNS)}"
        ) from None


def load_trace_csv(path) -> RequestTrace:
    """Read a trace CSV, validating every row; raise TraceFormatError on bad content.
    Messages name the file (full path), the line and what was expected."""
    path = Path(path).absolute()
    name = str(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: trace file not found; expected a CSV file with columns "
            f"{','.join(REQUIRED_COLUMNS)}"
        )
    text = _read_text(path)
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        return _parse(reader, name, path)
    except csv.Error as e:  # NUL bytes, fields over the size limit, ...
        raise TraceFormatError(
            f"{name} line {reader.line_num}: not a CSV row ({e}); expected a CSV file "
            f"with columns {','.join(REQUIRED_COLUMNS)}"
        ) from None


def _parse(reader, name: str, path: Path) -> RequestTrace:
    times, inputs, outputs = [], [], []
    header = next(reader, None)
    if header is None:
        raise TraceFormatError(
            f"{name}: file is empty; expected a header line {','.join(REQUIRED_COLUMNS)}"
        )
    header = [h.strip() for h in header]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise TraceFormatError(
            f"{name} line {reader.line_num}: missing required column(s) "
            f"{', '.join(missing)} (found columns: {', '.join(header)}); "
            f"expected {', '.join(REQUIRED_COLUMNS)}"
        )
    idx = {c: header.index(c) for c in REQUIRED_COLUMNS}
    prev_raw = None
    for row in reader:
        if not row:  # csv yields [] for blank lines
            continue
        where = f"{name} line {reader.line_num}"
        if len(row) < len(header):
            raise TraceFormatError(
                f"{where}: row has {len(row)} fields; expected {len(header)} "
                f"({', '.join(header)})"
            )
        raw_t = row[idx[TIME_COL]]
        try:
            t = _parse_timestamp(raw_t)
        except ValueError:
            raise TraceFormatError(
                f"{where}: {TIME_COL} {raw_t!r} is not a valid timestamp; expected "
                f"'YYYY-MM-DD HH:MM:SS[.fraction]' or seconds as a number"
            ) from None
        if times and t < times[-1]:
            raise TraceFormatError(
                f"{where}: {TIME_COL} {raw_t!r} is earlier than the previous row's "
                f"{prev_raw!r}; expected timestamps sorted non-decreasingly"
            )
        prev_raw = raw_t
        times.append(t)
        inputs.append(_parse_tokens(row[idx[INPUT_COL]], where, INPUT_COL))
        outputs.append(_parse_tokens(row[idx[OUTPUT_COL]], where, OUTPUT_COL))
    if not times:
        raise TraceFormatError(
            f"{name} line 1: header found but no data rows; expected at least one request"
        )
    t0 = times[0]
    return RequestTrace(
        arrival_s=np.array([float(t - t0) for t in times], dtype=np.float64),
        input_tokens=np.array(inputs, dtype=np.int64),
        output_tokens=np.array(outputs, dtype=np.int64),
        source=str(path),
    )


def resample_rates(
    trace: RequestTrace, tick_s: float, target_mean_rps: float | None = None
) -> np.ndarray:
    """Arrival rate (req/s) in each tick of ``tick_s`` seconds over the trace span.

    Without a target, ``rates.sum() * tick_s`` equals the number of requests.
    With one, the profile keeps its shape but is scaled to mean ``target_mean_rps``.
    """
    if not (tick_s > 0 and math.isfinite(tick_s)):
        raise ValueError(f"tick_s must be a positive finite number, got {tick_s!r}")
    if target_mean_rps is not None and not (
        target_mean_rps > 0 and math.isfinite(target_mean_rps)
    ):
        raise ValueError(
            f"target_mean_rps must be a positive finite number, got {target_mean_rps!r}"
        )
    n_ticks = max(1, math.ceil(trace.duration_s / tick_s))
    # The last arrival sits exactly on the span's end when it is a whole number of
    # ticks; clip it into the final tick rather than open an extra, near-empty one.
    bins = np.minimum((trace.arrival_s / tick_s).astype(np.int64), n_ticks - 1)
    rates = np.bincount(bins, minlength=n_ticks).astype(np.float64) / tick_s
    if target_mean_rps is not None:
        rates *= target_mean_rps / rates.mean()  # mean > 0: a trace has >= 1 request
    return rates


def fit_lognormal(tokens) -> tuple[float, float]:
    """Maximum-likelihood log-normal fit: (mean, sd) of log(tokens), zeros ignored."""
    tokens = np.asarray(tokens)
    if np.any(tokens < 0):
        raise ValueError("token counts must be non-negative")
    positive = tokens[tokens > 0]
    if positive.size == 0:
        raise ValueError("no positive token counts to fit a log-normal to")
    logs = np.log(positive.astype(np.float64))
    return float(logs.mean()), float(logs.std())  # ddof=0 is the MLE


def inter_arrival_cv(trace: RequestTrace) -> float:
    """Coefficient of variation of inter-arrival gaps (1 for a Poisson process)."""
    gaps = np.diff(trace.arrival_s)
    if gaps.size == 0 or gaps.mean() <= 0:
        raise ValueError(
            f"{trace.source}: need at least two distinct arrival times for an "
            "inter-arrival CV"
        )
    return float(gaps.std() / gaps.mean())


def replay_series(trace: RequestTrace, tick_s: float, max_context_tokens: float) -> dict[str, np.ndarray]:
    """Per tick of ``tick_s`` over the trace span: requests arriving (``arrivals``, all of
    them), the share longer than the context window (``rejected_share``), and the mean and
    sd of log input/output lengths of the admitted ones (ticks without admitted requests,
    or with one, take the whole trace's; a sd is at least 0.05)."""
    n_ticks = max(1, math.ceil(trace.duration_s / tick_s))
    bins = np.minimum((trace.arrival_s / tick_s).astype(np.int64), n_ticks - 1)
    arrivals = np.bincount(bins, minlength=n_ticks).astype(np.float64)
    admitted = trace.input_tokens <= max_context_tokens
    rejected = np.bincount(bins[~admitted], minlength=n_ticks)
    out = {"arrivals": arrivals, "rejected_share": rejected / np.maximum(arrivals, 1.0)}
    keep = bins[admitted]
    count = np.bincount(keep, minlength=n_ticks)
    for name, tokens in (("input", trace.input_tokens), ("output", trace.output_tokens)):
        logs = np.log(np.maximum(tokens[admitted], 1).astype(np.float64))
        whole_mean = logs.mean() if logs.size else 0.0
        whole_sd = max(logs.std(), 0.05) if logs.size else 1.0
        s1 = np.bincount(keep, logs, minlength=n_ticks)
        s2 = np.bincount(keep, logs**2, minlength=n_ticks)
        mean = s1 / np.maximum(count, 1)
        sd = np.sqrt(np.maximum(s2 / np.maximum(count, 1) - mean**2, 0.0))
        few = count < 2
        out[f"{name}_log_mean"] = np.where(count < 1, whole_mean, mean)
        out[f"{name}_log_sd"] = np.where(few, whole_sd, np.maximum(sd, 0.05))
    return out
