"""Auto-reset for envs whose observation is a function of their state alone."""

from __future__ import annotations

from functools import partial

import jax
from gymnax.environments import environment


class StateObservedEnv(environment.Environment):
    """A gymnax env whose observation is `get_obs(state, params)`, stepped by
    `advance(key, state, action, params) -> (state, reward, info)` and started in
    `reset_state(key, params)`.

    gymnax's `step` observes twice under vmap (the stepped and the reset state, then
    selects one); observing the state the auto-reset selected gives the same observation
    at one observation's cost. `final_observation` (the stepped state's, as in gymnax) is
    computed only where a caller reads it: XLA drops it otherwise."""

    def advance(self, key, state, action, params):
        raise NotImplementedError

    def reset_state(self, key, params):
        raise NotImplementedError

    def step_env(self, key, state, action, params):
        state, reward, info = self.advance(key, state, action, params)
        return self.get_obs(state, params), state, reward, self.is_terminated(state, params), info

    def reset_env(self, key, params):
        state = self.reset_state(key, params)
        return self.get_obs(state, params), state

    @partial(jax.jit, static_argnames=("self",))
    def step(self, key, state, action, params=None):
        params = self.default_params if params is None else params
        key_step, key_reset = jax.random.split(key)
        stepped, reward, info = self.advance(key_step, state, action, params)
        terminated = self.is_terminated(stepped, params)
        truncated = self.is_truncated(stepped, params)
        done = terminated | truncated
        state = jax.tree.map(lambda reset, kept: jax.lax.select(done, reset, kept), self.reset_state(key_reset, params), stepped)
        obs = self.get_obs(state, params)
        final = jax.lax.select(done, self.get_obs(stepped, params), obs)  # bitwise the step's where no reset
        info = {**info, "terminated": terminated, "truncated": truncated, "final_observation": final}
        return obs, state, reward, terminated, truncated, info
