"""`aro sweep`: train a sweep file's points in one program, rank them, write the report."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from aro_jax.sweep.spec import SWEEPABLE, Objective, SweepSpec
from aro_jax.sweep.vectorised import SweepTrainer, mean_over_seeds
from aro_jax.training.evaluation import KPIS, format_value


@dataclass
class SweepResult:
    rows: list[dict[str, float]]  # per point: swept values, KPIs (mean over seeds), *_std
    best_index: int
    traces: int  # times the training program was traced (1 = one compiled program)
    train_seconds: float
    files: dict[str, Path]


def run_sweep(spec: SweepSpec, run_dir: Path, quiet: bool = False) -> SweepResult:
    """Train every point of `spec` x seeds in one compiled program, evaluate each greedily,
    write results.{csv,md,json}, best.yaml and sweep.png to `run_dir`."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = spec.config()
    trainer = SweepTrainer(cfg)
    say = (lambda *a: None) if quiet else print
    say(f"sweep {spec.name}: {len(spec.points)} points x {spec.seeds} seeds in one program ({len(cfg.cluster.nodes)} nodes x {cfg.env.num_clusters} clusters each)")
    start = time.time()
    states, metrics = trainer.train(spec.points, spec.seeds, spec.seed)
    train_s = time.time() - start
    say(f"trained in {train_s:.1f}s (compiled {trainer.traces}x); evaluating on {cfg.eval.scenario}")
    per_run = trainer.evaluate(states, trainer.hyperparams(spec.points, spec.seeds), spec.seed)
    kpis = mean_over_seeds(per_run, len(spec.points), spec.seeds)
    final_train_reward = np.asarray(metrics["reward"])[:, -1].reshape(len(spec.points), spec.seeds).mean(1)
    swept = list(dict.fromkeys(k for p in spec.points for k in p))
    rows = [{**p, **k, "train_reward_last": float(r)} for p, k, r in zip(spec.points, kpis, final_train_reward)]
    best = 0
    for i, r in enumerate(rows):
        if spec.objective.better(r[spec.objective.kpi], rows[best][spec.objective.kpi]):
            best = i
    files = {
        "csv": run_dir / "results.csv", "md": run_dir / "results.md", "json": run_dir / "results.json",
        "best": run_dir / "best.yaml", "plot": run_dir / "sweep.png",
    }
    columns = ["point", *swept, *KPIS, "train_reward_last"]
    with open(files["csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for i, r in enumerate(rows):
            w.writerow([i, *(f"{r[c]:.6g}" for c in columns[1:])])
    files["md"].write_text(_markdown(rows, swept, spec.objective, best) + "\n")
    files["json"].write_text(json.dumps({
        "sweep": str(spec.path), "objective": dataclasses.asdict(spec.objective), "best_point": best,
        "seeds": spec.seeds, "traces": trainer.traces, "train_seconds": train_s, "rows": rows}, indent=2))
    write_best_config(spec, rows[best], swept, files["best"], f"{spec.name}-best")
    plot_sweep(rows, swept, spec.objective, best, files["plot"])
    say(_markdown(rows, swept, spec.objective, best))
    say(f"best point {best}: {json.dumps({k: rows[best][k] for k in swept})}; wrote {run_dir}/results.{{csv,md,json}}, best.yaml, sweep.png")
    return SweepResult(rows, best, trainer.traces, train_s, files)


def _markdown(rows, swept, objective: Objective, best: int) -> str:
    cols = [*swept, *KPIS]
    head = "| point | " + " | ".join(cols) + " |"
    lines = [f"objective: {objective.mode} {objective.kpi} (best: point {best}, marked *)", "", head, "|---" * (len(cols) + 1) + "|"]
    for i, r in enumerate(rows):
        lines.append(f"| {i}{'*' if i == best else ''} | " + " | ".join(format_value(r[c]) for c in cols) + " |")
    return "\n".join(lines)


def write_best_config(spec: SweepSpec, values: dict[str, float], swept: list[str], path: Path, name: str) -> None:
    """A ready-to-run experiment YAML: `include:` the base, then the sweep's overrides and
    the chosen values under ppo. / env.reward."""
    from omegaconf import OmegaConf

    tree = OmegaConf.create({"name": name})
    for o in spec.overrides:
        key, value = o.split("=", 1)
        OmegaConf.update(tree, key.strip(), yaml.safe_load(value), merge=True)
    for k in swept:
        OmegaConf.update(tree, SWEEPABLE[k], float(values[k]), merge=True)
    body = OmegaConf.to_container(tree)
    include = os.path.relpath(spec.base, Path(path).resolve().parent)
    text = f"# Best point of sweep {spec.path} ({name}).\n" + yaml.safe_dump({"include": [include], **body}, sort_keys=False)
    Path(path).write_text(text)


def plot_sweep(rows, swept, objective: Objective, best: int, path: Path) -> None:
    """Objective per point (error bars: std over seeds); against the swept parameter when
    only one varies."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    varying = [k for k in swept if len({r[k] for r in rows}) > 1]
    y = np.array([r[objective.kpi] for r in rows])
    err = np.array([r.get(f"{objective.kpi}_std", 0.0) for r in rows])
    fig, ax = plt.subplots(figsize=(7, 4))
    if len(varying) == 1:
        k = varying[0]
        x = np.array([r[k] for r in rows])
        order = np.argsort(x)
        ax.errorbar(x[order], y[order], yerr=err[order], marker="o", capsize=3)
        ax.plot([x[best]], [y[best]], "r*", ms=14, label="best")
        if x.min() > 0 and x.max() / x.min() >= 100:
            ax.set_xscale("log")
        ax.set_xlabel(k)
    else:
        ax.bar(np.arange(len(rows)), y, yerr=err, capsize=3, color=["tab:red" if i == best else "tab:blue" for i in range(len(rows))])
        ax.set_xticks(np.arange(len(rows)))
        ax.set_xticklabels(["\n".join(f"{k}={r[k]:.3g}" for k in varying) for r in rows], fontsize=6)
        ax.set_xlabel("point")
    ax.set_ylabel(f"{objective.kpi} ({objective.mode})")
    ax.set_title("sweep: objective per point (red: best)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
