"""A tiny trained run and its export, built once per test session (shared by
test_export.py and test_agent.py; cached here rather than in conftest)."""

import functools
import tempfile
from pathlib import Path

TINY = """\
cluster:
  name: tiny-deploy
  nodes:
{nodes}
federated: {{mode: {mode}}}
env: {{num_clusters: 4, episode_ticks: 64}}
ppo: {{rollout_steps: 8, num_minibatches: 2, update_epochs: 1, hidden_sizes: [32, 32]}}
train: {{total_env_steps: {steps}, num_chunks: 1}}
"""
SOLO = "    - {name: solo, profile: llama2-7b-h100-tp1, mean_rate_rps: 10.0, max_replicas: 8}"
PAIR = SOLO + "\n    - {name: tokyo, profile: llama2-7b-h100-tp1, traffic_mix: code, mean_rate_rps: 20.0, tz_offset_h: 9.0, max_replicas: 6}"


@functools.cache
def trained(mode: str = "centralized", two_nodes: bool = False) -> tuple[Path, Path]:
    """(run_dir, export_dir) of a tiny run trained for a few PPO updates."""
    from aro_jax.training import driver
    from aro_jax.config import load_config
    from aro_jax.deploy.export import export_policy

    root = Path(tempfile.mkdtemp(prefix=f"aro_deploy_{mode}_"))
    nodes = PAIR if two_nodes else SOLO
    per_update = 8 * 4 * (2 if two_nodes else 1)
    steps = per_update * (4 if mode == "local" else 6)
    (root / "tiny.yaml").write_text(TINY.format(nodes=nodes, mode=mode, steps=steps))
    cfg = load_config(root / "tiny.yaml")
    run_dir = root / "run"
    driver.train(cfg, run_dir, quiet=True)
    return run_dir, export_policy(run_dir, root / "export")
