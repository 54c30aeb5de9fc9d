"""The architecture holds: PPO is a generic gymnax learner (it trains CartPole without the
serving env or the experiment config), and imports inside aro_jax form no cycle and point
down the layers (contract <- envs <- algorithms <- federated <- config <- training <-
deploy, sweep <- cli)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "aro_jax"

# The layer of each top-level part; an import may point to its own part or a lower layer.
LAYERS = {
    "contract": 0, "envs": 1, "algorithms": 2, "federated": 3, "config": 4, "training": 5,
    "deploy": 6, "sweep": 6, "capacity": 6, "calibrate": 6, "cli": 7,
}

CARTPOLE = r"""
import sys
import jax, jax.numpy as jnp, gymnax
from aro_jax.algorithms import ppo

env, params = gymnax.make("CartPole-v1")
config = ppo.PPOConfig(num_envs=16, rollout_steps=128, num_minibatches=8, update_epochs=4, total_updates=120)
learner = ppo.make_train(env, params, config)
state, metrics = jax.jit(learner.train)(jax.random.PRNGKey(0), ppo.Hyperparams(lr=2.5e-3, gamma=0.99, ent_coef=0.01))

def greedy_return(key):
    obs, s = env.reset(key, params)
    def step(carry, k):
        obs, s, total, alive = carry
        logits, _ = learner.network.apply(state.params, state.obs_stats.normalize(obs))
        obs, s, r, term, trunc, _ = env.step(k, s, jnp.argmax(logits), params)
        total = total + alive * r
        return (obs, s, total, alive * (1.0 - jnp.logical_or(term, trunc))), None
    (_, _, total, _), _ = jax.lax.scan(step, (obs, s, 0.0, 1.0), jax.random.split(key, 500))
    return total

returns = jax.vmap(greedy_return)(jax.random.split(jax.random.PRNGKey(1), 16))
leaked = [m for m in ("aro_jax.envs.serving", "aro_jax.config", "aro_jax.training") if m in sys.modules]
print(f"RETURN {float(returns.mean()):.1f} LEAKED {','.join(leaked) or '-'}")
"""


@pytest.mark.timeout(300)
def test_generic_ppo_learns_cartpole_without_serving_code():
    out = subprocess.run([sys.executable, "-c", CARTPOLE], capture_output=True, text=True, timeout=280,
                         env={"XLA_FLAGS": "--xla_cpu_enable_concurrency_optimized_scheduler=false", "PATH": ""})
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("RETURN"))
    _, ret, _, leaked = line.split()
    assert leaked == "-", f"the generic learner imported {leaked}"
    # A uniform-random CartPole policy lasts ~22 steps and an untrained greedy one ~9;
    # 61k env steps of working PPO balance the pole for hundreds.
    assert float(ret) >= 195.0, line


def _imports(path: Path, module: str) -> set[str]:
    """aro_jax modules `module` imports anywhere in its file (lazy imports included)."""
    modules = {str(p.relative_to(PACKAGE.parent).with_suffix("")).replace("/", ".").removesuffix(".__init__")
               for p in PACKAGE.rglob("*.py")}
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("aro_jax")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("aro_jax"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in modules else node.module)
    return {m for m in found if m != module and m != "aro_jax"}


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for p in PACKAGE.rglob("*.py"):
        module = str(p.relative_to(PACKAGE.parent).with_suffix("")).replace("/", ".").removesuffix(".__init__")
        graph[module] = _imports(p, module)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the graph as a list of modules, or None (depth-first search)."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        state[m] = "done"
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_find_cycle_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_inside_aro_jax():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_imports_point_down_the_layers():
    part = lambda m: m.split(".")[1]  # noqa: E731
    upward = [f"{m} imports {n}" for m, deps in import_graph().items() for n in deps
              if part(n) != part(m) and LAYERS[part(n)] >= LAYERS[part(m)]]
    assert not upward, upward


def test_export_loader_and_contract_import_without_jax():
    code = ("import sys; import aro_jax.contract, aro_jax.deploy.export; "
            "print('JAX' if 'jax' in sys.modules else 'NOJAX')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "NOJAX"
