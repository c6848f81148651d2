"""Expert computation placement. Single device: `dropless_experts` on the local tokens.

The sharded (expert-parallel) dispatch plugs in here, so the model never branches on layout.
"""

from __future__ import annotations

from longcat_jax.model.attention import kernel_impl
from longcat_jax.model.moe import dropless_experts


def experts(x, weights, indices, ffn_counts, w_gate, w_up, w_down, *, config):
  """x [T, H], weights/indices [T, k], ffn_counts [N] -> [T, H] routed-expert output."""
  return dropless_experts(x, weights, indices, ffn_counts, w_gate, w_up, w_down,
                          num_ffn_experts=config.num_ffn_experts, implementation=kernel_impl(config),
                          block_m=config.moe_block_size)
