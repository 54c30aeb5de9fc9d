"""Time per aggregation for every aggregator over n nodes and d parameters.

Each (aggregator, n, d) runs in its own subprocess (so peak RSS is per combination):
`jit(make_aggregator(name, f))` on a (n, d) float32 normal matrix, one first call
(compile + run), then repeated steady-state calls; the table gives the median call.
f = (n - 3) // 4, the largest f every aggregator (Bulyan: n >= 4f + 3) accepts, so all
aggregators run at the same (n, f). A combination is skipped when the same aggregator at
the previous d, scaled linearly in d, predicts more than --limit seconds per call.

    python benchmarks/aggregation.py               # writes benchmarks/aggregation.{json,md}
    python benchmarks/aggregation.py --nodes 10 --dims 10000 --out /tmp/x.json
    python benchmarks/aggregation.py --render-only  # the markdown again from the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_common import write_report  # noqa: E402

XLA_FLAGS = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
AGGREGATOR_NAMES = (
    "mean",
    "median",
    "trimmed_mean",
    "krum",
    "multi_krum",
    "geometric_median",
    "centered_clipping",
    "bulyan",
)


def num_byzantine(n: int) -> int:
    return (n - 3) // 4


def worker(name: str, n: int, d: int, min_repeats: int, target_s: float) -> dict:
    import jax

    from aro_jax.federated.aggregators import make_aggregator

    f = num_byzantine(n)
    updates = jax.block_until_ready(jax.random.normal(jax.random.key(0), (n, d), "float32"))
    fn = jax.jit(make_aggregator(name, f))
    start = time.perf_counter()
    jax.block_until_ready(fn(updates))
    first_s = time.perf_counter() - start
    times = []
    while len(times) < min_repeats or (sum(times) < target_s and len(times) < 50):
        start = time.perf_counter()
        jax.block_until_ready(fn(updates))
        times.append(time.perf_counter() - start)
    return {
        "name": name,
        "n": n,
        "d": d,
        "f": f,
        "first_s": first_s,
        "median_s": statistics.median(times),
        "repeats": len(times),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    }


def run_worker(name: str, n: int, d: int, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, str(n), str(d), "--repeats", str(args.repeats), "--target", str(args.target)]
    env = {**os.environ, "XLA_FLAGS": XLA_FLAGS}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def format_seconds(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.0f} us"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"


def machine_description() -> str:
    import jax

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{cpu}, {os.cpu_count()} cores (shared with other jobs), {mem_gb:.0f} GiB RAM; "
        f"jax {jax.__version__}, backend {jax.default_backend()}, Python {platform.python_version()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, nargs="+", default=[10, 32, 100])
    parser.add_argument("--dims", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--aggregators", nargs="+", default=list(AGGREGATOR_NAMES))
    parser.add_argument("--repeats", type=int, default=3, help="minimum steady-state calls")
    parser.add_argument("--target", type=float, default=3.0, help="keep repeating until this many seconds (max 50 calls)")
    parser.add_argument("--limit", type=float, default=20.0, help="skip when the predicted call exceeds this (s)")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"), help="results JSON; the markdown goes next to it")
    parser.add_argument("--render-only", action="store_true", help="re-render the markdown from --out")
    parser.add_argument("--worker", nargs=3, metavar=("NAME", "N", "D"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        name, n, d = args.worker
        print(json.dumps(worker(name, int(n), int(d), args.repeats, args.target)))
        return
    if args.render_only:
        write_report(args.out, None, render)
        return

    results, skipped = {}, []
    for n in args.nodes:
        for name in args.aggregators:
            previous = None
            for d in sorted(args.dims):
                if previous is not None and previous["median_s"] * d / previous["d"] > args.limit:
                    predicted = previous["median_s"] * d / previous["d"]
                    skipped.append(f"{name}, n = {n}, d = {d:.0e}: predicted {predicted:.0f} s per call "
                                   f"({format_seconds(previous['median_s'])} at d = {previous['d']:.0e}, linear in d)")
                    continue
                result = run_worker(name, n, d, args)
                results[(name, n, d)] = previous = result
                print(f"{name:18s} n={n:4d} f={result['f']:3d} d={d:8d}  {format_seconds(result['median_s']):>10s}  "
                      f"first {format_seconds(result['first_s']):>9s}  rss {result['peak_rss_mb']:.0f} MB", flush=True)

    data = {
        "command": ("python benchmarks/aggregation.py " + " ".join(sys.argv[1:])).strip(), "xla_flags": XLA_FLAGS,
        "machine": machine_description(), "nodes": args.nodes, "dims": sorted(args.dims), "aggregators": args.aggregators,
        "repeats": args.repeats, "target_s": args.target, "skipped": skipped,
        "results": [{"aggregator": name, "n": n, "d": d, **r} for (name, n, d), r in results.items()],
    }
    write_report(args.out, data, render)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


def render(data: dict) -> str:
    dims = data["dims"]
    results = {(r["aggregator"], r["n"], r["d"]): r for r in data["results"]}
    lines = [
        "# Aggregation time per call",
        "",
        "Median wall time of one jitted aggregation of a (n, d) float32 matrix after compilation,",
        "f = (n - 3) // 4 Byzantine nodes (the largest f Bulyan allows, so every aggregator runs at",
        "the same (n, f)). Each cell is its own process; default options (geometric median: 8",
        "Weiszfeld iterations; centered clipping: 3 iterations from the coordinate-wise median).",
        "",
        f"- command: `{data['command']}` (XLA_FLAGS={data['xla_flags']}); figures from aggregation.json",
        f"- machine: {data['machine']}",
        f"- repeats: at least {data['repeats']} steady-state calls, more until {data['target_s']:g} s (max 50); "
        "timings are medians",
        "",
    ]
    for n in data["nodes"]:
        lines += [f"## n = {n} nodes, f = {num_byzantine(n)}", ""]
        lines += ["| aggregator | " + " | ".join(f"d = {d:.0e}" for d in dims) + " | peak RSS at largest d | first call (compile + run) at largest d |"]
        lines += ["|---" * (len(dims) + 3) + "|"]
        for name in data["aggregators"]:
            cells, last = [], None
            for d in dims:
                r = results.get((name, n, d))
                cells.append(format_seconds(r["median_s"]) if r else "skipped")
                last = r or last
            tail = [f"{last['peak_rss_mb']:.0f} MB (d = {last['d']:.0e})", format_seconds(last["first_s"])] if last else ["", ""]
            lines.append(f"| {name} | " + " | ".join(cells) + " | " + " | ".join(tail) + " |")
        lines.append("")
    lines += ["## Skipped", ""]
    lines += [f"- {s}" for s in data["skipped"]] or ["- none"]
    lines += [
        "",
        "No combination violated an aggregator's requirement at f = (n - 3) // 4.",
        "Peak RSS includes the Python/JAX process and the input matrix (4 n d bytes).",
        "",
        "Coordinate-wise order statistics (median, trimmed mean, centered clipping's starting point,",
        "Bulyan's second stage) run a sorting network for n <= 32 and XLA's sort along the node axis",
        "above, hence the jump at n = 100. Krum, multi-Krum and Bulyan form all pairwise distances",
        "by direct differences: O(n^2 d).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
