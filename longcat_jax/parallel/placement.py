"""`MeshPlacement`: the model's placement over a device mesh (the mesh half of `model/placement.py`).

    mesh = sharding.make_mesh(sharding.parallel_config(mesh=dict(fsdp=2, expert=4)))
    model = LongcatForCausalLM(config, placement=MeshPlacement(mesh))
    step = jax.jit(train_step, in_shardings=..., out_shardings=...)   # no context manager needed

What it does for the model, method by method:
  constrain          `with_sharding_constraint` by the logical-axis table (`sharding.LOGICAL_AXIS_RULES`)
  route / experts    top-k per device with global expert counts; expert parallelism (`expert_parallel`)
  length_shards,     context parallelism: the sequence split over `context` (or any axes the table
  context_attention  gives `length`), compressed KV all-gathered (`context_parallel`)
  lookup             embedding / n-gram tables split by rows and columns: partial rows + an all-to-all
  per_token_block    a per-token computation (the sparse indexer's top-k) run per device

The placement is a frozen dataclass of the mesh, the rules and the expert-parallel options, so it
is hashable and part of the model it is given to.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from longcat_jax.model.placement import Placement
from longcat_jax.parallel import context_parallel, expert_parallel, sharding


def _flat(entry) -> tuple[str, ...]:
  return () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))


@dataclasses.dataclass(frozen=True)
class MeshPlacement(Placement):
  """The model laid out over `mesh` by the logical-axis table `rules`.

  `ep_transport` (`auto`, `ragged`, `gather`, `ragged_emulated`) and `ep_chunk_tokens`: how
  tokens reach their experts' devices (`expert_parallel.py`).
  """

  mesh: Mesh
  rules: tuple = sharding.LOGICAL_AXIS_RULES
  ep_transport: str = "auto"
  ep_chunk_tokens: int = 0

  def __post_init__(self):
    object.__setattr__(self, "rules", tuple((l, tuple(a) if isinstance(a, list) else a) for l, a in self.rules))
    if self.ep_transport not in sharding.EP_TRANSPORTS:
      raise ValueError(f"ep_transport={self.ep_transport!r} must be one of {sharding.EP_TRANSPORTS}")

  @classmethod
  def from_parallel(cls, mesh: Mesh, parallel=None, rules=sharding.LOGICAL_AXIS_RULES) -> "MeshPlacement":
    """From a `sharding.parallel_config()` (its ep_transport / ep_chunk_tokens)."""
    parallel = parallel or sharding.parallel_config()
    return cls(mesh, tuple(rules), parallel.ep_transport, int(parallel.ep_chunk_tokens))

  @property
  def distributed(self) -> bool:
    return self.mesh.size > 1

  def spec(self, names, shape) -> P:
    return sharding.logical_to_spec(tuple(names), tuple(shape), self.mesh, self.rules)

  def sharding(self, names, shape) -> NamedSharding:
    return NamedSharding(self.mesh, self.spec(names, shape))

  def kernels(self):
    return jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh)

  def constrain(self, x, names):
    if self.mesh.size == 1:
      return x
    return jax.lax.with_sharding_constraint(x, self.sharding(names, x.shape))

  # -- MoE --------------------------------------------------------------------------------------

  def route(self, logits, bias, *, config, batch_shape=None):
    return expert_parallel.route(logits, bias, config=config, placement=self, batch_shape=batch_shape)

  def experts(self, x, weights, indices, ffn_counts, w_gate, w_up, w_down, *, config, batch_shape=None):
    return expert_parallel.experts(x, weights, indices, ffn_counts, w_gate, w_up, w_down, config=config,
                                   placement=self, batch_shape=batch_shape)

  # -- context parallelism ----------------------------------------------------------------------

  def length_axes(self, seq_len: int, batch: int) -> tuple[str, ...]:
    """Mesh axes (size > 1) that split the `length` dim of a [batch, seq_len] array, in order."""
    return tuple(a for a in _flat(self.spec(("batch", "length"), (batch, seq_len))[1]) if self.mesh.shape[a] > 1)

  def length_shards(self, seq_len: int, batch: int) -> int:
    return sharding._axis_size(self.mesh, self.length_axes(seq_len, batch))

  def gather_sequence(self, x):
    return self.constrain(x, ("batch",) + (None,) * (x.ndim - 1))

  def context_attention(self, q, k, v, segment_ids, *, sm_scale: float, block_k: int):
    return context_parallel.attention(q, k, v, segment_ids, placement=self, sm_scale=sm_scale, block_k=block_k)

  def sparse_attention(self, q, k, v, indices, *, sm_scale: float, implementation=None):
    b, s = q.shape[:2]
    if k.shape[1] == s and self.length_shards(s, b) > 1:
      return context_parallel.sparse_attention(q, k, v, indices, placement=self, sm_scale=sm_scale,
                                               implementation=implementation)
    return super().sparse_attention(q, k, v, indices, sm_scale=sm_scale, implementation=implementation)

  # -- embedding tables -------------------------------------------------------------------------

  def lookup(self, table, ids, dtype, names=("vocab", "embed")):
    """table [rows, d], ids [B, S] (or [N, B, S]) -> table[ids] [..., d] in `dtype`, split over
    the token axes.

    The table is split by rows and columns (its logical `names`, e.g. `ngram_vocab` x `ngram_dim`)
    over the mesh, so a token's row may live anywhere. Every device looks up all the batch's ids
    (int32, replicated) in its block, giving [B, S, d / columns] partial rows summed over the row
    shards; then the tokens are split again: an all-to-all over the column axes, never the whole
    [B, S, d] on one device (which is what GSPMD makes of a plain `take`, forward and
    scatter-add backward).
    """
    if self.mesh.size == 1:
      return super().lookup(table, ids, dtype, names)
    lead = (None,) * (ids.ndim - 2)
    shape = ids.shape + table.shape[1:]
    cols = _flat(self.spec(names, table.shape)[1])
    tokens = self.spec(lead + ("batch", "length", None), shape)
    split = lambda axes: tuple(a for a in _flat(axes) if a not in cols) or None
    layouts = [P(*lead, None, None, cols or None),                              # the lookup
               P(*lead, split(tokens[-3]), split(tokens[-2]), cols or None),
               tokens]                                                           # all-to-all
    put = lambda x, p: jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, p))
    e = jnp.take(table, put(ids, P(*((None,) * ids.ndim))), axis=0).astype(dtype)
    for p in layouts:
      e = put(e, p)
    return e

  # -- per-device token blocks ------------------------------------------------------------------

  def per_token_block(self, fn, args, token_args, out_shape):
    if self.mesh.size == 1:
      return fn(*args)
    spec = lambda a, names: self.spec(names + (None,) * (a.ndim - len(names)), a.shape)
    in_specs = tuple(spec(a, ("batch", "length") if i in token_args else ("batch",)) for i, a in enumerate(args))
    return jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=spec(out_shape, ("batch", "length")),
                         check_vma=False)(*args)
