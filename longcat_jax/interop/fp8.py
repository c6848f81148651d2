"""Block-quantized FP8 (e4m3) weights as the LongCat / DeepSeek FP8 releases store them.

A weight W [out, in] is stored as `q = fp8_e4m3(W / s)` with one float32 `weight_scale_inv`
s [ceil(out / B0), ceil(in / B1)] per B0 x B1 block (B = quantization_config.weight_block_size,
[128, 128] in the releases); dequantization is `W[i, j] = q[i, j] * s[i // B0, j // B1]`, the
last partial blocks cropped (spec section 4b).

Requantizing a dequantized weight with the SAME scales gives the stored bytes back: q * s is
exact to float32 (or bfloat16) rounding, a relative error far below half an e4m3 step (2^-4), so
round(fl(q * s) / s) == q. `tests/test_interop_fp8.py` checks this on every e4m3 value.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
E4M3_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)   # 448
SCALE_SUFFIX = "_scale_inv"                                        # "x.weight" -> "x.weight_scale_inv"


def scale_shape(shape: tuple[int, int], block: tuple[int, int]) -> tuple[int, int]:
  """[ceil(out / B0), ceil(in / B1)]."""
  return (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]))


def expand_scales(scale: np.ndarray, rows: tuple[int, int], cols: tuple[int, int], block) -> np.ndarray:
  """The per-element scales of rows [r0, r1) x cols [c0, c1): [r1 - r0, c1 - c0] float32."""
  (r0, r1), (c0, c1) = rows, cols
  bi = np.arange(r0, r1) // block[0]
  bj = np.arange(c0, c1) // block[1]
  return scale[bi[:, None], bj[None, :]].astype(np.float32)


def dequantize(q: np.ndarray, scale: np.ndarray, rows: tuple[int, int], cols: tuple[int, int], block,
               dtype) -> np.ndarray:
  """q [r1 - r0, c1 - c0] (e4m3, the stored rows/cols of a weight) -> `dtype`, computed in float32."""
  w = q.astype(np.float32)
  w *= expand_scales(scale, rows, cols, block)
  return w.astype(dtype, copy=False)


def block_scales(w: np.ndarray, block) -> np.ndarray:
  """Fresh scales for w [out, in]: amax of each block / 448 (float32; 0 for an all-zero block)."""
  out, inn = w.shape
  ob, ib = scale_shape(w.shape, block)
  a = np.zeros((ob * block[0], ib * block[1]), np.float32)
  a[:out, :inn] = np.abs(w.astype(np.float32))
  return (a.reshape(ob, block[0], ib, block[1]).max(axis=(1, 3)) / E4M3_MAX).astype(np.float32)


def quantize(w: np.ndarray, scale: np.ndarray, rows: tuple[int, int], cols: tuple[int, int], block) -> np.ndarray:
  """Rows/cols of a weight -> e4m3 with the given scales (values beyond 448 s saturate)."""
  s = expand_scales(scale, rows, cols, block)
  x = np.divide(w.astype(np.float32), s, out=np.zeros(s.shape, np.float32), where=s > 0)
  np.clip(x, -E4M3_MAX, E4M3_MAX, out=x)
  return x.astype(E4M3)
