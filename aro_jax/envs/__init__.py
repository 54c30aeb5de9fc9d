"""The LLM-serving node simulator; importing it registers `ServingNode-v0` with gymnax."""

import gymnax

from aro_jax.envs.serving import ServingNodeEnv

if "ServingNode-v0" not in gymnax.registered_envs:
    gymnax.register("ServingNode-v0", ServingNodeEnv)

__all__ = ["ServingNodeEnv"]
