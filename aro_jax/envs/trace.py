"""Loading and summarising real request traces (pure numpy, no JAX).

Formats (`load_trace(path, fmt)`; detected from the header or first line when `fmt` is None):
- ``azure``: the Azure LLM inference CSVs, 2023 (one hour) and 2024 (one week):
  ``TIMESTAMP,ContextTokens,GeneratedTokens``; timestamps are date-times (2024's carry a
  UTC offset) or seconds.
- ``burstgpt``: BurstGPT CSV ``Timestamp,Model,Request tokens,Response tokens,Total
  tokens,Log Type``; Timestamp in seconds from the trace's start. Failed requests (0
  response tokens) are kept: they arrived all the same.
- ``mooncake``: JSON lines with ``timestamp`` (ms), ``input_length``, ``output_length``.
Extra columns or keys are ignored. Times must be sorted (equal times are fine).
"""

from __future__ import annotations

import csv
import json
import math
import re
from array import array
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
# Date, hour, minute, second, fraction (digits past the 9th, below a nanosecond, dropped),
# UTC offset.
_DATETIME_RE = re.compile(
    r"\s*(\d{4}-\d{2}-\d{2})[ T](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9})\d*)?\s*(Z|[+-]\d{2}:?\d{2})?\s*",
    re.IGNORECASE,
)
_DECIMAL_RE = re.compile(r"\s*(-?)(\d+)(?:\.(\d{0,9})\d*)?\s*")
_INT_RE = re.compile(r"-?\d+")
_NS = 10**9  # times are kept in integer nanoseconds: exact, and cheap to compare
_EPOCH_DAYS: dict[str, int] = {}  # "YYYY-MM-DD" -> seconds since 1970 of its midnight


class TraceFormatError(ValueError):
    """A trace file that cannot be used; the message names file, line and fix."""


@dataclass(frozen=True)
class _CsvFormat:
    name: str
    columns: tuple[str, str, str]  # time, input tokens, output tokens
    time_help: str  # what a valid time looks like
    datetimes: bool  # whether date-time timestamps are allowed besides seconds


_AZURE = _CsvFormat("azure", REQUIRED_COLUMNS, "'YYYY-MM-DD HH:MM:SS[.fraction][+HH:MM]' or seconds as a number", True)
_BURSTGPT = _CsvFormat("burstgpt", ("Timestamp", "Request tokens", "Response tokens"), "seconds from the trace's start as a number", False)
MOONCAKE_KEYS = ("timestamp", "input_length", "output_length")
FORMATS = ("azure", "burstgpt", "mooncake")
_EXPECTED = {
    "azure": f"an Azure LLM inference CSV with columns {','.join(_AZURE.columns)}",
    "burstgpt": f"a BurstGPT CSV with columns {','.join(_BURSTGPT.columns)} (and Model, Total tokens, Log Type)",
    "mooncake": f"Mooncake JSON lines, one object per line with keys {', '.join(MOONCAKE_KEYS)} (timestamp in ms)",
}
_ANY_FORMAT = "; or ".join(_EXPECTED.values())


@dataclass(frozen=True, eq=False)  # eq=False: element-wise array equality has no bool
class RequestTrace:
    arrival_s: np.ndarray  # float64, seconds since the first request, sorted
    input_tokens: np.ndarray  # int64
    output_tokens: np.ndarray  # int64
    source: str
    format: str = "azure"

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


def _parse_seconds(text: str) -> int:
    """Seconds written as a number, in integer nanoseconds (ValueError if it is none)."""
    m = _DECIMAL_RE.fullmatch(text)
    if m:
        sign, whole, frac = m.groups()
        ns = int(whole) * _NS + int((frac or "").ljust(9, "0"))
        return -ns if sign else ns
    # Exponents and the like; float() rejects forms Fraction would take (e.g. "1/2").
    if not math.isfinite(float(text)):
        raise ValueError(text)
    return round(Fraction(text.strip()) * _NS)


def _parse_timestamp(text: str) -> int:
    """Integer nanoseconds since 1970 (UTC): exact where float64 epoch seconds would lose
    the 2023 trace's 7th fractional digit. A UTC offset (the 2024 trace's) is applied, so
    timestamps in different offsets compare correctly. Plain numbers are seconds."""
    m = _DATETIME_RE.fullmatch(text)
    if not m:
        return _parse_seconds(text)
    date, hh, mm, ss, frac, offset = m.groups()
    day = _EPOCH_DAYS.get(date)
    if day is None:  # a trace spans few dates: validate and convert each once
        day = int((datetime.strptime(date, "%Y-%m-%d") - _EPOCH).total_seconds())
        _EPOCH_DAYS[date] = day
    h, mi, sec = int(hh), int(mm), int(ss)
    if h > 23 or mi > 59 or sec > 61:  # 60, 61: leap seconds, as strptime allows
        raise ValueError(text)
    seconds = day + 3600 * h + 60 * mi + sec
    if offset and offset.upper() != "Z":
        off = 3600 * int(offset[1:3]) + 60 * int(offset[-2:])
        seconds -= off if offset[0] == "+" else -off
    return seconds * _NS + (int(frac.ljust(9, "0")) if frac else 0)


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


def _read_text(path: Path, expected: str = _EXPECTED["azure"]) -> str:
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
            f"text file: {expected}"
        ) from None


def _check_file(path) -> Path:
    path = Path(path).absolute()
    if path.is_dir():
        raise FileNotFoundError(f"{path}: is a directory, not a trace file; pass the trace file itself")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: trace file not found; expected {_ANY_FORMAT}")
    return path


def load_trace_csv(path) -> RequestTrace:
    """Read an Azure trace CSV, validating every row; raise TraceFormatError on bad
    content. Messages name the file (full path), the line and what was expected."""
    return load_trace(path, "azure")


def load_trace(path, fmt: str | None = None) -> RequestTrace:
    """Read a request trace of any supported format (`FORMATS`; None or "auto": detected
    from the header or first line), validating every record. Raises FileNotFoundError or
    TraceFormatError, naming the file (full path), the line, the problem and the fix.
    The file is streamed (a week-long trace need not fit in memory as text)."""
    if fmt not in (None, "auto", *FORMATS):
        raise ValueError(f"unknown trace format {fmt!r}; choose one of {', '.join(FORMATS)}")
    path = _check_file(path)
    expected = _EXPECTED.get(fmt, _ANY_FORMAT)
    try:
        if fmt in (None, "auto"):
            fmt = _detect(path)
        with open(path, encoding="utf-8-sig", newline="") as f:
            if fmt == "mooncake":
                return _parse_jsonl(f, path)
            reader = csv.reader(f)
            try:
                return _parse_csv(reader, str(path), path, _AZURE if fmt == "azure" else _BURSTGPT)
            except csv.Error as e:  # fields over the size limit, ...
                raise TraceFormatError(
                    f"{path} line {reader.line_num}: not a CSV row ({e}); expected {_EXPECTED[fmt]}"
                ) from None
    except UnicodeDecodeError:
        _read_text(path, expected)  # raises, naming the line of the first bad byte
        raise


def _detect(path: Path) -> str:
    with open(path, encoding="utf-8-sig", newline="") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                return detect_format(line, str(path), lineno)
    raise TraceFormatError(f"{path}: file is empty; expected {_ANY_FORMAT}")


def detect_format(text: str, name: str, first_line: int = 1) -> str:
    """The format of a trace from its text (or its first non-blank line, numbered
    `first_line`): JSON lines if it opens with an object, else the CSV header's columns."""
    lines = text.split("\n")
    for lineno, line in enumerate(lines, first_line):
        if not line.strip():
            continue
        if "\x00" in line:
            raise TraceFormatError(
                f"{name} line {lineno}: NUL byte (a binary file, not a text trace); expected {_ANY_FORMAT}"
            )
        if line.lstrip().startswith("{"):
            return "mooncake"
        header = {h.strip().casefold() for h in next(csv.reader([line]), [])}
        for spec in (_AZURE, _BURSTGPT):
            if all(c.casefold() in header for c in spec.columns):
                return spec.name
        raise TraceFormatError(
            f"{name} line {lineno}: cannot tell the trace format from {_one_line(line)!r}; "
            f"expected {_ANY_FORMAT}. If it is one of these with other column names, rename "
            f"them; pass the format (--trace-format azure|burstgpt|mooncake) to see what is "
            f"missing"
        )
    raise TraceFormatError(f"{name}: file is empty; expected {_ANY_FORMAT}")


def _one_line(text: str, limit: int = 120) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _unsorted(where: str, what: str, raw, prev_raw) -> TraceFormatError:
    return TraceFormatError(
        f"{where}: {what} {raw!r} is earlier than the previous row's {prev_raw!r}; expected "
        f"timestamps sorted non-decreasingly (sort the file by time before replaying it)"
    )


def _append_ns(times: array, t: int, where: str, what: str, raw) -> None:
    try:
        times.append(t)
    except OverflowError:  # beyond int64 nanoseconds: about 292 years from 1970
        raise TraceFormatError(f"{where}: {what} {raw!r} is out of range; expected a time within 1678-2262 or seconds below 9.2e9") from None


def _parse_csv(reader, name: str, path: Path, spec: _CsvFormat) -> RequestTrace:
    times, inputs, outputs = array("q"), array("q"), array("q")
    time_col, input_col, output_col = spec.columns
    header = next(reader, None)
    while header is not None and not header:  # blank lines before the header
        header = next(reader, None)
    if header is None:
        raise TraceFormatError(
            f"{name}: file is empty; expected a header line {','.join(spec.columns)}"
        )
    header = [h.strip() for h in header]
    folded = [h.casefold() for h in header]
    missing = [c for c in spec.columns if c.casefold() not in folded]
    if missing:
        raise TraceFormatError(
            f"{name} line {reader.line_num}: missing required column(s) "
            f"{', '.join(missing)} (found columns: {', '.join(header)}); "
            f"expected {', '.join(spec.columns)}"
        )
    it, ii, io_ = (folded.index(c.casefold()) for c in spec.columns)
    width = len(header)
    header_line = reader.line_num
    parse_time = _parse_timestamp if spec.datetimes else _parse_seconds
    prev = prev_raw = None
    for row in reader:
        if not row:  # csv yields [] for blank lines
            continue
        try:  # the common case without building messages; any problem is re-read below
            if len(row) < width:
                raise ValueError
            raw_t = row[it]
            t = parse_time(raw_t)
            a, b = row[ii], row[io_]
            if not (a.isdigit() and b.isdigit() and a.isascii() and b.isascii()):
                raise ValueError
            if prev is not None and t < prev:
                raise ValueError
            times.append(t)
            inputs.append(int(a))
            outputs.append(int(b))
        except (ValueError, OverflowError):
            where = f"{name} line {reader.line_num}"
            if len(row) < width:
                raise TraceFormatError(
                    f"{where}: row has {len(row)} fields; expected {width} ({', '.join(header)})"
                ) from None
            raw_t = row[it]
            try:
                t = parse_time(raw_t)
            except ValueError:
                raise TraceFormatError(
                    f"{where}: {time_col} {raw_t!r} is not a valid timestamp; expected {spec.time_help}"
                ) from None
            if prev is not None and t < prev:
                raise _unsorted(where, time_col, raw_t, prev_raw) from None
            a = _parse_tokens(row[ii], where, input_col)
            b = _parse_tokens(row[io_], where, output_col)
            _append_ns(times, t, where, time_col, raw_t)
            inputs.append(a)
            outputs.append(b)
        prev, prev_raw = t, raw_t
    if not times:
        raise TraceFormatError(
            f"{name} line {header_line}: header found but no data rows; expected at least one request"
        )
    return _trace(times, inputs, outputs, path, spec.name)


def _trace(times: array, inputs: array, outputs: array, path: Path, fmt: str) -> RequestTrace:
    ns = np.frombuffer(times, dtype=np.int64)
    # Exact integer offsets, then one rounding to float64 seconds.
    return RequestTrace(
        arrival_s=(ns - ns[0]).astype(np.float64) / _NS,
        input_tokens=np.frombuffer(inputs, dtype=np.int64).copy(),
        output_tokens=np.frombuffer(outputs, dtype=np.int64).copy(),
        source=str(path),
        format=fmt,
    )


def _json_int(value, where: str, key: str) -> int:
    # bool is an int subclass in Python; `true` is not a token count.
    if isinstance(value, bool) or not isinstance(value, int):
        raise TraceFormatError(
            f"{where}: {key} {json.dumps(value)} is not an integer; expected a non-negative integer"
        )
    if value < 0:
        raise TraceFormatError(
            f"{where}: {key} {value} is negative; expected a non-negative integer"
        )
    return value


def _parse_jsonl(lines, path: Path) -> RequestTrace:
    times, inputs, outputs = array("q"), array("q"), array("q")
    expected = f"expected {_EXPECTED['mooncake']}"
    prev = prev_raw = None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path} line {lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise TraceFormatError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); {expected}") from None
        if not isinstance(obj, dict):
            raise TraceFormatError(f"{where}: a JSON {type(obj).__name__}, not an object; {expected}")
        missing = [k for k in MOONCAKE_KEYS if k not in obj]
        if missing:
            raise TraceFormatError(
                f"{where}: missing key(s) {', '.join(missing)} (found keys: {', '.join(map(str, obj)) or 'none'}); {expected}"
            )
        raw_t = obj["timestamp"]
        if isinstance(raw_t, bool) or not isinstance(raw_t, (int, float)) or not math.isfinite(raw_t):
            raise TraceFormatError(
                f"{where}: timestamp {json.dumps(raw_t)} is not a valid timestamp; expected milliseconds as a finite number"
            )
        t = raw_t * 10**6 if isinstance(raw_t, int) else round(Fraction(raw_t) * 10**6)
        if prev is not None and t < prev:
            raise _unsorted(where, "timestamp", raw_t, prev_raw)
        a = _json_int(obj["input_length"], where, "input_length")
        b = _json_int(obj["output_length"], where, "output_length")
        _append_ns(times, t, where, "timestamp", raw_t)
        inputs.append(a)
        outputs.append(b)
        prev, prev_raw = t, raw_t
    if not times:
        raise TraceFormatError(f"{path}: file is empty; {expected}")
    return _trace(times, inputs, outputs, path, "mooncake")


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
