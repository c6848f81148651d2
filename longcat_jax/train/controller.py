"""Compute-budget controller: the expert-bias update after every step (spec section 3).

    delta_b_i = mu_t * (K_e / K * 1 / N - T_i / (K * T_all))      for FFN experts i < N

T_i = (token, slot) assignments to FFN expert i in the GLOBAL batch, T_all = tokens in the batch
(so K * T_all = all assignments), K_e = `config.target_ffn_experts`. When FFN experts together get
more than K_e of the K slots per token their biases fall, and zero experts win more slots; at the
fixed point every FFN expert receives K_e / (K N) of the assignments, i.e. K_e FFN experts per
token on average, spread evenly. Zero experts' biases stay put (spec: [unverified] but the
natural choice: the FFN biases alone set the FFN : zero ratio). The bias is state, never seen by
the optimizer.

The rate decays, mu_t = mu / sqrt(1 + t / decay_steps): large early to reach the target fast,
smaller later so that the bias settles instead of oscillating around it (the report's "PID-like"
controller with a decaying rate).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def bias_rate(step, rate: float, decay_steps: float):
  """mu_t = rate / sqrt(1 + step / decay_steps) (decay_steps <= 0: constant)."""
  step = jnp.asarray(step, jnp.float32)
  if decay_steps <= 0:
    return jnp.asarray(rate, jnp.float32)
  return rate * jax.lax.rsqrt(1.0 + step / decay_steps)


def update_bias(bias, load, *, num_ffn_experts: int, top_k: int, target_ffn_experts: float, rate):
  """One leaf: bias [..., N+Z] float32, load [..., N+Z] assignment counts -> new bias."""
  load = load.astype(jnp.float32)
  total = jnp.maximum(load.sum(-1, keepdims=True), 1.0)           # K * T_all
  n = num_ffn_experts
  delta = rate * (target_ffn_experts / top_k / n - load[..., :n] / total)
  return bias.at[..., :n].add(delta.astype(bias.dtype))


def update_expert_bias(expert_bias, expert_load, config, step, *, rate: float, decay_steps: float):
  """The whole `expert_bias` collection, name-free: `jax.tree.map(update, bias, load)`."""
  mu = bias_rate(step, rate, decay_steps)
  update = lambda b, l: update_bias(b, l, num_ffn_experts=config.num_ffn_experts, top_k=config.top_k,
                                    target_ffn_experts=config.target_ffn_experts, rate=mu)
  if config.num_ffn_experts == 0:
    return expert_bias
  return jax.tree.map(update, expert_bias, expert_load)


def ffn_experts_stats(ffn_experts_per_token, token_mask):
  """Mean and std over real tokens of FFN experts per token, per layer.

  ffn_experts_per_token [L, B, S] int, token_mask [B, S] -> (mean [L], std [L]) float32.
  """
  x = ffn_experts_per_token.astype(jnp.float32)
  m = token_mask.astype(jnp.float32)[None]
  n = jnp.maximum(m.sum(axis=(1, 2)), 1.0)
  mean = (x * m).sum(axis=(1, 2)) / n
  var = (jnp.square(x - mean[:, None, None]) * m).sum(axis=(1, 2)) / n
  return mean, jnp.sqrt(var)
