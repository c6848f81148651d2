"""Parallelism: device mesh + logical-axis table (sharding.py), expert-parallel MoE dispatch
(expert_parallel.py), multi-host initialisation and data feeding (distributed.py)."""

from longcat_jax.parallel.sharding import (LOGICAL_AXIS_RULES, MESH_AXES, batch_sharding,
                                           check_replicated, current, logical_to_spec, make_mesh,
                                           mesh_context, parallel_config, replicated_params,
                                           variable_shardings)

__all__ = ["LOGICAL_AXIS_RULES", "MESH_AXES", "batch_sharding", "check_replicated", "current",
           "logical_to_spec", "make_mesh", "mesh_context", "parallel_config", "replicated_params",
           "variable_shardings"]
