"""Where the model's computation runs: the one object through which a model meets a device mesh.

A model holds a `Placement` (`LongcatForCausalLM(config, placement=...)`). Everything that
depends on how arrays are laid out over devices goes through it: activation sharding
constraints (logical axis names, as in MaxText), expert routing and dispatch, context-parallel
attention, embedding and n-gram table lookups and the sparse indexer's key selection. This module is the
single-device semantics (`LOCAL`, the default): constraints are no-ops, experts run on the local
tokens. `longcat_jax.parallel.placement.MeshPlacement` implements the same methods over a mesh.

Placements are frozen dataclasses, so they are hashable and compare by value: a model (and so a
traced program) is keyed by its placement, and nothing depends on a context manager being active
while tracing.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Sequence

import jax.numpy as jnp

import pallas_kernels
from pallas_kernels.sparse_attention import sparse_attention
from longcat_jax.config import ConfigDict
from longcat_jax.model.experts import dropless_experts, kernel_impl


@dataclasses.dataclass(frozen=True)
class Placement:
  """Single-device placement: every method computes on the arrays as they are."""

  @property
  def distributed(self) -> bool:
    """False: tokens may be flattened to [B * S, d] freely (no sequence is split over devices)."""
    return False

  def constrain(self, x, names: Sequence[str | None]):
    """Activation `x` laid out by logical axis names (`("batch", "length", "embed")`)."""
    del names
    return x

  def kernels(self):
    """Context for a kernel call whose implementation partitions itself over the mesh (TPU Mosaic
    kernels wrap themselves in a shard_map over the abstract mesh they see): the placement's
    mesh, set by the placement, never by the caller."""
    return contextlib.nullcontext()

  def length_shards(self, seq_len: int, batch: int) -> int:
    """Into how many chunks a [batch, seq_len] token array's sequence is split (context parallelism)."""
    del seq_len, batch
    return 1

  def route(self, logits, bias, *, config: ConfigDict, batch_shape=None):
    """Top-k routing: logits [T, N+Z] -> weights, indices [T, k], ffn_counts [N] (global counts)."""
    del batch_shape
    return pallas_kernels.topk_route(logits, bias, config.top_k, config.num_ffn_experts,
                                     config.routed_scaling_factor, implementation=kernel_impl(config))

  def experts(self, x, weights, indices, ffn_counts, w_gate, w_up, w_down, *, config: ConfigDict,
              batch_shape=None):
    """Routed-expert output x [T, H] -> [T, H] (incl. the zero-expert term); see `experts.py`."""
    del batch_shape
    with self.kernels():
      return dropless_experts(x, weights, indices, ffn_counts, w_gate, w_up, w_down,
                              num_ffn_experts=config.num_ffn_experts, implementation=kernel_impl(config),
                              block_m=config.moe_block_size)

  def gather_sequence(self, x):
    """[B, S, ...] split along S -> whole along S (the compressed KV before attention)."""
    return x

  def context_attention(self, q, k, v, segment_ids, *, sm_scale: float, block_k: int):
    """Attention of length-split queries against every key (only when `length_shards` > 1)."""
    raise NotImplementedError("context-parallel attention needs a mesh placement")

  def sparse_attention(self, q, k, v, indices, *, sm_scale: float, implementation=None):
    """q [B, S, H, Dk] over the selected keys indices [B, S, K] of k [B, T, Dk], v [B, T, Dv]."""
    with self.kernels():
      return sparse_attention(q, k, v, indices, sm_scale=sm_scale, implementation=implementation)

  def lookup(self, table, ids, dtype, names: tuple[str, str] = ("vocab", "embed")):
    """Embedding lookup: table [rows, d] (logical axes `names`), ids [B, ...] -> table[ids] [B, ..., d]."""
    del names
    return jnp.take(table, ids, axis=0).astype(dtype)

  def per_token_block(self, fn: Callable, args: Sequence, token_args: Sequence[int], out_shape):
    """fn(*args) for a function that is independent per token row: args[i] for i in `token_args`
    are [B, S, ...] token arrays, the others [B, T, ...] per-sequence arrays; -> out_shape [B, S, ...].
    (A mesh placement runs it per device, on each device's own tokens.)"""
    del token_args, out_shape
    return fn(*args)


LOCAL = Placement()
