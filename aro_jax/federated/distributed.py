"""Multi-process (multi-host) set-up. Import and call this before anything else touches
JAX: `jax.distributed.initialize` must run before the backend starts."""

import jax


def initialize_distributed(coordinator: str, num_processes: int, process_id: int) -> None:
    """Join a multi-process run; afterwards `jax.devices()` spans every process and the
    federated node axis shards over all of them. CPU processes talk over Gloo."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # used by CPU devices only
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
