"""Small building blocks: parameters with logical axes, RMSNorm, interleaved RoPE, SwiGLU MLP."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from longcat_jax.config import ConfigDict, dtype_of
from longcat_jax.model import rope_scaling
from longcat_jax.model.placement import LOCAL, Placement


def param(module: nn.Module, name: str, shape, axes: tuple[str, ...], init=None, dtype=None):
  """A parameter annotated with logical axis names (mapped to mesh axes by `parallel.sharding`)."""
  c = module.config
  if init is None:
    init = nn.initializers.normal(c.initializer_range)
  if len(axes) != len(shape):
    raise ValueError(f"{module.name}/{name}: {len(axes)} axis names {axes} for shape {shape}")
  dtype = dtype or dtype_of(c.param_dtype)
  return module.param(name, nn.with_logical_partitioning(init, axes), tuple(shape), dtype)


def rms_norm(x, scale, eps: float):
  """`w * (x_f32 * rsqrt(mean(x^2) + eps)).astype(dtype)` exactly as the reference (spec section 1)."""
  xf = x.astype(jnp.float32)
  y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return scale.astype(x.dtype) * y.astype(x.dtype)


class RMSNorm(nn.Module):
  config: ConfigDict
  eps: float
  axis_name: str = "norm"

  @nn.compact
  def __call__(self, x):
    scale = param(self, "scale", (x.shape[-1],), (self.axis_name,), nn.initializers.ones)
    return rms_norm(x, scale, self.eps)


def rope_inv_freq(config: ConfigDict) -> tuple[np.ndarray, float]:
  """Inverse frequencies [rope_dim / 2] and the cos/sin attention factor (1.0 without YaRN)."""
  d = config.qk_rope_head_dim
  inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, d, 2, dtype=np.float32) / d))
  if config.rope_scaling is not None:
    return rope_scaling.scaled_inv_freq(config, inv_freq)
  return inv_freq.astype(np.float32), 1.0


def rope_cos_sin(config: ConfigDict, positions):
  """cos, sin [batch, seq, rope_dim / 2] float32 for integer positions [batch, seq]."""
  inv_freq, factor = rope_inv_freq(config)
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  return jnp.cos(angles) * factor, jnp.sin(angles) * factor


def apply_rope(x, cos, sin):
  """DeepSeek interleaved RoPE on x [batch, seq, (heads,) rope_dim].

  Pairs (2i, 2i+1) rotate by angle i. Like the reference, the result is laid out de-interleaved
  ([rotated evens | rotated odds]); attention scores do not depend on that layout as q and k
  share it.
  """
  if x.ndim == 4:
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  x1, x2 = x[..., 0::2].astype(jnp.float32), x[..., 1::2].astype(jnp.float32)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def token_matmul(x, w, contract: int = 1, placement: Placement = LOCAL):
  """x [B, S, *in] . w [*in, *out] -> [B, S, *out] (`contract` = len(in)).

  On one device this is one 2-D matmul over the B*S tokens: on XLA:CPU the weight gradient of a
  [B, S, d_in] dot otherwise gets its activation cotangent transposed by a copy fused with the
  preceding elementwise backward (slow), while a [tokens, d_in] dot takes it as it is. Under a
  mesh placement it is the plain einsum, so that a sequence split over devices (context
  parallelism) is never merged with the batch axis (which would need an all-gather).
  """
  if x.ndim != 2 + contract or w.shape[:contract] != x.shape[2:]:
    raise ValueError(f"token_matmul: x {x.shape} and w {w.shape} do not share {contract} contracted dims")
  if placement.distributed:
    return jnp.tensordot(x, w, axes=contract)
  b, s = x.shape[:2]
  d_in = math.prod(x.shape[2:])
  y = jnp.dot(x.reshape(b * s, d_in), w.reshape(d_in, -1))
  return y.reshape(b, s, *w.shape[contract:])


class DenseMLP(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x)), no biases."""

  config: ConfigDict
  placement: Placement = LOCAL

  @nn.compact
  def __call__(self, x):
    c, p = self.config, self.placement
    dt = dtype_of(c.dtype)
    gate = param(self, "gate", (c.hidden_size, c.ffn_size), ("embed", "mlp"))
    up = param(self, "up", (c.hidden_size, c.ffn_size), ("embed", "mlp"))
    down = param(self, "down", (c.ffn_size, c.hidden_size), ("mlp", "embed"))
    h = nn.silu(token_matmul(x, gate.astype(dt), placement=p)) * token_matmul(x, up.astype(dt), placement=p)
    h = p.constrain(h, ("batch", "length", "act_mlp"))
    return token_matmul(h, down.astype(dt), placement=p)

