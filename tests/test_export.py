"""Policy export: bit-identical actions after export/load, and refusals with reasons."""

import json
import shutil

import jax
import numpy as np
import pytest

from _deploy_fixture import trained
from aro_jax.training.checkpointing import load_trained_policy
from aro_jax.deploy.export import SPEC_CHECKSUM_FILE, SPEC_FILE, ExportError, load_policy
from aro_jax.envs import serving as sv
from aro_jax.envs.scenarios import cluster_params


def random_raw(params, n, seed=0):
    """Random raw observations around (and past) the node's limits, so masks vary."""
    rng = np.random.default_rng(seed)
    scale = np.asarray(sv.observation_scale(params))
    raw = scale * rng.uniform(0.0, 1.3, (n, len(sv.OBS_FIELDS)))
    raw[:, 13:17] = rng.uniform(-1, 1, (n, 4))
    idx = [sv.OBS_FIELDS.index(f) for f in ("forward_fraction", "small_model_fraction", "drop_fraction", "slo_attainment")]
    raw[:, idx] = rng.choice([0.0, 0.1, 0.5, 0.8, 1.0], (n, len(idx)))
    raw[:, 6:8] = np.round(raw[:, 6:8])
    return raw.astype(np.float32)


def assert_same_actions(run_dir, export_dir, n=1000):
    cfg, policy, weights, per_node = load_trained_policy(run_dir)
    exported = load_policy(export_dir)
    params = cluster_params(cfg, "train")
    for i, name in enumerate(exported.node_names):
        p = jax.tree.map(lambda x: x[i], params)
        w = jax.tree.map(lambda x: x[i], weights) if per_node else weights
        raw = random_raw(p, n, seed=i)
        ref = np.asarray(jax.jit(jax.vmap(lambda r: policy.act(w, r, p)[0]))(raw))
        got = exported.act(raw, node=name)
        np.testing.assert_array_equal(got, ref)
        assert len(np.unique(ref)) > 1  # the check means something
        single = [int(exported.act(r, node=name)) for r in raw[:20]]
        assert single == list(ref[:20])


def test_export_load_bit_identical_actions():
    run_dir, export_dir = trained()
    assert_same_actions(run_dir, export_dir)
    spec = json.loads((export_dir / SPEC_FILE).read_text())
    assert spec["format_version"].startswith("3.") and spec["env_version"] == sv.ENV_VERSION
    assert spec["observation"]["fields"] == list(sv.OBS_FIELDS)
    assert spec["actions"]["names"] == list(sv.EXTENDED_ACTIONS)
    assert len(spec["training"]["config_sha256"]) == 64 and "reward" in spec["training"]["kpis"]["final"]
    assert set(spec["nodes"]["solo"]["limits"]) >= {"max_cpu_cores", "max_replicas", "max_host_memory_gb"}
    assert list(spec["nodes"]["solo"]["descriptor"]) == list(sv.DESCRIPTOR_NAMES)
    assert spec["network"]["input_dim"] == len(sv.OBS_FIELDS) + len(sv.DESCRIPTOR_NAMES)


def test_loader_imports_neither_trainer_nor_env():
    import subprocess
    import sys

    _, export_dir = trained()
    code = (
        "import sys; from aro_jax.deploy.export import load_policy; from aro_jax.deploy.agent import Agent; "
        f"p = load_policy({str(export_dir)!r}); Agent(p); "
        "bad = [m for m in sys.modules if m.startswith(('aro_jax.algorithms', 'aro_jax.envs', 'flax', 'optax', 'gymnax'))]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture
def export_copy(tmp_path):
    _, export_dir = trained()
    return shutil.copytree(export_dir, tmp_path / "export")


def test_wrong_directory(tmp_path):
    run_dir, _ = trained()
    with pytest.raises(ExportError, match="not a directory"):
        load_policy(tmp_path / "nope")
    with pytest.raises(ExportError, match="training run directory: export it first"):
        load_policy(run_dir)
    with pytest.raises(ExportError, match="not an exported policy directory"):
        load_policy(tmp_path)


def write_signed_spec(export_dir, text: str) -> None:
    """Write policy.json and a matching checksum (what a deliberate edit would do)."""
    import hashlib

    (export_dir / SPEC_FILE).write_text(text)
    (export_dir / SPEC_CHECKSUM_FILE).write_text(hashlib.sha256(text.encode()).hexdigest() + "\n")


def test_format_version_mismatch(export_copy):
    spec = json.loads((export_copy / SPEC_FILE).read_text())
    spec["format_version"] = "2.0"  # before the limits held the pods' CPU and memory share
    write_signed_spec(export_copy, json.dumps(spec))
    with pytest.raises(ExportError, match="format_version 2.0 is incompatible"):
        load_policy(export_copy)


def test_spec_lacking_a_mask_limit(export_copy):
    """A signed spec whose node lacks a limit the mask reads is named, not a KeyError mid-run."""
    spec = json.loads((export_copy / SPEC_FILE).read_text())
    del spec["nodes"]["solo"]["limits"]["vcpus_per_gpu"]
    write_signed_spec(export_copy, json.dumps(spec))
    with pytest.raises(ExportError, match=r"node solo limits lack a number for \['vcpus_per_gpu'\]"):
        load_policy(export_copy)


def test_truncated_spec(export_copy):
    text = (export_copy / SPEC_FILE).read_text()
    (export_copy / SPEC_FILE).write_text(text[: len(text) // 2])
    with pytest.raises(ExportError, match="do not match the checksum"):
        load_policy(export_copy)
    write_signed_spec(export_copy, text[: len(text) // 2])
    with pytest.raises(ExportError, match="truncated or corrupt spec"):
        load_policy(export_copy)


@pytest.mark.parametrize("edit", ["observation_scale", "descriptor", "limits", "fallback", "field_order"])
def test_edited_spec_is_refused(export_copy, edit):
    """policy.json is covered by its checksum: edits that would change decisions silently."""
    spec = json.loads((export_copy / SPEC_FILE).read_text())
    node = spec["nodes"]["solo"]
    if edit == "observation_scale":
        node["observation_scale"][0] *= 2
    elif edit == "descriptor":
        node["descriptor"]["model_weights_gb"] *= 10
    elif edit == "limits":
        node["limits"]["max_replicas"] = 100.0
    elif edit == "fallback":
        spec["actions"]["fallback"] = "IncreaseGPU"
    else:
        f = spec["observation"]["fields"]
        f[0], f[1] = f[1], f[0]
    (export_copy / SPEC_FILE).write_text(json.dumps(spec, indent=2) + "\n")
    with pytest.raises(ExportError, match="do not match the checksum in policy.json.sha256"):
        load_policy(export_copy)


def test_missing_spec_checksum(export_copy):
    (export_copy / SPEC_CHECKSUM_FILE).unlink()
    with pytest.raises(ExportError, match="cannot be verified"):
        load_policy(export_copy)


def test_missing_hidden_sizes_is_an_export_error(export_copy):
    spec = json.loads((export_copy / SPEC_FILE).read_text())
    del spec["network"]["hidden_sizes"]
    write_signed_spec(export_copy, json.dumps(spec))
    with pytest.raises(ExportError, match="network lacks network.hidden_sizes"):
        load_policy(export_copy)


def test_descriptor_is_read_and_checked(export_copy):
    """The node descriptor is part of the input: another node's descriptor changes the
    decision inputs, and a node without one is named."""
    policy = load_policy(export_copy)
    params = cluster_params(load_trained_policy(trained()[0])[0], "train")
    raw = random_raw(jax.tree.map(lambda x: x[0], params), 64)
    spec = json.loads((export_copy / SPEC_FILE).read_text())
    spec["nodes"]["solo"]["descriptor"]["model_weights_gb"] *= 10
    write_signed_spec(export_copy, json.dumps(spec))
    assert not np.allclose(load_policy(export_copy).logits(raw, "solo"), policy.logits(raw, "solo"))
    del spec["nodes"]["solo"]["descriptor"]["slo_target"]
    write_signed_spec(export_copy, json.dumps(spec))
    with pytest.raises(ExportError, match="node solo descriptor lacks a number for .'slo_target'."):
        load_policy(export_copy)


def test_descriptor_passes_the_normaliser_by():
    """The normaliser's statistics cover the live fields only: the descriptor's features,
    constant per node, reach the network as they are (a running variance of ~0 would
    amplify their rounding)."""
    from aro_jax import contract

    cfg, _, weights, _ = load_trained_policy(trained()[0])
    assert np.shape(weights.obs_stats.mean)[-1] == len(sv.OBS_FIELDS)
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(5, sv.POLICY_INPUT_DIM)).astype(np.float32)
    mean, var = rng.normal(size=len(sv.OBS_FIELDS)), rng.uniform(0.5, 2.0, len(sv.OBS_FIELDS))
    out = contract.normalize(obs, mean, var)
    np.testing.assert_array_equal(out[:, len(sv.OBS_FIELDS):], obs[:, len(sv.OBS_FIELDS):])
    np.testing.assert_allclose(out[:, : len(sv.OBS_FIELDS)], contract.normalize(obs[:, : len(sv.OBS_FIELDS)], mean, var))
    assert not np.allclose(out[:, : len(sv.OBS_FIELDS)], obs[:, : len(sv.OBS_FIELDS)])


def test_truncated_and_corrupt_params(export_copy):
    files = sorted(p for p in (export_copy / "params").rglob("*") if p.is_file())
    biggest = max(files, key=lambda p: p.stat().st_size)
    data = biggest.read_bytes()
    biggest.write_bytes(data[: len(data) // 2])
    with pytest.raises(ExportError, match="truncated or corrupt"):
        load_policy(export_copy)
    biggest.write_bytes(bytes([data[0] ^ 0xFF]) + data[1:])
    with pytest.raises(ExportError, match="truncated or corrupt"):
        load_policy(export_copy)
    biggest.unlink()
    with pytest.raises(ExportError, match="is missing"):
        load_policy(export_copy)


def test_export_refuses_existing_and_bad_run(tmp_path):
    from aro_jax.training.checkpointing import CheckpointError
    from aro_jax.deploy.export import export_policy

    run_dir, export_dir = trained()
    with pytest.raises(ExportError, match="not empty"):
        export_policy(run_dir, export_dir)
    with pytest.raises(CheckpointError, match="no config.yaml"):
        export_policy(tmp_path, tmp_path / "out")


@pytest.mark.slow
def test_local_only_exports_one_policy_per_node():
    run_dir, export_dir = trained("local", two_nodes=True)
    exported = load_policy(export_dir)
    assert exported.spec["per_node"] and exported.node_names == ("solo", "tokyo")
    assert len(exported.spec["policies"]) == 2
    assert_same_actions(run_dir, export_dir, n=300)
    with pytest.raises(ValueError, match="pass node="):
        exported.act(np.zeros(len(sv.OBS_FIELDS)))
