"""Federated PPO: the node axis on 1 device, on 4 devices and across 2 processes gives the
same training; Byzantine faults never reach the global parameters; local-only keeps
nodes apart."""

import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aro_jax.training import trainers
from aro_jax.config import load_config
from aro_jax.envs.scenarios import cluster_params
from aro_jax.federated import fedppo

WORKERS = Path(__file__).parent / "workers"
CLUSTER = WORKERS / "cluster4.yaml"
# Sharding reorders float reductions (e.g. the coordinate-wise median's inputs arrive
# gathered from devices): agreement is to float32 rounding, not bitwise.
ATOL = 1e-5


def _run_worker(out, devices, *extra, timeout=400):
    cmd = [sys.executable, str(WORKERS / "fed_worker.py"), str(out), str(devices), *map(str, extra)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc, timeout=400):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_one_device_equals_four_devices_and_two_processes(tmp_path):
    _finish(_run_worker(tmp_path / "one.npy", 1))
    _finish(_run_worker(tmp_path / "four.npy", 4))
    port = _free_port()
    procs = [_run_worker(tmp_path / "dist.npy", 2, pid, 2, port) for pid in (0, 1)]
    for p in procs:
        _finish(p)
    one, four, dist = (np.load(tmp_path / f) for f in ("one.npy", "four.npy", "dist.npy"))
    assert np.isfinite(one).all() and np.abs(one).max() > 0
    np.testing.assert_allclose(four, one, atol=ATOL)
    np.testing.assert_allclose(dist, one, atol=ATOL)


def _train(overrides):
    cfg = load_config(CLUSTER, overrides)
    init, chunk, _ = trainers.make_federated(cfg, cluster_params(cfg, "train"))
    hp = trainers.hyperparams(cfg)
    state0 = jax.jit(init)(jax.random.PRNGKey(0), hp)
    state, metrics = jax.jit(chunk, static_argnums=2)(state0, hp, trainers.num_rounds(cfg))
    return state0, state, metrics


@pytest.mark.timeout(300)
@pytest.mark.parametrize("aggregator", ["krum", "median"])
def test_nan_node_never_reaches_global_parameters(aggregator):
    # n = 4 tolerates f = 1 for median/trimmed mean; Krum needs n >= 2f + 3, so f = 0 and
    # the NaN node then exceeds f: the round must be skipped rather than poisoned.
    f = 0 if aggregator == "krum" else 1
    overrides = [f"federated.aggregator={aggregator}", f"federated.num_byzantine={f}",
                 "federated.attack=nan", "federated.byzantine_nodes=[2]"]
    state0, state, metrics = _train(overrides)
    flat = jax.flatten_util.ravel_pytree(state.global_params)[0]
    assert bool(jnp.isfinite(flat).all())
    assert np.all(np.asarray(metrics["num_invalid"]) == 1)
    moved = not np.allclose(flat, jax.flatten_util.ravel_pytree(state0.global_params)[0])
    assert moved == (f == 1), "rounds with more invalid nodes than f must be skipped, others applied"


@pytest.mark.timeout(300)
def test_local_only_keeps_nodes_apart():
    _, state, _ = _train(["federated.mode=local"])
    flat = jax.vmap(lambda p: jax.flatten_util.ravel_pytree(p)[0])(state.nodes.params)
    assert not np.allclose(flat[0], flat[1])


def test_threat_picked_at_run_time_equals_the_configured_program():
    # One program over several attacks and defences, its threat set at run time, trains
    # exactly like the program built for that single attack and defence from the config.
    byz = ["federated.attack=sign_flip", "federated.byzantine_nodes=[1]", "federated.attack_strength=3.0"]
    _, expected, _ = _train([*byz, "federated.aggregator=median", "federated.num_byzantine=1"])

    cfg = load_config(CLUSTER, ["federated.aggregator=mean"])
    attack_names, defences = ["none", "nan", "sign_flip"], [("mean", 0), ("median", 1), ("trimmed_mean", 1)]
    init, chunk, _ = trainers.make_federated(cfg, cluster_params(cfg, "train"), attack_names, defences)
    hp = trainers.hyperparams(cfg)
    state = jax.jit(init)(jax.random.PRNGKey(0), hp)
    threat = fedppo.Threat(attack=jnp.int32(2), strength=jnp.float32(3.0),
                           byzantine=jnp.arange(4) == 1, defence=jnp.int32(1))
    state, _ = jax.jit(chunk, static_argnums=2)(state.replace(threat=threat), hp, trainers.num_rounds(cfg))
    got = jax.flatten_util.ravel_pytree(state.global_params)[0]
    want = jax.flatten_util.ravel_pytree(expected.global_params)[0]
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_unsatisfiable_defence_option_is_refused():
    cfg = load_config(CLUSTER, [])
    with pytest.raises(ValueError, match="krum"):
        trainers.make_federated(cfg, cluster_params(cfg, "train"), None, [("median", 1), ("krum", 1)])
