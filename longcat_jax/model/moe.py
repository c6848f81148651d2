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
import numpy as np

import pallas_kernels
from longcat_jax.config import ConfigDict, dtype_of, num_experts_total
from longcat_jax.model.layers import constrain, param

EXPERT_BIAS = "expert_bias"
EXPERT_LOAD = "expert_load"


@jax.custom_vjp
def _permute_rows(x, perm, inv):
  """x[perm] for a permutation `perm` of the rows (inv = its inverse); the cotangent is a gather
  by `inv`, not the scatter-add that `jnp.take`'s transpose would be."""
  return jnp.take(x, perm, axis=0)


def _permute_rows_fwd(x, perm, inv):
  return jnp.take(x, perm, axis=0), (perm, inv)


def _permute_rows_bwd(res, g):
  perm, inv = res
  zero = lambda a: np.zeros(a.shape, jax.dtypes.float0)
  return jnp.take(g, inv, axis=0), zero(perm), zero(inv)


_permute_rows.defvjp(_permute_rows_fwd, _permute_rows_bwd)


def dropless_experts(x, weights, indices, ffn_counts, w_gate, w_up, w_down, *, num_ffn_experts: int,
                     implementation=None, block_m: int = 64):
  """Routed-expert output on one device.

  x [T, H] (the normed MoE input), weights/indices [T, k], ffn_counts [N] (assignments per FFN
  expert), w_gate/w_up [N, H, I], w_down [N, I, H] -> [T, H]. Includes the zero-expert term.

  Rows are the (token, slot) pairs sorted by expert. The routing weight is applied to a row's
  hidden activation before the down projection (sum_j w_j (h_j W_down) = sum_j (w_j h_j) W_down),
  so no [T, k, H] expert output is kept for the backward, and the slots are summed per token
  by an unweighted gather.
  """
  t, k = indices.shape
  flat = indices.reshape(-1)
  is_ffn = flat < num_ffn_experts
  # Stable sort by expert; zero-expert slots get key N and land after every FFN row, where the
  # grouped matmul leaves them at zero.
  order = jnp.argsort(jnp.where(is_ffn, flat, num_ffn_experts), stable=True)
  inv = jnp.zeros_like(order).at[order].set(jnp.arange(order.size, dtype=order.dtype))  # order^-1
  slots = jnp.broadcast_to(x[:, None, :], (t, k, x.shape[-1])).reshape(t * k, -1)
  xs = _permute_rows(slots, order, inv)
  gmm = lambda a, w: pallas_kernels.grouped_matmul(a, w.astype(x.dtype), ffn_counts,
                                                   implementation=implementation, block_m=block_m)
  h = nn.silu(gmm(xs, w_gate)) * gmm(xs, w_up)
  w_rows = jnp.take(jnp.where(is_ffn, weights.reshape(-1), 0.0), order)  # [T k], 0 past the FFN rows
  ys = gmm((w_rows[:, None] * h.astype(jnp.float32)).astype(x.dtype), w_down)
  out = _permute_rows(ys, inv, order).reshape(t, k, -1).astype(jnp.float32).sum(1)
  w_zero = jnp.where(is_ffn.reshape(t, k), 0.0, weights).sum(-1, keepdims=True)
  return (out + w_zero * x.astype(jnp.float32)).astype(x.dtype)


class MoE(nn.Module):
  """Router + FFN experts + zero experts, dropless."""

  config: ConfigDict

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
    from longcat_jax.parallel import expert_parallel  # late import: parallel imports model types
    # topk_route, run per device under a mesh (ffn_counts stay global).
    weights, indices, ffn_counts = expert_parallel.route(logits, bias.value, config=c, batch_shape=(b, s))

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
    out = expert_parallel.experts(xt, weights, indices, ffn_counts, w_gate, w_up, w_down, config=c,
                                  batch_shape=(b, s))
    return constrain(out.reshape(b, s, hdim), ("batch", "length", "embed"))
