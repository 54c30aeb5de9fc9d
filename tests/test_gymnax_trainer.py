"""The env is a first-class gymnax citizen: a minimal PPO written only against gymnax's
public API (make, reset/step, action_space, LogWrapper) trains on it unchanged.

Deliberately independent of aro_jax.algorithms: this is what a user of any gymnax-based
trainer would write."""

import flax.linen as nn
import gymnax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from gymnax.wrappers.purerl import LogWrapper

import aro_jax.envs  # noqa: F401  (registers ServingNode-v0)

NUM_ENVS, NUM_STEPS, NUM_UPDATES, EPOCHS, MINIBATCHES = 8, 32, 3, 2, 2
GAMMA, GAE_LAMBDA, CLIP, ENT_COEF, VF_COEF, LR = 0.99, 0.95, 0.2, 0.01, 0.5, 3e-4


class ActorCritic(nn.Module):
    num_actions: int

    @nn.compact
    def __call__(self, obs):
        actor = nn.Dense(self.num_actions)(nn.tanh(nn.Dense(64)(nn.tanh(nn.Dense(64)(obs)))))
        critic = nn.Dense(1)(nn.tanh(nn.Dense(64)(nn.tanh(nn.Dense(64)(obs)))))
        return jax.nn.log_softmax(actor), critic[..., 0]


def make_train(env_id="ServingNode-v0", episode_ticks=16):
    env, params = gymnax.make(env_id)
    params = params.replace(max_steps_in_episode=episode_ticks)  # episodes end inside the rollout
    env = LogWrapper(env)
    num_actions = env.action_space(params).n
    net = ActorCritic(num_actions)
    tx = optax.chain(optax.clip_by_global_norm(0.5), optax.adam(LR))
    batch = NUM_ENVS * NUM_STEPS

    def loss_fn(net_params, mb):
        logp_all, value = net.apply(net_params, mb["obs"])
        logp = jnp.take_along_axis(logp_all, mb["action"][:, None], -1)[:, 0]
        ratio = jnp.exp(logp - mb["logp"])
        adv = (mb["adv"] - mb["adv"].mean()) / (mb["adv"].std() + 1e-8)
        pg = -jnp.minimum(ratio * adv, jnp.clip(ratio, 1 - CLIP, 1 + CLIP) * adv).mean()
        entropy = -(jnp.exp(logp_all) * logp_all).sum(-1).mean()
        return pg + VF_COEF * ((value - mb["target"]) ** 2).mean() - ENT_COEF * entropy

    def env_step(carry, _):
        net_params, opt_state, env_state, obs, key = carry
        key, k_act, k_step = jax.random.split(key, 3)
        logp_all, value = net.apply(net_params, obs)
        action = jax.random.categorical(k_act, logp_all)
        step = jax.vmap(env.step, in_axes=(0, 0, 0, None))
        next_obs, env_state, reward, terminated, truncated, info = step(jax.random.split(k_step, NUM_ENVS), env_state, action, params)
        # Bootstrap through time limits from the pre-reset observation (gymnax 1.x).
        _, final_value = net.apply(net_params, info["final_observation"])
        transition = dict(obs=obs, action=action, logp=jnp.take_along_axis(logp_all, action[:, None], -1)[:, 0], value=value,
                          reward=reward, terminated=terminated, done=terminated | truncated, final_value=final_value,
                          returned=info["returned_episode"], episode_return=info["returned_episode_returns"])
        return (net_params, opt_state, env_state, next_obs, key), transition

    def gae(traj):
        def back(next_adv, t):
            delta = t["reward"] + GAMMA * t["final_value"] * (1.0 - t["terminated"].astype(jnp.float32)) - t["value"]
            adv = delta + GAMMA * GAE_LAMBDA * (1.0 - t["done"].astype(jnp.float32)) * next_adv
            return adv, adv

        _, adv = jax.lax.scan(back, jnp.zeros(NUM_ENVS), traj, reverse=True)
        return adv, adv + traj["value"]

    def update(carry, _):
        carry, traj = jax.lax.scan(env_step, carry, None, NUM_STEPS)
        net_params, opt_state, env_state, obs, key = carry
        adv, target = gae(traj)
        flat = jax.tree.map(lambda x: x.reshape((batch,) + x.shape[2:]), dict(traj, adv=adv, target=target))

        def epoch(state, key):
            order = jax.random.permutation(key, batch).reshape(MINIBATCHES, -1)

            def minibatch(state, idx):
                net_params, opt_state = state
                loss, grads = jax.value_and_grad(loss_fn)(net_params, jax.tree.map(lambda x: x[idx], flat))
                updates, opt_state = tx.update(grads, opt_state, net_params)
                return (optax.apply_updates(net_params, updates), opt_state), loss

            return jax.lax.scan(minibatch, state, order)

        key, k_epochs = jax.random.split(key)
        (net_params, opt_state), losses = jax.lax.scan(epoch, (net_params, opt_state), jax.random.split(k_epochs, EPOCHS))
        episode_return = (traj["episode_return"] * traj["returned"]).sum() / jnp.maximum(traj["returned"].sum(), 1)
        metrics = dict(loss=losses.mean(), episode_return=episode_return, episodes=traj["returned"].sum())
        return (net_params, opt_state, env_state, obs, key), metrics

    def train(key):
        k_init, k_reset, key = jax.random.split(key, 3)
        obs, env_state = jax.vmap(env.reset, in_axes=(0, None))(jax.random.split(k_reset, NUM_ENVS), params)
        net_params = net.init(k_init, obs)
        carry = (net_params, tx.init(net_params), env_state, obs, key)
        carry, metrics = jax.lax.scan(update, carry, None, NUM_UPDATES)
        return net_params, carry[0], metrics

    return train


def test_minimal_gymnax_ppo_trains_on_serving_node():
    initial, trained, metrics = jax.jit(make_train())(jax.random.key(0))
    leaves_before, leaves_after = jax.tree.leaves(initial), jax.tree.leaves(trained)
    assert all(np.isfinite(np.asarray(x)).all() for x in leaves_after)
    assert any(not np.allclose(a, b) for a, b in zip(leaves_before, leaves_after))
    assert np.isfinite(np.asarray(metrics["loss"])).all()
    # 32 steps per update with 16-tick episodes: every env finishes two episodes per update,
    # and LogWrapper reports their returns.
    np.testing.assert_array_equal(np.asarray(metrics["episodes"]), 2 * NUM_ENVS)
    assert np.isfinite(np.asarray(metrics["episode_return"])).all()
    print(f"\nloss per update {np.asarray(metrics['loss'])}, episode return {np.asarray(metrics['episode_return'])}")
