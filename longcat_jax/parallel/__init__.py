"""Parallelism: device mesh + logical-axis table (sharding.py), the model's mesh placement
(placement.py: sharding constraints, expert parallelism in expert_parallel.py, context parallelism
in context_parallel.py), multi-host initialisation and data feeding (distributed.py)."""

from longcat_jax.parallel.placement import MeshPlacement
from longcat_jax.parallel.sharding import (LOGICAL_AXIS_RULES, MESH_AXES, batch_sharding, check_replicated,
                                           logical_to_spec, make_mesh, parallel_config, replicated_params,
                                           variable_shardings)

__all__ = ["LOGICAL_AXIS_RULES", "MESH_AXES", "MeshPlacement", "batch_sharding", "check_replicated",
           "logical_to_spec", "make_mesh", "parallel_config", "replicated_params", "variable_shardings"]
