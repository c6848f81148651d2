"""Mixture of experts with zero-computation (identity) experts (spec section 3).

    logits = x_f32 @ W_router                     # [T, N+Z], fp32
    w, idx = top-k of softmax(logits) + expert_bias (bias selects only), w *= routed_scaling_factor
    y = sum_j w_j * (FFN_{idx_j}(x) if idx_j < N else x)

Zero experts cost no FLOPs: their slots are folded into one scale of `x`, and only the FFN slots
are sorted by expert and run through the grouped matmul (dropless).

Variable collections, each with the same tree shape so that updates are name-free `tree.map`s:
  - `expert_bias` (state, not trained): [N+Z] float32 selection bias (`e_score_correction_bias`).
  - `expert_load` (output): [N+Z] float32 number of (token, slot) assignments per expert.
Flax `intermediates`: `ffn_experts_per_token` [B, S] and `router_prob_mean` [N+Z] (differentiable,
for the balance loss).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from longcat_jax.config import ConfigDict, num_experts_total
from longcat_jax.model.experts import dropless_experts  # noqa: F401  (re-exported)
from longcat_jax.model.layers import param
from longcat_jax.model.placement import LOCAL, Placement

EXPERT_BIAS = "expert_bias"
EXPERT_LOAD = "expert_load"


class MoE(nn.Module):
  """Router + FFN experts + zero experts, dropless."""

  config: ConfigDict
  placement: Placement = LOCAL

  @nn.compact
  def __call__(self, x):
    """x [B, S, H] (normed) -> [B, S, H]."""
    c = self.config
    b, s, hdim = x.shape
    e, n = num_experts_total(c), c.num_ffn_experts
    router = param(self, "router", (hdim, e), ("embed", "exp_all"), dtype=jnp.float32)
    bias = self.variable(EXPERT_BIAS, "router", lambda: jnp.zeros((e,), jnp.float32))
    xt = x.reshape(b * s, hdim)
    logits = jnp.dot(xt.astype(jnp.float32), router.astype(jnp.float32))
    # Under a mesh the top-k runs per device on its own tokens (ffn_counts stay global sums).
    weights, indices, ffn_counts = self.placement.route(logits, bias.value, config=c, batch_shape=(b, s))

    # Routing statistics: load (for the controller), FFN experts per token, mean router probs.
    load = jnp.bincount(indices.reshape(-1), length=e).astype(jnp.float32)
    self.sow(EXPERT_LOAD, "router", load, init_fn=lambda: jnp.zeros((e,), jnp.float32),
             reduce_fn=lambda _, new: new)
    self.sow("intermediates", "ffn_experts_per_token", (indices < n).sum(-1).reshape(b, s))
    self.sow("intermediates", "router_prob_mean", jax.nn.softmax(logits, -1).mean(0))

    if n == 0:
      out = weights.sum(-1, keepdims=True) * xt.astype(jnp.float32)
      return out.astype(x.dtype).reshape(b, s, hdim)
    i = c.expert_ffn_size
    w_gate = param(self, "w_gate", (n, hdim, i), ("exp", "embed", "expert_mlp"))
    w_up = param(self, "w_up", (n, hdim, i), ("exp", "embed", "expert_mlp"))
    w_down = param(self, "w_down", (n, i, hdim), ("exp", "expert_mlp", "embed"))
    out = self.placement.experts(xt, weights, indices, ffn_counts, w_gate, w_up, w_down, config=c,
                                 batch_shape=(b, s))
    return self.placement.constrain(out.reshape(b, s, hdim), ("batch", "length", "embed"))
