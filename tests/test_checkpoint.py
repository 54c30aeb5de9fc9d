"""Training runs on disk: what the driver writes, exact save/restore and resume, and
refusals (with the path and the problem) for run directories that cannot be restored."""

import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from aro_jax.training import checkpointing, driver, trainers
from aro_jax.training.checkpointing import CheckpointError
from aro_jax.config import load_config
from aro_jax.envs.scenarios import cluster_params

CHUNKS = 4  # one PPO update per chunk: 1 node x 4 clusters x 8 steps = 32 transitions each
TINY_RUN = f"""\
cluster:
  name: tiny
  nodes:
    - {{name: solo, profile: llama2-7b-h100-tp1, mean_rate_rps: 10.0, max_replicas: 8}}
env: {{num_clusters: 4, episode_ticks: 64}}
ppo: {{rollout_steps: 8, num_minibatches: 2, update_epochs: 1, hidden_sizes: [32, 32]}}
train: {{total_env_steps: {32 * CHUNKS}, num_chunks: {CHUNKS}, keep_checkpoints: 10}}
"""
# Fields of a metrics record that depend on wall-clock time, not on the training itself.
TIMING_FIELDS = {"steps_per_s"}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """Run A: the tiny config trained to the end in 4 chunks. Tests copy it before
    changing anything. Returns (run_dir, cfg, final state, hp)."""
    root = tmp_path_factory.mktemp("ckpt")
    (root / "tiny.yaml").write_text(TINY_RUN)
    cfg = load_config(root / "tiny.yaml")
    run_dir = root / "run_a"
    state, hp = driver.train(cfg, run_dir, quiet=True)
    return run_dir, cfg, state, hp


def abstract_trees(cfg):
    learner = trainers.make_learner(cfg, cluster_params(cfg, "train"))
    hp = trainers.hyperparams(cfg)
    return jax.eval_shape(learner.init, jax.random.PRNGKey(0), hp), jax.eval_shape(lambda: hp)


def assert_trees_equal(a, b):
    """Bitwise: same structure, dtypes and values (PRNG keys compared as raw data)."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


def copy_run(run_dir: Path, dest: Path) -> Path:
    shutil.copytree(run_dir, dest)
    return dest


@pytest.mark.timeout(300)
def test_train_writes_run_directory(finished_run):
    run_dir, cfg, state, _ = finished_run
    assert int(state.update_step) == CHUNKS
    assert load_config(run_dir / "config.yaml") == cfg  # the resolved config round-trips
    rows = driver.read_metrics(run_dir / "metrics.jsonl")
    assert len(rows) == CHUNKS
    assert [r["event"] for r in rows] == ["train"] * CHUNKS
    assert [r["env_steps"] for r in rows] == [32 * u for u in range(1, CHUNKS + 1)]
    assert all(np.isfinite(r["reward"]) and np.isfinite(r["eval_reward"]) for r in rows)
    steps = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == list(range(1, CHUNKS + 1))
    assert (run_dir / "learning_curve.png").stat().st_size > 0


@pytest.mark.timeout(300)
def test_restore_round_trip_is_bitwise(finished_run):
    run_dir, cfg, state, hp = finished_run
    abstract_state, abstract_hp = abstract_trees(cfg)
    restored, restored_hp, step = checkpointing.restore(run_dir, abstract_state, abstract_hp)
    assert step == CHUNKS
    assert_trees_equal(restored, state)
    # The run's hp holds Python floats, used as float32 in the compiled program; Orbax
    # returns them as float32 arrays.
    assert_trees_equal(restored_hp, jax.tree.map(np.float32, hp))
    earlier, _, step = checkpointing.restore(run_dir, abstract_state, abstract_hp, step=2)
    assert step == 2 and int(earlier.update_step) == 2
    with pytest.raises(CheckpointError, match=r"no checkpoint at step 99; available: \[1, 2, 3, 4\]"):
        checkpointing.restore(run_dir, abstract_state, abstract_hp, step=99)


@pytest.mark.timeout(300)
def test_resume_equals_uninterrupted_run(finished_run, tmp_path):
    run_a, _, state_a, _ = finished_run
    # Run B is run A as a process killed after chunk 2 would leave it: checkpoints 1-2
    # and their two metrics lines. (The driver logs a chunk's line just before saving it;
    # resuming appends, so the file holds each update once when, as here, the log ends at
    # the last complete checkpoint.)
    run_b = copy_run(run_a, tmp_path / "run_b")
    for step in range(3, CHUNKS + 1):
        shutil.rmtree(run_b / "checkpoints" / str(step))
    lines = (run_b / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run_b / "metrics.jsonl").write_text("".join(lines[:2]))
    (run_b / "learning_curve.png").unlink()

    state_b, _ = driver.train(None, run_b, resume=True, quiet=True)

    assert_trees_equal(state_b, state_a)  # params, optimizer, normaliser, envs, key
    rows_a = driver.read_metrics(run_a / "metrics.jsonl")
    rows_b = driver.read_metrics(run_b / "metrics.jsonl")
    assert [r["env_steps"] for r in rows_b] == [32 * u for u in range(1, CHUNKS + 1)]
    strip = lambda r: {k: v for k, v in r.items() if k not in TIMING_FIELDS}  # noqa: E731
    assert [strip(r) for r in rows_b] == [strip(r) for r in rows_a]
    assert (run_b / "learning_curve.png").is_file()


def test_resume_missing_directory(tmp_path):
    missing = tmp_path / "never-trained"
    with pytest.raises(CheckpointError, match="not a directory") as err:
        driver.train(None, missing, resume=True, quiet=True)
    assert str(missing) in str(err.value)


def test_resume_directory_without_config(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(CheckpointError, match="no config.yaml") as err:
        driver.train(None, tmp_path, resume=True, quiet=True)
    assert str(tmp_path) in str(err.value)


@pytest.mark.timeout(300)
def test_resume_after_a_kill_during_the_first_save_starts_over(finished_run, tmp_path, capsys):
    """What a process killed while writing its first checkpoint leaves: config.yaml, the
    first metrics line (logged just before the save) and Orbax's unfinished temporary
    step directory. --resume has nothing to restore, so it repairs the directory and
    starts the run from the beginning: it ends bitwise where the uninterrupted run A did."""
    run_a, _, state_a, _ = finished_run
    run = tmp_path / "killed-in-first-save"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(run_a / "config.yaml", run / "config.yaml")
    (run / "metrics.jsonl").write_text((run_a / "metrics.jsonl").read_text().splitlines(keepends=True)[0])
    leftover = run / "checkpoints" / "1.orbax-checkpoint-tmp-1765000000"
    shutil.copytree(run_a / "checkpoints" / "1", leftover)
    shutil.rmtree(leftover / "state")  # killed before the state item was written
    (leftover / "_CHECKPOINT_METADATA").unlink()

    state, _ = driver.train(None, run, resume=True, quiet=True)

    err = capsys.readouterr().err
    assert f"removed {leftover}" in err and "no complete checkpoint" in err
    assert_trees_equal(state, state_a)
    assert not leftover.exists()
    strip = lambda r: {k: v for k, v in r.items() if k not in TIMING_FIELDS}  # noqa: E731
    assert [strip(r) for r in driver.read_metrics(run / "metrics.jsonl")] == [strip(r) for r in driver.read_metrics(run_a / "metrics.jsonl")]


def test_corrupted_checkpoint_names_the_step(finished_run, tmp_path):
    run_dir, cfg, _, _ = finished_run
    broken = copy_run(run_dir, tmp_path / "broken")
    step_dir = broken / "checkpoints" / str(CHUNKS)
    largest = max((f for f in step_dir.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    size = largest.stat().st_size
    largest.write_bytes(np.random.default_rng(0).bytes(size))
    with pytest.raises(CheckpointError, match="corrupt") as err:
        checkpointing.restore(broken, *abstract_trees(cfg), step=CHUNKS)
    assert f"checkpoints/{CHUNKS}" in str(err.value)
    assert "\n" not in str(err.value) and "tensorstore" not in str(err.value).lower()  # one clean line
    # Asked for no particular step, restore falls back to the newest one that verifies.
    said = []
    _, _, step = checkpointing.restore(broken, *abstract_trees(cfg), say=said.append)
    assert step == CHUNKS - 1
    assert f"checkpoints/{CHUNKS}" in said[0] and f"checkpoints/{CHUNKS - 1}, the newest checkpoint that verifies" in said[-1]


def test_unfinished_orbax_save_is_ignored(finished_run, tmp_path):
    run_dir, cfg, state, _ = finished_run
    run = copy_run(run_dir, tmp_path / "killed-mid-save")
    # What Orbax leaves when a process dies while writing step 104.
    shutil.copytree(run / "checkpoints" / str(CHUNKS), run / "checkpoints" / f"{CHUNKS + 100}.orbax-checkpoint-tmp-123")
    restored, _, step = checkpointing.restore(run, *abstract_trees(cfg))
    assert step == CHUNKS
    assert_trees_equal(restored, state)


def test_new_run_in_directory_with_checkpoints_is_refused(finished_run):
    run_dir, cfg, _, _ = finished_run
    config_before = (run_dir / "config.yaml").read_text()
    with pytest.raises(CheckpointError, match="--resume") as err:
        driver.train(cfg, run_dir, quiet=True)
    assert str(run_dir) in str(err.value)
    assert (run_dir / "config.yaml").read_text() == config_before
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == CHUNKS
