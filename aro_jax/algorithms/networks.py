"""Actor-critic network and the observation normaliser of the learner."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from aro_jax import contract


class ActorCritic(nn.Module):
    """Separate tanh MLPs for the actor (logits = the paper's action scores; the policy is
    their softmax) and the critic (state value). With `num_costs` > 0 a third MLP
    estimates each constraint's cost value (constrained PPO); `__call__` then returns
    (logits, value, cost_values (..., num_costs))."""

    num_actions: int
    hidden_sizes: Sequence[int] = (64, 64)
    num_costs: int = 0

    @nn.compact
    def __call__(self, obs: jax.Array):
        def mlp(x, out, out_scale, name):
            for i, h in enumerate(self.hidden_sizes):
                x = nn.tanh(nn.Dense(h, kernel_init=nn.initializers.orthogonal(np.sqrt(2)), name=f"{name}_{i}")(x))
            return nn.Dense(out, kernel_init=nn.initializers.orthogonal(out_scale), name=f"{name}_out")(x)

        logits = mlp(obs, self.num_actions, 0.01, "actor")
        value = jnp.squeeze(mlp(obs, 1, 1.0, "critic"), -1)
        if self.num_costs == 0:
            return logits, value
        return logits, value, mlp(obs, self.num_costs, 1.0, "cost_critic")


def masked_logits(logits: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Infeasible actions get a large negative score (finite, so gradients stay finite)."""
    return logits if mask is None else jnp.where(mask, logits, -1e9)


@struct.dataclass
class RunningStats:
    """Running mean/variance of observations (parallel Welford), mergeable across nodes."""

    mean: jax.Array
    var: jax.Array
    count: jax.Array

    @classmethod
    def create(cls, dim: int) -> "RunningStats":
        return cls(mean=jnp.zeros(dim), var=jnp.ones(dim), count=jnp.asarray(1e-4, jnp.float32))

    @classmethod
    def from_batch(cls, batch: jax.Array) -> "RunningStats":
        """Statistics of a batch of shape (..., dim)."""
        x = batch.reshape(-1, batch.shape[-1])
        return cls(x.mean(0), x.var(0), jnp.asarray(x.shape[0], jnp.float32))

    def update(self, batch: jax.Array) -> "RunningStats":
        """Fold in a batch of shape (..., dim)."""
        return self.merge(RunningStats.from_batch(batch))

    def merge(self, other: "RunningStats") -> "RunningStats":
        """Combine two sets of statistics (Chan et al. 1979 parallel variance)."""
        total = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * other.count / total
        m2 = self.var * self.count + other.var * other.count + delta**2 * self.count * other.count / total
        return RunningStats(mean=mean, var=m2 / total, count=total)

    def normalize(self, obs: jax.Array) -> jax.Array:
        """The leading len(mean) dims normalised; any trailing dims pass through."""
        return contract.normalize(obs, self.mean, self.var, xp=jnp)
