"""Runs that survive what users do to them: checksummed checkpoints (a flipped bit is
caught, the newest valid step is used, --step picks one), a non-finite guard that keeps
the last good checkpoint, bad input refused in one line before anything compiles, and
no dead ends after interrupted saves or torn files."""

import json
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from aro_jax import cli
from aro_jax.config import ConfigError, load_config
from aro_jax.training import checkpointing, driver
from aro_jax.training.checkpointing import CheckpointError
from test_checkpoint import CHUNKS, TIMING_FIELDS, TINY_RUN, abstract_trees, assert_trees_equal, copy_run

# A restore that fails on a corrupt file leaves TensorStore reads in flight; their late
# "Event loop is closed" reports are expected here (the CLI drops them, see cli.py).
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    """The tiny config trained to the end (4 chunks, a checkpoint after each); tests copy
    it before changing anything. Returns (run_dir, config path, cfg, final state)."""
    root = tmp_path_factory.mktemp("reliability")
    (root / "tiny.yaml").write_text(TINY_RUN)
    cfg = load_config(root / "tiny.yaml")
    state, _ = driver.train(cfg, root / "run_a", quiet=True)
    return root / "run_a", root / "tiny.yaml", cfg, state


def restored_at(run_dir, cfg, step=None):
    state, _, step = checkpointing.restore(run_dir, *abstract_trees(cfg), step=step, say=lambda m: None)
    return state, step


def strip(rows):
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in rows]


def one_error_line(err: str) -> str:
    """The one `error:` line of a command's stderr (a training progress bar may precede it)."""
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and not line.startswith("train:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def largest_state_file(run_dir: Path, step: int) -> Path:
    """The step's largest array-data file (not Orbax's _METADATA or manifest, which can
    be larger when the state has many small leaves)."""
    files = [f for f in (run_dir / "checkpoints" / str(step) / "state").rglob("*")
             if f.is_file() and not f.name.startswith("_") and "manifest" not in f.name]
    return max(files, key=lambda f: f.stat().st_size)


def flip_bit(path: Path, pos: int, bit: int = 4) -> bytes:
    """Flip one bit of `path` in place; returns the original bytes."""
    data = path.read_bytes()
    path.write_bytes(data[:pos] + bytes([data[pos] ^ (1 << bit)]) + data[pos + 1:])
    return data


def flip_until_checksum_catches(run_dir: Path, cfg, step: int) -> Path:
    """Flip single bits through the step's largest data file until one decodes without
    error but fails the checksum (as most do: TensorStore keeps no checksum of chunk
    data); leaves that flip in place."""
    path = largest_state_file(run_dir, step)
    size = path.stat().st_size
    for pos in range(size // 8, size, size // 8):
        original = flip_bit(path, pos)
        try:
            restored_at(run_dir, cfg, step)
        except CheckpointError as e:
            if "checksum mismatch" in str(e):
                return path
        path.write_bytes(original)
    raise AssertionError(f"no single-bit flip of {path} reached the checksum")


# -- 1. checkpoint integrity ----------------------------------------------------------


@pytest.mark.timeout(300)
def test_bit_flips_in_a_checkpoint_are_detected(run_a, tmp_path):
    run_dir, _, cfg, state = run_a
    run = copy_run(run_dir, tmp_path / "flipped")
    reference, _ = restored_at(run, cfg, CHUNKS)
    abstract_state, abstract_hp = abstract_trees(cfg)
    path = largest_state_file(run, CHUNKS)
    size = path.stat().st_size
    caught_by_checksum = 0
    for pos in range(size // 10, size, size // 10):
        original = flip_bit(path, pos)
        try:
            restored, _ = restored_at(run, cfg, CHUNKS)
            assert_trees_equal(restored, reference)  # a flip that changes nothing (padding)
        except CheckpointError as e:
            assert "\n" not in str(e) and f"checkpoints/{CHUNKS}" in str(e)
            if "checksum mismatch" in str(e):
                caught_by_checksum += 1
                # Orbax alone restores this one without error, with changed values.
                raw = checkpointing._reader(run).restore(CHUNKS, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), hp=ocp.args.StandardRestore(abstract_hp)))
                assert any(not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(raw.state), jax.tree.leaves(state)))
        path.write_bytes(original)
    assert caught_by_checksum >= 3


@pytest.mark.timeout(300)
def test_corrupt_latest_checkpoint_resumes_from_the_newest_valid_one(run_a, tmp_path, capsys):
    run_dir, _, cfg, state_a = run_a
    run = copy_run(run_dir, tmp_path / "corrupt-latest")
    flip_until_checksum_catches(run, cfg, CHUNKS)  # the latest step rots on disk
    (run / "learning_curve.png").unlink()

    state, _ = driver.train(None, run, resume=True, quiet=True)

    err = capsys.readouterr().err
    assert f"checkpoints/{CHUNKS}: checkpoint is corrupt (checksum mismatch in state" in err
    assert f"checkpoints/{CHUNKS - 1}, the newest checkpoint that verifies" in err
    assert (run / "checkpoints.corrupt" / str(CHUNKS)).is_dir()  # kept aside, not deleted
    assert_trees_equal(state, state_a)
    assert checkpointing.steps(run) == list(range(1, CHUNKS + 1))
    assert strip(driver.read_metrics(run / "metrics.jsonl")) == strip(driver.read_metrics(run_dir / "metrics.jsonl"))


@pytest.mark.timeout(300)
def test_step_flag_picks_the_checkpoint(run_a, tmp_path, capsys):
    run_dir, _, cfg, state_a = run_a
    run = copy_run(run_dir, tmp_path / "from-step-2")
    assert cli.main(["evaluate", "--checkpoint", str(run), "--step", "99"]) == 2
    assert "no checkpoint at step 99; available: [1, 2, 3, 4]" in one_error_line(capsys.readouterr().err)
    assert cli.main(["train", "--step", "2"]) == 2
    assert "--resume" in one_error_line(capsys.readouterr().err)

    assert cli.main(["train", "--resume", str(run), "--step", "2"]) == 0
    err = capsys.readouterr().err
    assert f"removed checkpoint {run / 'checkpoints' / '3'}" in err and f"removed checkpoint {run / 'checkpoints' / '4'}" in err
    final, step = restored_at(run, cfg)
    assert step == CHUNKS
    assert_trees_equal(final, state_a)
    assert strip(driver.read_metrics(run / "metrics.jsonl")) == strip(driver.read_metrics(run_dir / "metrics.jsonl"))

    # A finished run says so, in one line, and exits 0.
    assert cli.main(["train", "--resume", str(run)]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == f"{run}: the run is finished ({CHUNKS} of {CHUNKS} PPO updates); nothing to resume"
    assert out.err == ""


# -- 2. non-finite guard ----------------------------------------------------------------


@pytest.mark.timeout(300)
def test_non_finite_chunk_stops_the_run_and_keeps_the_last_good_checkpoint(run_a, tmp_path):
    """The failure the issue found: a checkpoint whose Adam second moments are negative
    (finite, so it restores) makes the next chunk produce NaN. The run stops with the
    message; the NaN state is neither logged nor saved; step 2 stays the latest."""
    run_dir, _, cfg, _ = run_a
    run = copy_run(run_dir, tmp_path / "diverges")
    state, hp, _ = checkpointing.restore(run, *abstract_trees(cfg), step=2)
    negative_nu = lambda path, x: -jnp.abs(x) - 1.0 if ".nu" in jax.tree_util.keystr(path) else x  # noqa: E731
    bad = state.replace(opt_state=jax.tree_util.tree_map_with_path(negative_nu, state.opt_state))
    for step in range(2, CHUNKS + 1):
        shutil.rmtree(run / "checkpoints" / str(step))
    mngr = checkpointing.manager(run)
    checkpointing.save(mngr, 2, bad, hp, {}, 0.0)
    mngr.wait_until_finished()
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text("".join(lines[:2]))

    with pytest.raises(driver.TrainingError) as err:
        driver.train(None, run, resume=True, quiet=True)

    msg = str(err.value)
    assert "\n" not in msg
    assert "training stopped: the chunk of PPO updates 3-3 (of 4) produced non-finite values in opt_state, params" in msg
    assert f"the latest checkpoint is still step 2 ({run / 'checkpoints' / '2'})" in msg
    assert checkpointing.steps(run) == [1, 2]  # the NaN state was never saved
    assert [r["unit"] for r in driver.read_metrics(run / "metrics.jsonl")] == [1, 2]  # nor logged
    restored, step = restored_at(run, cfg)
    assert step == 2
    assert_trees_equal(restored, bad)


@pytest.mark.timeout(300)
def test_diverging_learning_rate_stops_with_one_line(run_a, tmp_path, capsys):
    _, config, _, _ = run_a
    run = tmp_path / "lr-1e30"
    assert cli.main(["train", str(config), "ppo.lr=1e30", "ppo.max_grad_norm=1e30", "--run-dir", str(run)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "training stopped" in line and "non-finite values in" in line and "no checkpoint had been saved" in line
    assert not run.exists()


# -- 3. validation before anything compiles --------------------------------------------


def bad_trace_dir(tmp_path: Path, content: bytes) -> Path:
    (tmp_path / "data" / "traces").mkdir(parents=True)
    (tmp_path / "data" / "traces" / "AzureLLMInferenceTrace_conv.csv").write_bytes(content)
    return tmp_path / "data"


HEADER = b"TIMESTAMP,ContextTokens,GeneratedTokens\n"


@pytest.mark.parametrize(
    "command, expected",
    [
        (["train", "ppo.num_minibatches=5"], ["config key 'ppo.num_minibatches'", "batch of 1024 transitions per node"]),
        (["train", "federated.mode=local", "ppo.num_minibatches=3"], ["config key 'ppo.num_minibatches'", "local mode"]),
        (["train", "ppo.lr=.inf"], ["config key 'ppo.lr'", "finite"]),
        (["train", "ppo.clip_eps=.inf"], ["config key 'ppo.clip_eps'", "finite"]),
        (["train", "cluster.nodes.2.mean_rate_rps=.inf"], ["config key 'cluster.nodes.2.mean_rate_rps'", "finite"]),
        (["train", "env.tick_s=.inf"], ["config key 'env.tick_s'", "finite"]),
        (["train", "ppo.gamma=nan"], ["config key 'ppo.gamma'", "finite"]),
        (["train", "ppo.lr=[1"], ["config key 'ppo.lr'", "not valid YAML"]),
        (["run", "eval.scenario=trace-conv", "env.data_dir={tmp}/nowhere"], ["config key 'env.data_dir'", "{tmp}/nowhere is not a directory"]),
        (["run", "eval.scenario=trace-conv", "env.data_dir={data}"], ["config key 'eval.scenario' = trace-conv", "{data}/traces/AzureLLMInferenceTrace_conv.csv line 3", "is negative"]),
        (["evaluate", "--scenario", "trace-conv", "env.data_dir={data}"], ["config key 'eval.scenario'", "{data}/traces/AzureLLMInferenceTrace_conv.csv line 3"]),
        (["train", "{tmp}/includes-missing.yaml"], ["{tmp}/absent.yaml", "included from {tmp}/includes-missing.yaml"]),
        (["train", "{tmp}/broken.yaml"], ["{tmp}/broken.yaml", "line 2 column 1", "not valid YAML"]),
    ],
    ids=["minibatches-per-node", "minibatches-local", "inf-lr", "inf-clip", "inf-rate", "inf-tick", "nan-gamma", "override-yaml",
         "missing-data-dir", "bad-eval-trace", "evaluate-bad-trace", "missing-include", "invalid-yaml"],
)
def test_bad_input_is_one_line_before_compile(tmp_path, capsys, command, expected):
    data = bad_trace_dir(tmp_path, HEADER + b"1.0,5,1\n2.0,-3,1\n")
    (tmp_path / "includes-missing.yaml").write_text("include: [absent.yaml]\n")
    (tmp_path / "broken.yaml").write_text("ppo: {lr: 1e-4\n:\n")
    fill = lambda s: s.format(tmp=tmp_path, data=data)  # noqa: E731
    run = tmp_path / "run"
    t0 = time.perf_counter()
    code = cli.main([*(fill(c) for c in command), "--run-dir", str(run)] if command[0] != "evaluate" else [*(fill(c) for c in command), "--out", str(run)])
    elapsed = time.perf_counter() - t0
    out = capsys.readouterr()
    assert code == 2
    line = one_error_line(out.err)
    for fragment in expected:
        assert fill(fragment) in line, (fragment, line)
    assert elapsed < 5.0  # refused before compiling (a first chunk of the default config takes ~17 s)
    assert not run.exists()  # and nothing was written


@pytest.mark.parametrize(
    "content, fragments",
    [
        (HEADER + "1.0,5,1\n2.0,caf\u00e9,1\n".encode("latin-1"), ["line 3", "0xe9 is not UTF-8"]),
        (bytes(range(256)) * 4, ["line 2", "0x80 is not UTF-8"]),
        (b"", ["file is empty"]),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, ["line 1", "is not UTF-8"]),
    ],
    ids=["latin-1", "binary", "empty", "png"],
)
def test_trace_of_any_content_gives_one_clean_line(tmp_path, capsys, content, fragments):
    data = bad_trace_dir(tmp_path, content)
    code = cli.main(["evaluate", "--scenario", "trace-conv", f"env.data_dir={data}", "--out", str(tmp_path / "out")])
    line = one_error_line(capsys.readouterr().err)
    assert code == 2
    assert f"{data}/traces/AzureLLMInferenceTrace_conv.csv" in line
    for fragment in fragments:
        assert fragment in line, (fragment, line)


def test_numbers_written_as_5e6(tmp_path):
    assert load_config(None, ["train.total_env_steps=5e6"]).train.total_env_steps == 5_000_000
    assert load_config(None, ["train.total_env_steps=5.0e6", "ppo.lr=1e-4"]).ppo.lr == 1e-4
    (tmp_path / "big.yaml").write_text("include: [small.yaml]\ntrain: {total_env_steps: 5e6}\n")
    (tmp_path / "small.yaml").write_text("ppo: {rollout_steps: 32.0}\nfederated: {byzantine_nodes: ['1']}\n")
    cfg = load_config(tmp_path / "big.yaml")
    assert (cfg.train.total_env_steps, cfg.ppo.rollout_steps, cfg.federated.byzantine_nodes) == (5_000_000, 32, [1])
    with pytest.raises(ConfigError, match="config key 'train.total_env_steps'"):
        load_config(None, ["train.total_env_steps=5000000.5"])  # not a whole number


def test_centralized_mode_divides_the_pooled_batch():
    cfg = load_config(None, ["federated.mode=centralized", "ppo.num_minibatches=5"])  # 10240 pooled transitions
    assert cfg.ppo.num_minibatches == 5


# -- 4. every CLI error path ends in one line --------------------------------------------


def test_unexpected_failure_is_one_line_with_the_traceback_behind_debug(monkeypatch, capsys):
    def boom(args):
        raise RuntimeError("reshape failed:\n  something deep")

    monkeypatch.setattr(cli, "cmd_train", boom)
    assert cli.main(["train"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line == "error: RuntimeError: reshape failed: something deep (run again with --debug for the full traceback)"
    assert cli.main(["train", "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "in boom" in err
    assert err.strip().splitlines()[-1] == "error: RuntimeError: reshape failed: something deep"


def test_corrupt_checkpoint_is_one_clean_line_from_the_cli(run_a, tmp_path, capsys):
    run_dir, _, cfg, _ = run_a
    run = copy_run(run_dir, tmp_path / "corrupt")
    manifest = run / "checkpoints" / str(CHUNKS) / "state" / "manifest.ocdbt"
    flip_bit(manifest, manifest.stat().st_size // 2)
    assert cli.main(["export", str(run), str(tmp_path / "export"), "--step", str(CHUNKS)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line == f"error: {run / 'checkpoints' / str(CHUNKS)}: checkpoint is corrupt (a stored CRC check fails)"


# -- 5. no dead ends ----------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_new_train_after_a_kill_during_the_first_save(run_a, tmp_path, capsys):
    """`aro train` into the directory of a run killed while writing its first checkpoint
    (the --resume case is in test_checkpoint.py): the leftovers are removed with a
    message and the run trains as if new, ending where run A ended."""
    run_dir, config, cfg, state_a = run_a
    run = tmp_path / "killed"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(run_dir / "config.yaml", run / "config.yaml")
    (run / "metrics.jsonl").write_text((run_dir / "metrics.jsonl").read_text().splitlines(keepends=True)[0])
    leftover = run / "checkpoints" / "1.orbax-checkpoint-tmp-1765000000"
    shutil.copytree(run_dir / "checkpoints" / "1" / "hp", leftover / "hp")  # only one item was written

    assert cli.main(["train", str(config), "--run-dir", str(run)]) == 0

    err = capsys.readouterr().err
    assert f"warning: removed {leftover}: an incomplete checkpoint left by an interrupted save" in err
    assert f"warning: {run / 'metrics.jsonl'}: removed the log of an earlier attempt" in err
    assert_trees_equal(restored_at(run, cfg)[0], state_a)
    assert strip(driver.read_metrics(run / "metrics.jsonl")) == strip(driver.read_metrics(run_dir / "metrics.jsonl"))


@pytest.mark.timeout(300)
def test_corrupt_orbax_metrics_and_torn_log_line_are_repaired_on_resume(run_a, tmp_path, capsys):
    run_dir, _, cfg, state_a = run_a
    run = copy_run(run_dir, tmp_path / "torn")
    for step in range(3, CHUNKS + 1):  # killed while writing the third metrics line
        shutil.rmtree(run / "checkpoints" / str(step))
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text("".join(lines[:2]) + lines[2][:40])
    metrics_file = run / "checkpoints" / "2" / "metrics" / "metrics"
    metrics_file.write_bytes(np.random.default_rng(0).bytes(20))

    # Reading the run needs no metrics file: evaluate/export load it as it is.
    assert checkpointing.load_trained_policy(run)[0] == cfg

    state, _ = driver.train(None, run, resume=True, quiet=True)

    err = capsys.readouterr().err
    assert f"{run / 'metrics.jsonl'} line 3: an incomplete last record (the run was stopped while writing it); dropped" in err
    assert f"{metrics_file}: corrupt checkpoint metrics file (not valid JSON); rewrote it from metrics.jsonl" in err
    assert json.loads(metrics_file.read_text()) == json.loads((run_dir / "checkpoints" / "2" / "metrics" / "metrics").read_text())
    assert_trees_equal(state, state_a)
    assert strip(driver.read_metrics(run / "metrics.jsonl")) == strip(driver.read_metrics(run_dir / "metrics.jsonl"))
