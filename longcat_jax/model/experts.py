"""The routed experts on one device: dropless, zero experts folded into one scale (spec section 3).

`dropless_experts` is the single-device expert computation behind `Placement.experts`; the
expert-parallel version (`longcat_jax.parallel.expert_parallel`) runs it per device.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels
from longcat_jax.config import ConfigDict


def kernel_impl(config: ConfigDict):
  """`config.kernels` -> the `implementation=` argument of the pallas_kernels entry points."""
  return None if config.kernels == "auto" else config.kernels


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
  if 2 * t * k <= num_ffn_experts:
    return _few_rows(x, weights, flat, is_ffn, w_gate, w_up, w_down)
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
  return _with_zero_experts(_permute_rows(ys, inv, order), x, weights, is_ffn)


def _with_zero_experts(ys, x, weights, is_ffn):
  """Per-(token, slot) outputs ys [T k, H] (already weighted) summed per token, plus the zero
  experts' term: their total routing weight times the input."""
  t, k = weights.shape
  out = ys.reshape(t, k, -1).astype(jnp.float32).sum(1)
  w_zero = jnp.where(is_ffn.reshape(t, k), 0.0, weights).sum(-1, keepdims=True)
  return (out + w_zero * x.astype(jnp.float32)).astype(x.dtype)


def _few_rows(x, weights, flat, is_ffn, w_gate, w_up, w_down):
  """`dropless_experts` for fewer (token, slot) rows than half the experts (a decode step): each
  row gathers its own expert's matrices, so only the experts the rows route to are read. (The
  grouped matmul visits every expert at least once: at batch 1 it read all of a layer's experts
  to use six.) Same sum, other association order; zero-expert slots read expert 0 at weight 0."""
  k = weights.shape[1]
  e = jnp.where(is_ffn, flat, 0)
  xs = jnp.repeat(x, k, axis=0)                                             # [T k, H]
  mm = lambda a, w, spec: jnp.einsum(spec, a, jnp.take(w, e, axis=0).astype(x.dtype))
  h = nn.silu(mm(xs, w_gate, "rh,rhi->ri")) * mm(xs, w_up, "rh,rhi->ri")
  w_rows = jnp.where(is_ffn, weights.reshape(-1), 0.0)
  ys = mm((w_rows[:, None] * h.astype(jnp.float32)).astype(x.dtype), w_down, "ri,rih->rh")
  return _with_zero_experts(ys, x, weights, is_ffn)
