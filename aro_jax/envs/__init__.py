"""The LLM-serving simulator; importing it registers `ServingNode-v0` (one region) and
`ServingCluster-v0` (regions coupled by rebalancing) with gymnax."""

import gymnax

from aro_jax.envs.cluster import ServingCluster
from aro_jax.envs.serving import ServingNodeEnv

for _name, _env in (("ServingNode-v0", ServingNodeEnv), ("ServingCluster-v0", ServingCluster)):
    if _name not in gymnax.registered_envs:
        gymnax.register(_name, _env)

__all__ = ["ServingCluster", "ServingNodeEnv"]
