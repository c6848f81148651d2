"""Expert computation placement: one device, or tokens dispatched to the devices owning their experts.

With the single-device placement (or on a 1-device mesh) the MoE runs `dropless_experts` on the
local tokens. With a `MeshPlacement` (`parallel/placement.py`), the routed-expert computation runs under `jax.shard_map` with FFN
experts split over the `expert` mesh axis (`exp` -> `expert` in the rules) and their hidden
dimension over the axes of `expert_mlp` (tensor parallel: partial sums, one psum at the end):

    zero-expert term  w_zero * x                  computed first, never leaves the device
    dispatch          FFN slots -> the expert's device       (transport below)
    expert FFN        sorted rows, grouped matmul per local expert (dropless)
    combine           outputs -> the token's device, sum_j w_j y_j (+ psum over tensor axes)

Transports (`MeshPlacement.ep_transport`; `auto` picks by the mesh's platform):
  - `ragged`: `jax.lax.ragged_all_to_all` sends each device exactly its FFN slots (GPU/TPU).
  - `gather`: all-gather the expert group's tokens, compute the local experts' slots, reduce-
    scatter the outputs (any backend; XLA:CPU has no ragged-all-to-all).
  - `ragged_emulated`: the `ragged` bookkeeping with the collective emulated by an all-gather
    (lets CPU tests check the offsets that the GPU path uses).
All are dropless: the receive buffers have the worst-case static size (every slot of the expert
group on one device); `ep_chunk_tokens` bounds them by dispatching the local tokens in chunks.

Routing statistics (`expert_load`, `router_prob_mean`) are computed by moe.py outside the
shard_map from the globally sharded router outputs, so under jit they are global sums, not
per-shard values.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

import pallas_kernels
from pallas_kernels.grouped_matmul import grouped_matmul_op
from longcat_jax.model.experts import dropless_experts, kernel_impl
from longcat_jax.parallel import sharding

EXPERT_AXIS = "expert"


def experts(x, weights, indices, ffn_counts, w_gate, w_up, w_down, *, config, placement, batch_shape=None):
  """x [T, H], weights/indices [T, k], ffn_counts [N] -> [T, H] routed-expert output.

  `placement`: a `MeshPlacement`. `batch_shape` = (B, S) with B * S = T lets the sharded path
  keep the [batch, length] layout of the tokens (so context-parallel layouts need no reshuffle).
  """
  if placement.mesh.size == 1 or not _splits(placement, x.shape[0], batch_shape):
    # A 1-device mesh, or token shapes the mesh cannot split (e.g. `model.init` on a [1, 1]
    # dummy batch): the single-device computation, partitioned by GSPMD if at all.
    return dropless_experts(x, weights, indices, ffn_counts, w_gate, w_up, w_down,
                            num_ffn_experts=config.num_ffn_experts, implementation=kernel_impl(config),
                            block_m=config.moe_block_size)
  return sharded_experts(x, weights, indices, w_gate, w_up, w_down, config=config, placement=placement,
                         batch_shape=batch_shape)


def route(logits, bias, *, config, placement, batch_shape=None):
  """`pallas_kernels.topk_route` on logits [T, N+Z] -> weights, indices [T, k], ffn_counts [N].

  Under a mesh the top-k runs per device on its own tokens (XLA's partitioner would otherwise
  gather every token's scores to each device for the TopK) and `ffn_counts` is psum-ed, so it
  is the global count.
  """
  topk = lambda l, b: pallas_kernels.topk_route(l, b, config.top_k, config.num_ffn_experts,
                                                config.routed_scaling_factor,
                                                implementation=kernel_impl(config))
  if placement.mesh.size == 1 or not _splits(placement, logits.shape[0], batch_shape):
    return topk(logits, bias)
  batch_axes, length_axes = _token_axes(placement.mesh, placement.rules)
  b, s = batch_shape or (logits.shape[0], 1)
  tok = P(batch_axes or None, length_axes or None, None)

  def body(l, bias):
    w, i, counts = topk(l.reshape(-1, l.shape[-1]), bias)
    counts = jax.lax.psum(counts, batch_axes + length_axes) if batch_axes + length_axes else counts
    return w.reshape(l.shape[:2] + w.shape[-1:]), i.reshape(l.shape[:2] + i.shape[-1:]), counts

  w, i, counts = jax.shard_map(body, mesh=placement.mesh, in_specs=(tok, P()), out_specs=(tok, tok, P()),
                               check_vma=False)(logits.reshape(b, s, -1), bias)
  return w.reshape(-1, w.shape[-1]), i.reshape(-1, i.shape[-1]), counts


def _token_axes(mesh, rules) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """Mesh axes (of size > 1) that the rules give the tokens' batch and length dimensions."""
  spec = nn.logical_to_mesh_axes(("batch", "length"), rules)
  big = lambda axes: tuple(a for a in _flat_axes(axes) if mesh.shape[a] > 1)
  return big(spec[0]), big(spec[1])


def _splits(placement, t, batch_shape) -> bool:
  b, s = batch_shape or (t, 1)
  batch_axes, length_axes = _token_axes(placement.mesh, placement.rules)
  size = lambda axes: math.prod(placement.mesh.shape[a] for a in axes)
  return b % size(batch_axes) == 0 and s % size(length_axes) == 0


def _flat_axes(spec_entry) -> tuple[str, ...]:
  if spec_entry is None:
    return ()
  return (spec_entry,) if isinstance(spec_entry, str) else tuple(spec_entry)


def choose_transport(requested: str, mesh) -> str:
  """`auto` -> `ragged` on GPU/TPU meshes, `gather` elsewhere (XLA:CPU lacks ragged-all-to-all)."""
  if requested != "auto":
    return requested
  platform = mesh.devices.flat[0].platform
  return "ragged" if platform in ("gpu", "cuda", "rocm", "tpu") else "gather"


def sharded_experts(x, weights, indices, w_gate, w_up, w_down, *, config, placement, batch_shape=None):
  """The expert-parallel MoE under `shard_map` (see the module docstring)."""
  mesh, rules = placement.mesh, placement.rules
  n = config.num_ffn_experts
  e = mesh.shape.get(EXPERT_AXIS, 1)
  if n % e:
    raise ValueError(f"num_ffn_experts={n} is not divisible by the {EXPERT_AXIS!r} mesh axis ({e})")
  big = lambda axes: tuple(a for a in axes if mesh.shape[a] > 1)
  batch_axes, length_axes = _token_axes(mesh, rules)
  token_axes = batch_axes + length_axes
  ep_axis = EXPERT_AXIS if e > 1 else None
  # Expert weights enter the shard_map sharded as stored. Inside, their FSDP axes (and any
  # hidden-dim axis that also splits tokens) are all-gathered explicitly, so the gradients leave
  # through the transpose, a reduce-scatter; hidden-dim axes that do not split tokens stay
  # sharded (tensor parallel: partial sums, one psum per token at the end).
  gu_spec = sharding.logical_to_spec(("exp", "embed", "expert_mlp"), w_gate.shape, mesh, rules)
  d_spec = sharding.logical_to_spec(("exp", "expert_mlp", "embed"), w_down.shape, mesh, rules)
  if (gu_spec[0], gu_spec[1], gu_spec[2]) != (d_spec[0], d_spec[2], d_spec[1]):
    raise ValueError(f"expert weights resolve to different layouts: w_gate/w_up {gu_spec}, w_down {d_spec}")
  if big(_flat_axes(gu_spec[0])) != ((EXPERT_AXIS,) if ep_axis else ()):
    raise ValueError(f"the FFN experts must be split over exactly the {EXPERT_AXIS!r} mesh axis; the "
                     f"table gives `exp` -> {gu_spec[0]!r}")
  embed_axes = big(_flat_axes(gu_spec[1]))
  mlp_sharded = big(_flat_axes(gu_spec[2]))
  mlp_axes = tuple(a for a in mlp_sharded if a not in token_axes)
  mlp_gather = tuple(a for a in mlp_sharded if a in token_axes)
  tokens_split = ep_axis in token_axes
  transport = choose_transport(placement.ep_transport, mesh) if ep_axis else "local"
  if transport.startswith("ragged") and not tokens_split:
    transport = "gather"  # every expert shard already holds every token: nothing to send

  t, k = indices.shape
  b, s = batch_shape or (t, 1)
  nb, ns = math.prod(mesh.shape[a] for a in batch_axes), math.prod(mesh.shape[a] for a in length_axes)
  if b % nb or s % ns:
    raise ValueError(f"MoE tokens [batch={b}, length={s}] are not divisible by the mesh axes "
                     f"{batch_axes} ({nb}) x {length_axes} ({ns}) that shard them")
  x3, w3, i3 = (a.reshape(b, s, a.shape[-1]) for a in (x, weights, indices))
  # Cast while sharded like the parameters, so the gathers move compute-dtype bytes.
  cast = lambda w, spec: jax.lax.with_sharding_constraint(w.astype(x.dtype), NamedSharding(mesh, spec))
  w_gate, w_up, w_down = cast(w_gate, gu_spec), cast(w_up, gu_spec), cast(w_down, d_spec)
  tok = P(batch_axes or None, length_axes or None, None)
  body = functools.partial(
      _local_moe, num_ffn_experts=n, ep_axis=ep_axis, tokens_split=tokens_split, mlp_axes=mlp_axes,
      gather_axes=(embed_axes, mlp_gather), transport=transport, chunk=int(placement.ep_chunk_tokens),
      block_m=config.moe_block_size, implementation=kernel_impl(config))
  out = jax.shard_map(body, mesh=mesh, check_vma=_checks_vma(config),
                      in_specs=(tok, tok, tok, gu_spec, gu_spec, d_spec),
                      out_specs=tok)(x3, w3, i3, w_gate, w_up, w_down)
  return out.reshape(t, -1)


def _checks_vma(config) -> bool:
  """Type-check the expert shard_map (which mesh axes each value varies over) when the expert FFN
  takes the XLA grouped matmul. Pallas kernels run unchecked: in jax 0.10 the Pallas interpreter
  slices varying operands with invariant block indices, and megablox's pallas_call declares no
  output type, so both fail the check (grouped_matmul's own kernels and VJPs are typed)."""
  first = grouped_matmul_op.candidates(kernel_impl(config))[:1]
  return bool(first) and first[0][0].kind == "xla"


def _local_moe(x, weights, indices, w_gate, w_up, w_down, *, num_ffn_experts, ep_axis, tokens_split,
               mlp_axes, gather_axes, transport, chunk, block_m, implementation):
  """Per device: x [b, s, H], weights/indices [b, s, k], local experts' weight shards."""
  embed_axes, mlp_gather = gather_axes
  def gather(w, embed_dim, mlp_dim):  # FSDP all-gather; its transpose reduce-scatters the grads
    for dim, axes in ((embed_dim, embed_axes), (mlp_dim, mlp_gather)):
      if axes:
        w = jax.lax.all_gather(w, axes, axis=dim, tiled=True)
    return w
  w_gate, w_up, w_down = gather(w_gate, 1, 2), gather(w_up, 1, 2), gather(w_down, 2, 1)
  b, s, h = x.shape
  k = indices.shape[-1]
  xt, wt, it = x.reshape(-1, h), weights.reshape(-1, k), indices.reshape(-1, k)
  ffn = functools.partial(_expert_ffn, w_gate=w_gate, w_up=w_up, w_down=w_down, block_m=block_m,
                          implementation=implementation)
  dispatch = {
      "local": functools.partial(_gather_dispatch, ep_axis=None, tokens_split=False),
      "gather": functools.partial(_gather_dispatch, ep_axis=ep_axis, tokens_split=tokens_split),
      "ragged": functools.partial(_ragged_dispatch, ep_axis=ep_axis, a2a=jax.lax.ragged_all_to_all),
      "ragged_emulated": functools.partial(_ragged_dispatch, ep_axis=ep_axis,
                                           a2a=ragged_all_to_all_emulated),
  }
  if transport not in dispatch:
    raise ValueError(f"ep_transport={transport!r} must be one of {sorted(dispatch)} (or 'auto')")
  fn = functools.partial(dispatch[transport], ffn=ffn, num_ffn_experts=num_ffn_experts)
  # Under check_vma: the tokens meet weights split over the tensor axes, so they vary over them
  # from here on; the transpose of this cast is the one psum of dx per token (not per slot).
  # A no-op without check_vma (the shard_map boundary sums the cotangent instead).
  xd = jax.lax.pcast(xt, tuple(a for a in mlp_axes if a not in jax.typeof(xt).manual_axis_type.varying),
                     to="varying")

  t = xt.shape[0]
  if chunk and t > chunk:
    if t % chunk:
      raise ValueError(f"ep_chunk_tokens={chunk} does not divide the {t} tokens per device")
    step = jax.checkpoint(lambda _, c: (None, fn(*c)))
    split = lambda a: a.reshape(t // chunk, chunk, *a.shape[1:])
    _, y = jax.lax.scan(step, None, (split(xd), split(wt), split(it)))
    y = y.reshape(t, h)
  else:
    y = fn(xd, wt, it)
  if mlp_axes:
    y = jax.lax.psum(y, mlp_axes)  # tensor-parallel partial sums, once per token (not per slot)
  # Zero experts: identity outputs, local (spec section 3: they cost no FLOPs, no communication).
  w_zero = jnp.where(it >= num_ffn_experts, wt, 0.0).sum(-1, keepdims=True)
  out = y + w_zero * xt.astype(jnp.float32)
  return out.astype(x.dtype).reshape(b, s, h)


def _expert_ffn(rows, group_sizes, *, w_gate, w_up, w_down, block_m, implementation):
  """rows [R, H] sorted by local expert, group_sizes [n_local] -> [R, H] (zeros past the groups)."""
  gmm = lambda a, w: pallas_kernels.grouped_matmul(a, w.astype(rows.dtype), group_sizes,
                                                   implementation=implementation, block_m=block_m)
  return gmm(nn.silu(gmm(rows, w_gate)) * gmm(rows, w_up), w_down)


def _combine_rows(y, order, weights, use, k):
  """sum_j w_j y_j per token, float32 [T, H], from expert-output rows y [R, H] of slots order[:R].

  Scatter-adds weighted rows into their tokens (no [T, k, H] buffer); slots not in `use` (zero
  experts, other devices' experts) and rows past the groups (zeros) add nothing.
  """
  t = weights.shape[0]
  w_rows = jnp.take(jnp.where(use, weights, 0.0).reshape(-1), order[:y.shape[0]])
  # In the compute dtype: a float32 [R, H] copy (and cotangent) would be the largest buffer of
  # the layer. A token sums at most min(k, n_local) rows here; float32 from then on.
  rows = w_rows[:, None].astype(y.dtype) * y
  out = jnp.zeros((t, y.shape[-1]), y.dtype).at[order[:y.shape[0]] // k].add(rows)
  return out.astype(jnp.float32)


def _gather_dispatch(x, weights, indices, *, ffn, num_ffn_experts, ep_axis, tokens_split):
  """All-gather the expert group's tokens, run the local experts' slots, reduce-scatter back."""
  n_loc = ffn.keywords["w_gate"].shape[0]
  e = jax.lax.axis_size(ep_axis) if ep_axis else 1
  shard = jax.lax.axis_index(ep_axis) if ep_axis else 0
  if tokens_split:
    gather = lambda a: jax.lax.all_gather(a, ep_axis, axis=0, tiled=True)
    x, weights, indices = gather(x), gather(weights), gather(indices)
  t, k = indices.shape
  local_id = indices - shard * n_loc
  is_local = (indices < num_ffn_experts) & (local_id >= 0) & (local_id < n_loc)
  key = jnp.where(is_local, local_id, n_loc).reshape(-1)
  order = jnp.argsort(key, stable=True)
  # A token picks distinct experts, so at most min(k, n_loc) of its slots are local: dropless.
  r = t * min(k, n_loc)
  order = order[:r]
  group_sizes = jnp.bincount(key, length=n_loc + 1)[:n_loc]
  y = ffn(jnp.take(x, order // k, axis=0), group_sizes)
  out = _combine_rows(y, order, weights, is_local, k)
  if ep_axis is None:
    return out
  if tokens_split:
    return jax.lax.psum_scatter(out, ep_axis, scatter_dimension=0, tiled=True)
  return jax.lax.psum(out, ep_axis)


def _ragged_dispatch(x, weights, indices, *, ffn, num_ffn_experts, ep_axis, a2a):
  """Send each FFN slot to its expert's device and back with two ragged all-to-alls."""
  n_loc = ffn.keywords["w_gate"].shape[0]
  e, me = jax.lax.axis_size(ep_axis), jax.lax.axis_index(ep_axis)
  t, k = indices.shape
  h = x.shape[-1]
  key = jnp.where(indices < num_ffn_experts, indices, num_ffn_experts).reshape(-1)
  order = jnp.argsort(key, stable=True)  # FFN slots by expert (so by device), zero slots last
  send = jnp.take(x, order // k, axis=0)
  counts = jnp.bincount(key, length=num_ffn_experts + 1)[:num_ffn_experts]
  all_counts = jax.lax.all_gather(counts, ep_axis)               # [src, N]
  sizes = all_counts.reshape(e, e, n_loc).sum(-1)                # [src, dst] slots
  send_sizes, recv_sizes = sizes[me], sizes[:, me]
  excl = lambda a, axis: jnp.cumsum(a, axis=axis) - a
  input_offsets = excl(send_sizes, 0)
  output_offsets = excl(sizes, 0)[me]     # where my slice lands in each receiver's buffer
  r = e * t * min(k, n_loc)               # worst case: every slot of the group comes here
  recv = a2a(send, jnp.zeros((r, h), x.dtype), input_offsets, send_sizes, output_offsets,
             recv_sizes, axis_name=ep_axis)

  # Received rows: per source (in order), sorted by local expert. Regroup by local expert.
  local_counts = jax.lax.dynamic_slice_in_dim(all_counts, me * n_loc, n_loc, axis=1)  # [src, n_loc]
  seg = jnp.searchsorted(jnp.cumsum(local_counts.reshape(-1)), jnp.arange(r), side="right")
  local_id = jnp.where(seg < e * n_loc, seg % n_loc, n_loc)
  order2 = jnp.argsort(local_id, stable=True)
  y = ffn(jnp.take(recv, order2, axis=0), local_counts.sum(0))
  y = jnp.zeros_like(y).at[order2].set(y)

  back = a2a(y, jnp.zeros((t * k, h), y.dtype), excl(recv_sizes, 0), recv_sizes,
             excl(sizes, 1)[:, me], send_sizes, axis_name=ep_axis)
  return _combine_rows(back, order, weights, indices < num_ffn_experts, k)


def ragged_all_to_all_emulated(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes,
                               *, axis_name):
  """`jax.lax.ragged_all_to_all` semantics (one slice per peer) built from all-gathers.

  For backends without the collective; it moves every device's whole operand, so it is for
  checking the ragged path's bookkeeping, not for speed.
  """
  del recv_sizes  # implied by the senders' send_sizes
  e, me = jax.lax.axis_size(axis_name), jax.lax.axis_index(axis_name)
  ops = jax.lax.all_gather(operand, axis_name)             # [src, M, ...]
  in_off = jax.lax.all_gather(input_offsets, axis_name)[:, me]
  size = jax.lax.all_gather(send_sizes, axis_name)[:, me]
  out_off = jax.lax.all_gather(output_offsets, axis_name)[:, me]
  p = jnp.arange(output.shape[0])
  result = output
  for src in range(e):
    sel = (p >= out_off[src]) & (p < out_off[src] + size[src])
    rows = jnp.take(ops[src], jnp.clip(in_off[src] + p - out_off[src], 0, operand.shape[0] - 1), axis=0)
    result = jnp.where(sel.reshape((-1,) + (1,) * (output.ndim - 1)), rows, result)
  return result
