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


def _per_row_block(rows: tuple[int, int], cols: tuple[int, int], scale: np.ndarray, block):
  """(local row slice, per-column scales [c1 - c0]) for each block row that rows [r0, r1) touch."""
  (r0, r1), (c0, c1) = rows, cols
  for bi in range(r0 // block[0], -(-r1 // block[0])):
    a, b = max(r0, bi * block[0]), min(r1, (bi + 1) * block[0])
    col_scales = np.repeat(scale[bi].astype(np.float32), block[1])[c0:c1]
    yield slice(a - r0, b - r0), col_scales


def expand_scales(scale: np.ndarray, rows: tuple[int, int], cols: tuple[int, int], block) -> np.ndarray:
  """The per-element scales of rows [r0, r1) x cols [c0, c1): [r1 - r0, c1 - c0] float32."""
  out = np.empty((rows[1] - rows[0], cols[1] - cols[0]), np.float32)
  for sl, cs in _per_row_block(rows, cols, scale, block):
    out[sl] = cs
  return out


# Every e4m3 byte's float32 value: a table lookup is ~8x faster than ml_dtypes' element-wise cast.
_E4M3_TO_F32 = np.arange(256, dtype=np.uint8).view(E4M3).astype(np.float32)


def dequantize(q: np.ndarray, scale: np.ndarray, rows: tuple[int, int], cols: tuple[int, int], block,
               dtype) -> np.ndarray:
  """q [r1 - r0, c1 - c0] (e4m3, the stored rows/cols of a weight) -> `dtype`, computed in float32
  one block row at a time (no full-size scale array)."""
  out = np.empty(q.shape, dtype)
  codes = q.view(np.uint8)
  for sl, cs in _per_row_block(rows, cols, scale, block):
    w = _E4M3_TO_F32.take(codes[sl])
    w *= cs
    out[sl] = w
  return out


def block_scales(w: np.ndarray, block) -> np.ndarray:
  """Fresh scales for w [out, in]: amax of each block / 448 (float32; 0 for an all-zero block)."""
  out, inn = w.shape
  ob, ib = scale_shape(w.shape, block)
  a = np.zeros((ob * block[0], ib * block[1]), np.float32)
  a[:out, :inn] = np.abs(w.astype(np.float32))
  return (a.reshape(ob, block[0], ib, block[1]).max(axis=(1, 3)) / E4M3_MAX).astype(np.float32)


def quantize(w: np.ndarray, scale: np.ndarray, rows: tuple[int, int], cols: tuple[int, int], block) -> np.ndarray:
  """Rows/cols of a weight -> e4m3 with the given scales (values beyond 448 s saturate; a zero
  scale gives 0)."""
  out = np.empty(w.shape, E4M3)
  for sl, cs in _per_row_block(rows, cols, scale, block):
    x = np.divide(w[sl].astype(np.float32), cs, out=np.zeros((sl.stop - sl.start, cs.size), np.float32),
                  where=cs > 0)
    np.clip(x, -E4M3_MAX, E4M3_MAX, out=x)
    out[sl] = x.astype(E4M3)
  return out
