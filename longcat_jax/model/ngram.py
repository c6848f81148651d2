"""N-gram embeddings (LongCat-Flash-Lite, LongCat-2.0; spec section 4).

    V = vocab; m = int(ratio * V); k = split_num; N = neighbor_num; T = k * (N - 1) tables of width d = hidden / T
    table idx = (n - 2) * k + j  for n in 2..N, j in 0..k-1;  rows M_idx = m + 2 * idx + 1
    id_idx(i) = (t_i + sum_{d=1}^{n-1} t_{i-d} * (V^d mod M_idx)) mod M_idx      # t_{i-d} = 0 before the start
    e_i = (E0[t_i] + sum_idx post_proj_idx(E_idx[id_idx(i)])) / (1 + T)             # post_proj: d -> hidden, no bias

The reference hashes in int64. Here the same residues are computed exactly in int32 (JAX's default
integer width): every product is reduced modulo M_idx chunk by chunk, so no intermediate exceeds
2**31 (`ngram_ids` equals the int64 formula; the tests check it against numpy int64).

`segment_ids` (packed training documents) zero the neighbours that lie in another document, so a
packed document sees exactly the ids it would see alone. `eos_reset=True` (LongCat-2.0) also stops
the look-back at an end-of-sequence token inside one sequence, as the released 2.0 code does
(mlx-lm commit 9049ab3a `longcat_flash_ngram.NgramEmbedding.__call__`, `reach`): neighbour t-d is
zeroed when an EOS lies in t-d .. t-1 (the EOS ends its document; the token after it starts fresh).
Flash-Lite does not reset (its mlx-lm `ModelArgs` carries no eos_token_id, so `reach` is off). Decoding carries the last N - 1 tokens as
the n-gram context ([batch, N - 1], zeros = before the start; `update_ngram_context`).

Tables are padded to a multiple of `row_multiple` rows (default 1024; pad rows are never read) so
they shard evenly over the mesh on the `ngram_vocab` logical axis.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from longcat_jax.config import ConfigDict, dtype_of
from longcat_jax.model.layers import param
from longcat_jax.model.placement import LOCAL, Placement

_INT32_MAX = 2**31 - 1


def ngram_settings(config: ConfigDict) -> dict:
  """The n-gram fields of `config.ngram_embedding` with defaults filled in."""
  s = dict(config.ngram_embedding)
  s.setdefault("row_multiple", 1024)
  s.setdefault("eos_reset", False)
  return s


def ngram_base_rows(config: ConfigDict) -> int:
  """m = int(ngram_vocab_size_ratio * vocab_size) (the ratio may be fractional, as in LongCat-2.0)."""
  return int(ngram_settings(config)["vocab_size_ratio"] * config.vocab_size)


def num_ngram_tables(config: ConfigDict) -> int:
  s = ngram_settings(config)
  return s["split_num"] * (s["neighbor_num"] - 1)


def ngram_moduli(config: ConfigDict) -> list[int]:
  """M_idx = m + 2 * idx + 1 rows of each table (the released checkpoint's table sizes)."""
  m = ngram_base_rows(config)
  return [m + 2 * i + 1 for i in range(num_ngram_tables(config))]


def ngram_table_rows(config: ConfigDict) -> list[int]:
  """Stored rows per table: M_idx padded up to a multiple of `row_multiple`."""
  r = ngram_settings(config)["row_multiple"]
  return [-(-mod // r) * r for mod in ngram_moduli(config)]


def ngram_dim(config: ConfigDict) -> int:
  return config.hidden_size // num_ngram_tables(config)


def validate_ngram(config: ConfigDict) -> None:
  """Raises ValueError naming the n-gram field that is wrong."""
  s = ngram_settings(config)
  for f in ("vocab_size_ratio", "neighbor_num", "split_num"):
    if f not in s:
      raise ValueError(f"ngram_embedding is missing {f!r} (have {sorted(s)})")
  if s["neighbor_num"] < 2 or s["split_num"] < 1:
    raise ValueError(f"ngram_embedding neighbor_num={s['neighbor_num']} must be >= 2 and "
                     f"split_num={s['split_num']} >= 1")
  t = num_ngram_tables(config)
  if config.hidden_size % t:
    raise ValueError(f"hidden_size={config.hidden_size} is not divisible by the {t} n-gram tables "
                     f"(split_num * (neighbor_num - 1))")
  if ngram_base_rows(config) < config.vocab_size:
    raise ValueError(f"ngram_embedding vocab_size_ratio={s['vocab_size_ratio']} gives fewer table rows than "
                     f"vocab_size={config.vocab_size}")
  if 4 * max(ngram_moduli(config)) > _INT32_MAX:
    raise ValueError(f"n-gram table rows {max(ngram_moduli(config))} too large for the exact int32 hash "
                     "(need 4 * rows < 2**31)")


# ---------------------------------------------------------------------------------------------
# Hashing.


def _mulmod(a, b: int, mod: int, a_bits: int = 31):
  """(a * b) mod `mod` exactly in int32, for int32 0 <= a < 2**a_bits and static 0 <= b < mod.

  a is split into w-bit chunks a_j (a = sum a_j 2^(w j)); each a_j * (b 2^(w j) mod `mod`) is below
  2^w * mod < 2^30, and the running sum is reduced after every addition.
  """
  w = max(1, int(np.floor(np.log2(_INT32_MAX / mod))) - 1)
  acc = jnp.zeros_like(a)
  for j in range(-(-a_bits // w)):
    chunk = (a >> (w * j)) & ((1 << w) - 1)
    coef = (b * pow(2, w * j, mod)) % mod
    acc = (acc + chunk * coef) % mod
  return acc


def eos_reach(full, eos_token_id: int, n1: int):
  """full [B, n1 + S] (context then tokens) -> reach [B, S]: how many tokens back the look-back of
  each token may go (neighbour d is kept iff d < reach): t - (the last EOS strictly before t)."""
  pos = jnp.arange(full.shape[1], dtype=jnp.int32)
  marked = jnp.where(full == eos_token_id, pos, -1)
  last_eos = jax.lax.cummax(marked, axis=1)
  last_before = jnp.concatenate([jnp.full_like(last_eos[:, :1], -1), last_eos[:, :-1]], axis=1)
  return (pos - last_before)[:, n1:]


def ngram_ids(input_ids, *, vocab_size: int, moduli: list[int], neighbor_num: int, split_num: int,
              context=None, segment_ids=None, eos_token_id: int | None = None):
  """N-gram row ids of every table: int32 [num_tables, batch, seq].

  input_ids [B, S] int; context [B, N - 1] tokens before input_ids (None = start of sequence);
  segment_ids [B, S] (neighbours from another segment count as 0; only without context);
  eos_token_id: when set, neighbours at or before an EOS that precedes the token count as 0.
  """
  b, s = input_ids.shape
  n1 = neighbor_num - 1
  ids = input_ids.astype(jnp.int32)
  if context is None:
    context = jnp.zeros((b, n1), jnp.int32)
  elif segment_ids is not None:
    raise ValueError("ngram_ids: pass either context (decoding) or segment_ids (packed training), not both")
  full = jnp.concatenate([context.astype(jnp.int32), ids], axis=1)      # [B, n1 + S]
  reach = None if eos_token_id is None else eos_reach(full, int(eos_token_id), n1)
  shifted = {}
  for d in range(1, n1 + 1):
    prev = full[:, n1 - d:n1 - d + s]                                     # t_{i-d}
    if reach is not None:
      prev = jnp.where(reach > d, prev, 0)
    if segment_ids is not None:
      same = jnp.zeros((b, s), bool).at[:, d:].set(segment_ids[:, d:] == segment_ids[:, :-d])
      prev = jnp.where(same, prev, 0)
    shifted[d] = prev
  bits = max(1, (vocab_size - 1).bit_length())   # token ids are < vocab_size
  out = []
  for n in range(2, neighbor_num + 1):
    for j in range(split_num):
      mod = moduli[(n - 2) * split_num + j]
      acc = ids % mod
      for d in range(1, n):
        acc = (acc + _mulmod(shifted[d], pow(vocab_size, d, mod), mod, bits)) % mod
      out.append(acc)
  return jnp.stack(out)


def ngram_ids_for_config(config: ConfigDict, input_ids, context=None, segment_ids=None):
  s = ngram_settings(config)
  return ngram_ids(input_ids, vocab_size=config.vocab_size, moduli=ngram_moduli(config),
                   neighbor_num=s["neighbor_num"], split_num=s["split_num"], context=context,
                   segment_ids=segment_ids, eos_token_id=config.eos_token_id if s["eos_reset"] else None)


def init_ngram_context(config: ConfigDict, batch: int):
  """Empty n-gram cache for decoding: [batch, neighbor_num - 1] zeros (= before the start)."""
  return jnp.zeros((batch, ngram_settings(config)["neighbor_num"] - 1), jnp.int32)


def update_ngram_context(context, new_tokens):
  """Shifts new tokens [B, S] into the n-gram cache [B, N - 1] (keeps the last N - 1 tokens)."""
  n1 = context.shape[1]
  return jnp.concatenate([context, new_tokens.astype(context.dtype)], axis=1)[:, -n1:] if n1 else context


# ---------------------------------------------------------------------------------------------
# The module.


class NgramEmbedding(nn.Module):
  """Adds the T hashed n-gram embeddings to the word embedding and averages (spec section 4).

  Parameters: `table_{i}` [rows_i, d] (logical axes ngram_vocab, ngram_dim) and `post_proj_{i}`
  [d, hidden] (ngram_dim, embed), i < T.
  """

  config: ConfigDict
  placement: Placement = LOCAL

  @nn.compact
  def __call__(self, input_ids, word_embeddings, *, context=None, segment_ids=None):
    """input_ids [B, S], word_embeddings [B, S, hidden] (E0[t]) -> [B, S, hidden] in config.dtype."""
    c = self.config
    validate_ngram(c)
    dt = dtype_of(c.dtype)
    d = ngram_dim(c)
    ids = ngram_ids_for_config(c, input_ids, context=context, segment_ids=segment_ids)
    out = word_embeddings.astype(jnp.float32)
    for i, rows in enumerate(ngram_table_rows(c)):
      table = param(self, f"table_{i}", (rows, d), ("ngram_vocab", "ngram_dim"))
      proj = param(self, f"post_proj_{i}", (d, c.hidden_size), ("ngram_dim", "embed"))
      e = self.placement.lookup(table, ids[i], dt, ("ngram_vocab", "ngram_dim"))
      out = out + jnp.dot(e, proj.astype(dt), preferred_element_type=jnp.float32)
    return (out / (1 + len(ngram_moduli(c)))).astype(dt)
