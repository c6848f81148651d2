"""Grouped (ragged) matmul for dropless expert FFNs.

`grouped_matmul(lhs [M, K], rhs [G, K, N], group_sizes [G]) -> [M, N]`: rows of `lhs` are sorted
by group; rows `sum(group_sizes[:g]) .. + group_sizes[g]` are multiplied by `rhs[g]`; rows past
`sum(group_sizes)` give zeros (they hold tokens routed to zero experts, which cost nothing).
Empty groups are allowed. The Pallas and XLA-CPU paths carry custom VJPs,
dlhs = grouped_matmul(dy, rhs^T) and drhs[g] = lhs_g^T dy_g ("tgmm"); ragged_dot has JAX's own.

Implementations, in dispatch order:
  "triton" (Pallas, GPU; also the interpret-mode kernel). Work items are (row tile, group) pairs in
      row order, computed in jnp before the call like megablox's metadata: a group visits every
      `block_m`-row tile it overlaps, so a tile shared by two groups is visited twice and each
      visit stores only its own rows (masked store; race-free across parallel programs). At most
      `cdiv(M, block_m) + G - 1` items, a static grid bound; unused items return at once. Grid
      (N tiles, items); a program loops over K tiles accumulating [block_m, block_n] in f32. The
      output aliases a zeros buffer, so rows past sum(group_sizes) stay zero. dlhs runs the same
      kernel reading rhs tiles transposed (no [G, N, K] copy); drhs is a second kernel, grid
      (G, K tiles, N tiles), each program looping over its group's rows (empty group: zeros).
  "megablox" (Pallas, TPU): `jax.experimental.pallas.ops.tpu.megablox` gmm / tgmm with our own
      custom VJP, which also zeroes the rows past sum(group_sizes) that megablox leaves unwritten.
      Needs K and N multiples of 128 (else NotImplementedError and the XLA path runs).
  "xla": `jax.lax.ragged_dot` on TPU, whose XLA backend lowers it to a grouped GEMM. Elsewhere
      XLA expands it densely: on CPU ~3 GFLOP/s against ~120 for a dense matmul; on an H200 (JAX
      0.11.2) a [rows, G*K] x [G*K, N] product that asked for 188 GiB at Flash shapes and 64 GiB
      for a 2B-parameter model (experiments/bench_kernels.py, bench_mfu.py). So on CPU and GPU the
      rows are laid out in row blocks that each belong to one group (each group padded to a
      multiple of `block_m`) and a `fori_loop` over the blocks that hold rows (a dynamic count;
      the static bound's empty tail is skipped) does dense [block_m, K] x [K, N] products. Its
      backward is one loop computing both dlhs and drhs per block. Dropless: the padding is at
      most `G * (block_m - 1)` rows, nothing is dropped.
"""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.registry import Op, current_platform

grouped_matmul_op = Op("grouped_matmul")


def grouped_matmul(lhs, rhs, group_sizes, *, implementation: str | None = None, block_m: int = 64):
  """See the module docstring. `block_m`: row tile (Pallas) / row block (XLA CPU path)."""
  if lhs.ndim != 2 or rhs.ndim != 3 or group_sizes.ndim != 1:
    raise ValueError(f"grouped_matmul: want lhs [M, K], rhs [G, K, N], group_sizes [G]; got "
                     f"{lhs.shape}, {rhs.shape}, {group_sizes.shape}")
  if lhs.shape[1] != rhs.shape[1] or rhs.shape[0] != group_sizes.shape[0]:
    raise ValueError(f"grouped_matmul: lhs {lhs.shape}, rhs {rhs.shape}, group_sizes {group_sizes.shape} "
                     "disagree on K or G")
  return grouped_matmul_op(lhs, rhs, group_sizes.astype(jnp.int32), implementation=implementation,
                           block_m=block_m)


def grouped_matmul_reference(lhs, rhs, group_sizes):
  """The definition, for tests: a dense matmul per row with its group's matrix."""
  ends = jnp.cumsum(group_sizes)
  g = jnp.searchsorted(ends, jnp.arange(lhs.shape[0]), side="right")
  valid = g < rhs.shape[0]
  w = rhs[jnp.minimum(g, rhs.shape[0] - 1)]
  out = jnp.einsum("mk,mkn->mn", lhs, w, preferred_element_type=jnp.float32)
  return jnp.where(valid[:, None], out, 0).astype(lhs.dtype)


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _pad_to(x, shape):
  if tuple(shape) == x.shape:
    return x
  return jnp.pad(x, [(0, s - d) for d, s in zip(x.shape, shape)])


# Inside a `shard_map` (check_vma=True) every value's type names the mesh axes it varies over. A
# product of rows varying over the token axes with weights that do not (e.g. replicated over
# `data`) varies over both; the custom VJPs below must hand back each cotangent with its primal's
# type, so they sum over the extra axes: the transpose of the implicit broadcast of the primal.


def _varying(x) -> frozenset:
  return jax.typeof(x).manual_axis_type.varying


def _varying_zeros(shape, dtype, *like):
  """Zeros varying over the axes of `like` (a scan carry keeps the type of what it accumulates)."""
  axes = tuple(sorted(frozenset().union(*map(_varying, like))))
  zeros = jnp.zeros(shape, dtype)
  return jax.lax.pcast(zeros, axes, to="varying") if axes else zeros


def _common_type(*xs):
  """(xs cast to vary over the union of their axes, that ManualAxisType): a pallas_call's operands
  and the type its out_shape must name under check_vma."""
  axes = frozenset().union(*map(_varying, xs))
  xs = [jax.lax.pcast(x, tuple(sorted(axes - _varying(x))), to="varying") for x in xs]
  return xs, jax.typeof(xs[0]).manual_axis_type


def _sum_to_type_of(cotangent, primal):
  """`cotangent` psum-ed over the shard_map axes it varies over and `primal` does not."""
  extra = tuple(sorted(_varying(cotangent) - _varying(primal)))
  return jax.lax.psum(cotangent, extra) if extra else cotangent


# ---------------------------------------------------------------------------------------------
# Pallas kernels (Triton on GPU; interpret mode anywhere).


def _work_items(group_sizes, num_rows: int, tm: int):
  """(group, row tile, first row, end row) per work item; unused items have first == end == 0.

  Items are in row order; a group with rows [s, e) visits tiles s // tm .. (e - 1) // tm. The
  count is at most cdiv(num_rows, tm) + G - 1 (consecutive groups share at most one tile).
  """
  g_count = group_sizes.shape[0]
  num_items = -(-num_rows // tm) + g_count - 1
  ends = jnp.cumsum(group_sizes)
  starts = ends - group_sizes
  first_tile = starts // tm
  tiles = jnp.where(group_sizes > 0, (ends - 1) // tm - first_tile + 1, 0)
  item = jnp.arange(num_items, dtype=jnp.int32)
  group = jnp.repeat(jnp.arange(g_count, dtype=jnp.int32), tiles, total_repeat_length=num_items)
  used = item < tiles.sum()
  tile = first_tile[group] + item - (jnp.cumsum(tiles) - tiles)[group]
  lo = jnp.where(used, jnp.maximum(starts[group], tile * tm), 0)
  hi = jnp.where(used, jnp.minimum(ends[group], tile * tm + tm), 0)
  return (jnp.where(used, group, 0).astype(jnp.int32), jnp.where(used, tile, 0).astype(jnp.int32),
          lo.astype(jnp.int32), hi.astype(jnp.int32))


def _gmm_kernel(group_ref, tile_ref, lo_ref, hi_ref, lhs_ref, rhs_ref, zeros_ref, out_ref, *,
                tm: int, tk: int, tn: int, num_k_tiles: int, transpose_rhs: bool):
  """out[rows lo..hi, n tile] = lhs[rows, :] @ rhs[group] (rhs[group]^T with transpose_rhs)."""
  del zeros_ref  # aliased with out_ref: rows nobody stores stay zero
  item, n0 = pl.program_id(1), pl.program_id(0) * tn
  group, row0, lo, hi = group_ref[item], tile_ref[item] * tm, lo_ref[item], hi_ref[item]

  @pl.when(hi > lo)
  def _():
    def k_step(kt, acc):
      x = lhs_ref[pl.ds(row0, tm), pl.ds(kt * tk, tk)]
      if transpose_rhs:  # rhs [G, N, K]: contract the last dims
        w = rhs_ref[group, pl.ds(n0, tn), pl.ds(kt * tk, tk)]
        dims = (((1,), (1,)), ((), ()))
      else:
        w = rhs_ref[group, pl.ds(kt * tk, tk), pl.ds(n0, tn)]
        dims = (((1,), (0,)), ((), ()))
      return acc + jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, num_k_tiles, k_step, jnp.zeros((tm, tn), jnp.float32))
    rows = row0 + jax.lax.broadcasted_iota(jnp.int32, (tm, tn), 0)
    plgpu.store(out_ref.at[pl.ds(row0, tm), pl.ds(n0, tn)], acc.astype(out_ref.dtype),
                mask=(rows >= lo) & (rows < hi))


def _gmm_call(lhs, rhs, group_sizes, tiles, interpret, transpose_rhs=False):
  """lhs [M, K] (M, K multiples of tm, tk) x rhs [G, K, N] (or [G, N, K]) -> [M, N]."""
  tm, tk, tn = tiles
  m, k = lhs.shape
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  args, vma = _common_type(*_work_items(group_sizes, m, tm), lhs, rhs, jnp.zeros((m, n), lhs.dtype))
  whole = pl.no_block_spec
  return pl.pallas_call(
      functools.partial(_gmm_kernel, tm=tm, tk=tk, tn=tn, num_k_tiles=k // tk,
                        transpose_rhs=transpose_rhs),
      grid=(n // tn, args[0].shape[0]),
      in_specs=[whole] * 7,
      out_specs=whole,
      out_shape=jax.ShapeDtypeStruct((m, n), lhs.dtype, manual_axis_type=vma),
      input_output_aliases={6: 0},
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
      interpret=interpret,
      name="grouped_matmul",
  )(*args)


def _tgmm_kernel(start_ref, end_ref, lhs_ref, dy_ref, out_ref, *, tm: int, tk: int, tn: int):
  """out[group, k tile, n tile] = lhs[group rows, k tile]^T @ dy[group rows, n tile]."""
  group, k0, n0 = pl.program_id(0), pl.program_id(1) * tk, pl.program_id(2) * tn
  lo, hi = start_ref[group], end_ref[group]

  def m_step(t, acc):
    rows = t * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
    mine = (rows >= lo) & (rows < hi)
    x = jnp.where(mine, lhs_ref[pl.ds(t * tm, tm), pl.ds(k0, tk)], 0)
    d = jnp.where(mine, dy_ref[pl.ds(t * tm, tm), pl.ds(n0, tn)], 0)
    return acc + jax.lax.dot_general(x, d, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)

  first = lo // tm
  last = jnp.where(hi > lo, pl.cdiv(hi, tm), first)
  acc = jax.lax.fori_loop(first, last, m_step, jnp.zeros((tk, tn), jnp.float32))
  out_ref[...] = acc.astype(out_ref.dtype)


def _tgmm_call(lhs, dy, group_sizes, tiles, interpret, out_dtype):
  tm, tk, tn = tiles
  (m, k), n, g = lhs.shape, dy.shape[1], group_sizes.shape[0]
  ends = jnp.cumsum(group_sizes).astype(jnp.int32)
  args, vma = _common_type(ends - group_sizes, ends, lhs, dy)
  whole = pl.no_block_spec
  return pl.pallas_call(
      functools.partial(_tgmm_kernel, tm=tm, tk=tk, tn=tn),
      grid=(g, k // tk, n // tn),
      in_specs=[whole] * 4,
      out_specs=pl.BlockSpec((None, tk, tn), lambda gi, ki, ni: (gi, ki, ni)),
      out_shape=jax.ShapeDtypeStruct((g, k, n), out_dtype, manual_axis_type=vma),
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
      interpret=interpret,
      name="grouped_matmul_tgmm",
  )(*args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _gmm(lhs, rhs, group_sizes, tiles, interpret):
  return _gmm_call(lhs, rhs, group_sizes, tiles, interpret)


def _gmm_fwd(lhs, rhs, group_sizes, tiles, interpret):
  return _gmm_call(lhs, rhs, group_sizes, tiles, interpret), (lhs, rhs, group_sizes)


def _gmm_bwd(tiles, interpret, res, dy):
  lhs, rhs, group_sizes = res
  tm, tk, tn = tiles
  dlhs = _gmm_call(dy, rhs, group_sizes, (tm, tn, tk), interpret, transpose_rhs=True)
  drhs = _tgmm_call(lhs, dy, group_sizes, tiles, interpret, rhs.dtype)
  return _sum_to_type_of(dlhs, lhs), _sum_to_type_of(drhs, rhs), None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def grouped_matmul_pallas(lhs, rhs, group_sizes, *, block_m=64, block_k=128, block_n=128,
                          interpret=False):
  (m, k), n = lhs.shape, rhs.shape[2]
  tm = block_m
  tk, tn = min(block_k, pl.next_power_of_2(k)), min(block_n, pl.next_power_of_2(n))
  if not interpret and any(t != pl.next_power_of_2(t) or t < 16 for t in (tm, tk, tn)):
    raise NotImplementedError(f"triton needs power-of-two tiles >= 16, got {(tm, tk, tn)}")
  mp, kp, np_ = _round_up(m, tm), _round_up(k, tk), _round_up(n, tn)
  # Padding is a no-op at model shapes (K, N multiples of 128); it keeps odd test shapes working.
  out = _gmm(_pad_to(lhs, (mp, kp)), _pad_to(rhs, (rhs.shape[0], kp, np_)), group_sizes,
             (tm, tk, tn), interpret)
  return out[:m, :n]


# ---------------------------------------------------------------------------------------------
# TPU: megablox, with rows past sum(group_sizes) zeroed.


def _megablox():
  try:
    return importlib.import_module("jax.experimental.pallas.ops.tpu.megablox.gmm")
  except ImportError as e:  # pragma: no cover - depends on the installed jax
    raise NotImplementedError(f"megablox is not importable: {e}") from None


def _zero_tail(x, group_sizes):
  rows = jnp.arange(x.shape[0])[:, None]
  return jnp.where(rows < jnp.sum(group_sizes), x, 0).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _megablox_gmm(lhs, rhs, group_sizes, tiling, interpret):
  out = _megablox().gmm(lhs, rhs, group_sizes, lhs.dtype, tiling, interpret=interpret)
  return _zero_tail(out, group_sizes)


def _megablox_fwd(lhs, rhs, group_sizes, tiling, interpret):
  return _megablox_gmm(lhs, rhs, group_sizes, tiling, interpret), (lhs, rhs, group_sizes)


def _megablox_bwd(tiling, interpret, res, dy):
  lhs, rhs, group_sizes = res
  mb = _megablox()
  dlhs = mb.gmm(dy, rhs, group_sizes, lhs.dtype, (tiling[0], tiling[2], tiling[1]),
                transpose_rhs=True, interpret=interpret)
  drhs = mb.tgmm(lhs.swapaxes(0, 1), dy, group_sizes, rhs.dtype, tiling, interpret=interpret)
  return _sum_to_type_of(_zero_tail(dlhs, group_sizes), lhs), _sum_to_type_of(drhs, rhs), None


_megablox_gmm.defvjp(_megablox_fwd, _megablox_bwd)


def grouped_matmul_megablox(lhs, rhs, group_sizes, *, block_m=128, block_k=128, block_n=128,
                            interpret=False):
  (m, k), n = lhs.shape, rhs.shape[2]
  if k % block_k or n % block_n:
    raise NotImplementedError(f"megablox wants K ({k}) and N ({n}) multiples of {block_k}, {block_n}")
  tm = max(block_m, 8)
  out = _megablox_gmm(_pad_to(lhs, (_round_up(m, tm), k)), rhs, group_sizes, (tm, block_k, block_n),
                      interpret)
  return out[:m]


# ---------------------------------------------------------------------------------------------
# XLA paths.


def grouped_matmul_xla(lhs, rhs, group_sizes, *, block_m: int = 64):
  if current_platform() != "tpu":
    return grouped_matmul_blocked(lhs, rhs, group_sizes, block_m)
  return jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=lhs.dtype)


# ---------------------------------------------------------------------------------------------
# Block-padded layout + loop, the XLA path on CPU and GPU.


def _block_layout(group_sizes, num_rows: int, block_m: int):
  """Where each sorted row goes in the block-padded layout, which group each block uses, and how
  many blocks hold rows (`used`: the blocks after them are never computed)."""
  g_count = group_sizes.shape[0]
  num_blocks = -(-(num_rows + g_count * (block_m - 1)) // block_m)
  padded = (group_sizes + block_m - 1) // block_m * block_m
  ends, pad_ends = jnp.cumsum(group_sizes), jnp.cumsum(padded)
  starts, pad_starts = ends - group_sizes, pad_ends - padded
  row = jnp.arange(num_rows)
  g = jnp.searchsorted(ends, row, side="right")
  valid = g < g_count
  gc = jnp.minimum(g, g_count - 1)
  dest = jnp.where(valid, pad_starts[gc] + row - starts[gc], num_blocks * block_m)
  block_group = jnp.minimum(jnp.searchsorted(pad_ends, jnp.arange(num_blocks) * block_m, side="right"),
                            g_count - 1)
  used = (pad_ends[-1] // block_m).astype(jnp.int32)
  return dest, valid, block_group.astype(jnp.int32), num_blocks, used


def _to_blocks(x, dest, num_blocks, block_m):
  """Sorted rows [M, K] -> block-padded rows [num_blocks * block_m, K] (zeros in the padding)."""
  return jnp.zeros((num_blocks * block_m, x.shape[1]), x.dtype).at[dest].set(x, mode="drop")


def _from_blocks(y, dest, valid):
  return jnp.where(valid[:, None], jnp.take(y, dest, axis=0, mode="clip"), 0).astype(y.dtype)


def _block_dot(x, w, transpose_w: bool):
  dims = (((1,), (1,)), ((), ())) if transpose_w else (((1,), (0,)), ((), ()))
  return jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.float32)


def _blocked_fwd_impl(lhs, rhs, group_sizes, block_m, transpose_rhs=False):
  """lhs [M, K] x rhs [G, K, N] (or [G, N, K] with transpose_rhs) -> [M, N]: a loop over the used
  row blocks only, each one dense [block_m, K] x [K, N] product written in place."""
  dest, valid, block_group, nb, used = _block_layout(group_sizes, lhs.shape[0], block_m)
  xp = _to_blocks(lhs, dest, nb, block_m)
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]

  def body(i, yp):
    x = jax.lax.dynamic_slice_in_dim(xp, i * block_m, block_m)
    w = jax.lax.dynamic_index_in_dim(rhs, block_group[i], keepdims=False)
    y = _block_dot(x, w, transpose_rhs).astype(lhs.dtype)
    return jax.lax.dynamic_update_slice_in_dim(yp, y, i * block_m, 0)

  yp = jax.lax.fori_loop(0, used, body, _varying_zeros((nb * block_m, n), lhs.dtype, xp, rhs, block_group))
  return _from_blocks(yp, dest, valid)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def grouped_matmul_blocked(lhs, rhs, group_sizes, block_m=64):
  return _blocked_fwd_impl(lhs, rhs, group_sizes, block_m)


def _blocked_fwd(lhs, rhs, group_sizes, block_m):
  return _blocked_fwd_impl(lhs, rhs, group_sizes, block_m), (lhs, rhs, group_sizes)


def _blocked_bwd(block_m, res, dy):
  """One loop over the used blocks: dlhs block = dy block @ rhs[g]^T, drhs[g] += x block^T dy block."""
  lhs, rhs, group_sizes = res
  dest, valid, block_group, nb, used = _block_layout(group_sizes, lhs.shape[0], block_m)
  xp, dyp = _to_blocks(lhs, dest, nb, block_m), _to_blocks(dy, dest, nb, block_m)

  def body(i, carry):
    dxp, drhs = carry
    g = block_group[i]
    x = jax.lax.dynamic_slice_in_dim(xp, i * block_m, block_m)
    d = jax.lax.dynamic_slice_in_dim(dyp, i * block_m, block_m)
    w = jax.lax.dynamic_index_in_dim(rhs, g, keepdims=False)
    dx = _block_dot(d, w, transpose_w=True).astype(lhs.dtype)
    upd = jax.lax.dot_general(x, d, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    cur = jax.lax.dynamic_index_in_dim(drhs, g, keepdims=False)
    return (jax.lax.dynamic_update_slice_in_dim(dxp, dx, i * block_m, 0),
            jax.lax.dynamic_update_index_in_dim(drhs, cur + upd, g, 0))

  like = (xp, dyp, rhs, block_group)
  init = (_varying_zeros(xp.shape, lhs.dtype, *like), _varying_zeros(rhs.shape, jnp.float32, *like))
  dxp, drhs = jax.lax.fori_loop(0, used, body, init)
  dlhs = _from_blocks(dxp, dest, valid)
  return _sum_to_type_of(dlhs, lhs), _sum_to_type_of(drhs.astype(rhs.dtype), rhs), None


grouped_matmul_blocked.defvjp(_blocked_fwd, _blocked_bwd)


# ---------------------------------------------------------------------------------------------
# Dispatch order.

grouped_matmul_op.register("triton", kind="pallas", platforms=("gpu",))(grouped_matmul_pallas)
grouped_matmul_op.register("megablox", kind="pallas", platforms=("tpu",))(grouped_matmul_megablox)
grouped_matmul_op.register("xla", kind="xla")(grouped_matmul_xla)
