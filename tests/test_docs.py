"""Docs stay true: the README's results section is what benchmarks/render_readme.py renders
from the committed benchmark JSON (no figure typed by hand, none stale)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_results_rendered_from_benchmark_json():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "render_readme.py"), "--check"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, (
        "README.md's results section differs from a fresh render of benchmarks/**/*.json; "
        f"run `python benchmarks/render_readme.py`\n{out.stderr[-2000:]}")


def test_tier_rule_thresholds_are_the_tuned_ones():
    import json

    from aro_jax.envs import heuristics

    chosen = json.loads((ROOT / "benchmarks" / "tier_thresholds.json").read_text())["chosen"]
    assert (heuristics.TIER_DEGRADE_LOAD, heuristics.TIER_RESTORE_LOAD) == (chosen["degrade_load"], chosen["restore_load"])


def test_spill_threshold_is_the_tuned_one():
    import json

    from aro_jax.envs import heuristics

    chosen = json.loads((ROOT / "benchmarks" / "spill_threshold.json").read_text())["chosen"]
    assert heuristics.SPILL_LOAD == chosen["spill_load"]
