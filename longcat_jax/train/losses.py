"""Training losses, all in float32 (spec sections 3, 5 and 6).

    nll, n = next_token_nll(hidden, unembed, targets, weights)    # chunked, fused gradient
    z = hidden_z_loss(last_hidden, token_mask)                     # report's hidden z-loss
    lb = balance_loss(router_prob_mean, expert_load, ...)          # device-level, FFN : zero
    mtp_nll, mtp_n = mtp_nll_sum(mtp_hidden, unembed, targets, loss_mask)

Everything is segment-aware through the data pipeline's `loss_mask` (0 at each packed document's
last token and on padding), so no loss term predicts across a document boundary.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

# Logit elements per chunk of `next_token_nll` ([chunk_tokens, vocab] float32 = 64 MiB).
DEFAULT_CHUNK_ELEMENTS = 1 << 24


def default_chunk_tokens(vocab_size: int, num_tokens: int) -> int:
  return max(1, min(num_tokens, DEFAULT_CHUNK_ELEMENTS // vocab_size))


# ---------------------------------------------------------------------------------------------
# Next-token cross-entropy without materialising [B, S, V] logits.


def _chunk_stats(h, w_out, t, wt):
  """One chunk: h [C, H], w_out [H, V], targets [C], weights [C] -> (sum nll, dlogits [C, V])."""
  logits = jnp.dot(h, w_out, preferred_element_type=jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  tgt = jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0]
  nll = jnp.sum((lse - tgt) * wt)
  dlogits = (jnp.exp(logits - lse[:, None]) - jax.nn.one_hot(t, logits.shape[-1], dtype=jnp.float32))
  return nll, dlogits * wt[:, None]


def _chunks(hidden, targets, weights, chunk_tokens):
  h = hidden.reshape(-1, hidden.shape[-1])
  t = targets.reshape(-1).astype(jnp.int32)
  w = weights.reshape(-1).astype(jnp.float32)
  n = h.shape[0]
  pad = (-n) % chunk_tokens
  if pad:
    h = jnp.pad(h, ((0, pad), (0, 0)))
    t, w = jnp.pad(t, (0, pad)), jnp.pad(w, (0, pad))
  nc = h.shape[0] // chunk_tokens
  return h.reshape(nc, chunk_tokens, -1), t.reshape(nc, chunk_tokens), w.reshape(nc, chunk_tokens), n


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _nll_sum(hidden, unembed, targets, weights, chunk_tokens, transpose_tile):
  h, t, w, _ = _chunks(hidden, targets, weights, chunk_tokens)
  w_out = unembed.astype(hidden.dtype)

  def body(acc, xs):
    logits = jnp.dot(xs[0], w_out, preferred_element_type=jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, xs[1][:, None], axis=-1)[:, 0]
    return acc + jnp.sum((lse - tgt) * xs[2]), None

  total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (h, t, w))
  return total


def _nll_sum_fwd(hidden, unembed, targets, weights, chunk_tokens, transpose_tile):
  # The gradient is computed chunk by chunk in the forward pass (logits never stored, never
  # recomputed): d/dh = dlogits @ W^T, d/dW = sum_chunks h^T dlogits, accumulated transposed
  # ([V, H] += dlogits^T h, one transpose in the backward, `transpose_2d`): on XLA:CPU the [H, V] accumulation ran at
  # 71 GFLOP/s against 90 (`small`'s 4 x 512 x 32768 loss and gradient 2.89 -> 2.30 s).
  h, t, w, n = _chunks(hidden, targets, weights, chunk_tokens)
  w_out = unembed.astype(hidden.dtype)

  def body(carry, xs):
    total, dw_t = carry
    nll, dlogits = _chunk_stats(xs[0], w_out, xs[1], xs[2])
    dl = dlogits.astype(hidden.dtype)
    dh = jnp.dot(dl, w_out.T, preferred_element_type=jnp.float32)
    dw_t = dw_t + jnp.dot(dl.T, xs[0], preferred_element_type=jnp.float32)
    return (total + nll, dw_t), dh

  init = (jnp.zeros((), jnp.float32), jnp.zeros(unembed.shape[::-1], jnp.float32))
  (total, dw_t), dh = jax.lax.scan(body, init, (h, t, w))
  dh = dh.reshape(-1, hidden.shape[-1])[:n].reshape(hidden.shape)
  return total, (dh.astype(hidden.dtype), dw_t.astype(unembed.dtype), targets, weights)


def _nll_sum_bwd(chunk_tokens, transpose_tile, res, g):
  dh, dw_t, targets, weights = res
  zeros_t = np.zeros(targets.shape, jax.dtypes.float0)
  dw = transpose_2d(g.astype(dw_t.dtype) * dw_t, transpose_tile)
  return (g.astype(dh.dtype) * dh, dw, zeros_t, jnp.zeros_like(weights))


def transpose_2d(x, row_tile: int = 0):
  """x [R, C] -> x.T; with `row_tile` > 0 as the concatenation of the transposes of `row_tile`-row
  slices. Same values; only the speed differs: XLA:CPU's emitter moves a transpose larger than the
  caches slowly, each small one fast ([32768, 512] float32: 112 ms as one transpose, 27 ms as 128
  of 256 rows, medians of 7 on a 2-core Xeon). Slicing a sharded row axis would make the SPMD
  partitioner move data, so callers tile only where the array lives on one device."""
  if row_tile <= 0 or x.shape[0] <= row_tile:
    return x.T
  return jnp.concatenate([x[i:i + row_tile].T for i in range(0, x.shape[0], row_tile)], axis=1)


_nll_sum.defvjp(_nll_sum_fwd, _nll_sum_bwd)


def next_token_nll(hidden, unembed, targets, weights, *, chunk_tokens: int | None = None,
                   transpose_tile: int = 0):
  """Summed cross-entropy and its weight: hidden [B, S, H] (final-normed), unembed [H, V],
  targets [B, S] int, weights [B, S] (the loss mask) -> (sum_t w_t * nll_t, sum_t w_t), float32.

  Tokens go through the output projection `chunk_tokens` at a time under a `lax.scan`, with a
  float32 logsumexp; the gradient is formed per chunk in the forward pass (custom VJP), so at
  most [chunk_tokens, V] logits exist at once, in the forward and the backward pass. Sums (not
  means) so that gradient accumulation over microbatches normalises exactly once.
  `transpose_tile`: see `transpose_2d` (the unembedding gradient's one transpose; 0 = plain).
  """
  num_tokens = hidden.shape[0] * hidden.shape[1]
  chunk = chunk_tokens or default_chunk_tokens(unembed.shape[-1], num_tokens)
  weights = weights.astype(jnp.float32)
  return (_nll_sum(hidden, unembed, targets, weights, min(chunk, num_tokens), int(transpose_tile)),
          jnp.sum(weights))


def reference_nll(hidden, unembed, targets, weights):
  """The definition (materialises all logits), for tests."""
  logits = jnp.einsum("bsh,hv->bsv", hidden, unembed.astype(hidden.dtype), preferred_element_type=jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  w = weights.astype(jnp.float32)
  return jnp.sum(nll * w), jnp.sum(w)


# ---------------------------------------------------------------------------------------------
# Hidden z-loss (spec section 5).


def hidden_z_loss_sum(last_hidden, token_mask):
  """sum_t (logsumexp_i |z_t,i|)^2 over real tokens; z = last-layer hidden [B, S, H].

  The report's `lambda / T * sum_t (logsumexp_i |z_t,i|)^2` (the caller multiplies by lambda and
  divides by T). z is the residual stream leaving the last layer, before the final RMSNorm: that
  is where massive activations grow (after the norm every vector has RMS 1).
  """
  lse = jax.nn.logsumexp(jnp.abs(last_hidden.astype(jnp.float32)), axis=-1)
  return jnp.sum(jnp.square(lse) * token_mask.astype(jnp.float32))


# ---------------------------------------------------------------------------------------------
# Device-level balance loss (spec section 3).


def balance_groups(num_ffn_experts: int, zero_experts: int, num_groups: int):
  """Group id of every router class [N + Z]: FFN expert i -> i // (N / D), zero experts -> D."""
  if num_ffn_experts % num_groups:
    raise ValueError(f"num_ffn_experts={num_ffn_experts} is not divisible by the {num_groups} "
                     "expert-parallel balance groups")
  per = num_ffn_experts // num_groups
  return jnp.concatenate([jnp.arange(num_ffn_experts) // per,
                          jnp.full((zero_experts,), num_groups)]).astype(jnp.int32)


def balance_targets(num_groups: int, top_k: int, target_ffn_experts: float, zero_experts: int):
  """Target share q_j of the assignments per group [D + 1]: K_e/(K*D) per FFN group, 1 - K_e/K zero."""
  ffn_share = target_ffn_experts / top_k if zero_experts else 1.0
  return jnp.concatenate([jnp.full((num_groups,), ffn_share / num_groups),
                          jnp.array([1.0 - ffn_share])]).astype(jnp.float32)


def balance_loss(router_prob_mean, expert_load, *, num_ffn_experts: int, zero_experts: int, top_k: int,
                 target_ffn_experts: float, num_groups: int = 1):
  """Device-level balance loss (without alpha), averaged over layers.

  router_prob_mean [L, N+Z] (mean router probability per class, differentiable), expert_load
  [L, N+Z] (assignment counts, no gradient). Groups: D FFN groups (one per expert-parallel
  device) + one group of all zero experts. With f_j the group's share of the (token, slot)
  assignments and P_j its summed mean probability:

      L_LB = sum_j (f_j / q_j) * P_j,    q_j = K_e / (K D) for FFN groups, 1 - K_e / K for zero

  Normalisation chosen here (the report's eq. 3-5 were not recovered): dividing by the target
  share q_j makes the loss exactly 1 whenever every group carries its target share (for any P,
  since sum_j P_j = 1), and its gradient moves probability from groups above their share to
  groups below it; so it pushes the FFN : zero ratio to K_e : (K - K_e) and spreads FFN load
  evenly over devices. With uniform q (no zero experts) it is the usual D * sum_j f_j P_j.
  """
  groups = balance_groups(num_ffn_experts, zero_experts, num_groups)
  onehot = jax.nn.one_hot(groups, num_groups + 1, dtype=jnp.float32)           # [E, D+1]
  load = jax.lax.stop_gradient(expert_load.astype(jnp.float32))
  f = (load @ onehot) / jnp.maximum(load.sum(-1, keepdims=True), 1.0)          # [L, D+1]
  p = router_prob_mean.astype(jnp.float32) @ onehot                            # [L, D+1]
  q = balance_targets(num_groups, top_k, target_ffn_experts, zero_experts)
  ratio = jnp.where(q > 0, f / jnp.where(q > 0, q, 1.0), 0.0)
  return jnp.mean(jnp.sum(ratio * p, axis=-1))


# ---------------------------------------------------------------------------------------------
# Multi-token prediction (spec section 6).


def mtp_targets(input_ids, loss_mask, num_heads: int):
  """Targets and weights for MTP head k = 1..N (head k predicts token t + k + 1) -> [N, B, S] each.

  Head k at position t is valid only if the tokens t .. t + k + 1 all belong to one document,
  i.e. loss_mask[t .. t + k] are all 1 (loss_mask[t] = 1 iff t + 1 is in t's document).
  """
  b, s = input_ids.shape
  targets, weights = [], []
  valid = loss_mask.astype(jnp.float32)
  for k in range(1, num_heads + 1):
    shifted_mask = jnp.pad(loss_mask.astype(jnp.float32), ((0, 0), (0, k)))[:, k:]
    valid = valid * shifted_mask
    targets.append(jnp.pad(input_ids, ((0, 0), (0, k + 1)))[:, k + 1:])
    weights.append(valid)
  return jnp.stack(targets), jnp.stack(weights)


def shifted_inputs(input_ids, k: int):
  """tok_{t+k} at position t [B, S] (0 past the end; masked by `mtp_targets`' weights)."""
  return jnp.pad(input_ids, ((0, 0), (0, k)))[:, k:]
