"""Runs a few federated PPO rounds on a small 4-node cluster and saves the final global
parameters; used by tests/test_federated.py in subprocesses (device count and process
layout must be set before JAX starts).

usage: fed_worker.py OUT.npy DEVICES_PER_PROCESS [PROCESS_ID NUM_PROCESSES PORT] [key=value ...]
"""

import os
import sys

out, local_devices = sys.argv[1], int(sys.argv[2])
dist = len(sys.argv) > 3 and "=" not in sys.argv[3]
inherited = os.environ.get("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false")  # the tests' flags (conftest)
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={local_devices} {inherited}"

import jax  # noqa: E402
import numpy as np  # noqa: E402

overrides = sys.argv[6:] if dist else sys.argv[3:]
if dist:
    from aro_jax.federated.distributed import initialize_distributed

    initialize_distributed(f"localhost:{sys.argv[5]}", int(sys.argv[4]), int(sys.argv[3]))

from aro_jax.training import trainers  # noqa: E402
from aro_jax.config import load_config  # noqa: E402
from aro_jax.envs.scenarios import cluster_params  # noqa: E402

CLUSTER = os.path.join(os.path.dirname(__file__), "cluster4.yaml")
cfg = load_config(CLUSTER, [f"federated.devices={jax.device_count()}", *overrides])
init, chunk, _ = trainers.make_federated(cfg, cluster_params(cfg, "train"))
hp = trainers.hyperparams(cfg)
state = jax.jit(init)(jax.random.PRNGKey(0), hp)
state, metrics = jax.jit(chunk, static_argnums=2)(state, hp, trainers.num_rounds(cfg))
flat = jax.flatten_util.ravel_pytree(state.global_params)[0]
if jax.process_index() == 0:
    np.save(out, np.asarray(flat))
