"""YaRN RoPE scaling (LongCat-Flash-Lite, LongCat-2.0; spec section 2).

    inv_freq = inv_freq_interp * (1 - e) + inv_freq_extrap * e      # per frequency
    e        = 1 - clip((i - low) / (high - low), 0, 1)             # 1: keep, 0: interpolate by `factor`
    low/high = the dims whose wavelength turns beta_fast / beta_slow times in `original` positions
    cos, sin *= attention_factor                                    # get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)

The softmax-scale correction (qk_head_dim**-0.5 * get_mscale(factor, mscale_all_dim)**2) lives in
`config.softmax_scale`. `config.rope_scaling` holds the `rope_scaling` dict of config.json:
dict(type="yarn", factor, original_max_position_embeddings, beta_fast=32, beta_slow=1, mscale,
mscale_all_dim, [attention_factor], [truncate=True]) -- DeepSeek-V3's YaRN as in transformers'
`modeling_rope_utils._compute_yarn_parameters`.
"""

from __future__ import annotations

import math

import numpy as np

from longcat_jax.config import ConfigDict


def yarn_get_mscale(factor: float, mscale: float = 1.0) -> float:
  """0.1 * mscale * ln(factor) + 1 for factor > 1, else 1 (YaRN's attention temperature)."""
  return 0.1 * mscale * math.log(factor) + 1.0 if factor > 1 else 1.0


def yarn_correction_range(beta_fast: float, beta_slow: float, dim: int, base: float, original: int,
                          truncate: bool = True) -> tuple[float, float]:
  """Rotary-dimension range [low, high] over which YaRN ramps from extrapolation to interpolation."""

  def dim_of(num_rotations):  # the dimension whose wavelength makes `num_rotations` turns in `original`
    return dim * math.log(original / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

  low, high = dim_of(beta_fast), dim_of(beta_slow)
  if truncate:
    low, high = math.floor(low), math.ceil(high)
  return max(low, 0), min(high, dim - 1)


def scaled_inv_freq(config: ConfigDict, inv_freq: np.ndarray) -> tuple[np.ndarray, float]:
  """YaRN: unscaled inverse frequencies [rope_dim / 2] -> (scaled inv_freq, cos/sin attention factor)."""
  s = dict(config.rope_scaling)
  kind = s.get("type", s.get("rope_type"))
  if kind != "yarn":
    raise ValueError(f"rope_scaling type {kind!r} is not supported (only 'yarn')")
  dim = config.qk_rope_head_dim
  if inv_freq.shape != (dim // 2,):
    raise ValueError(f"inv_freq has shape {inv_freq.shape}, expected ({dim // 2},) for qk_rope_head_dim={dim}")
  original = s.get("original_max_position_embeddings")
  if original is None:
    raise ValueError("rope_scaling (yarn) needs original_max_position_embeddings")
  factor = s.get("factor")
  if factor is None:  # transformers' DeepSeek-V3 fallback
    factor = config.max_position_embeddings / original
  factor = float(factor)
  attention_factor = s.get("attention_factor")
  if attention_factor is None:
    mscale, mscale_all_dim = s.get("mscale"), s.get("mscale_all_dim")
    if mscale and mscale_all_dim:
      attention_factor = yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
    else:
      attention_factor = yarn_get_mscale(factor)
  low, high = yarn_correction_range(s.get("beta_fast") or 32, s.get("beta_slow") or 1, dim, config.rope_theta,
                                    original, s.get("truncate", True))
  if low == high:
    high += 0.001  # avoids a zero-width ramp
  ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
  extrapolate = 1.0 - ramp
  inv = inv_freq.astype(np.float32)
  scaled = (inv / factor) * (1.0 - extrapolate) + inv * extrapolate
  return scaled.astype(np.float32), float(attention_factor)
