"""The ScMoE layer and the LongCat causal LM (spec section 1).

    def layer(h):
        h = h + mla0(norm_in0(h))
        x = norm_post0(h)
        moe_out = moe(x)              # shortcut branch: its all-to-all overlaps mla1 + mlp1
        h = h + mlp0(x)
        h = h + mla1(norm_in1(h))
        h = h + mlp1(norm_post1(h)) + moe_out
        return h

Layers run under `nn.scan` (parameters stacked on a leading `layers` axis, compile time flat in
depth; `config.scan_unroll` layers per iteration, all of them for the small presets, which XLA:CPU
runs faster without the loop), optionally rematerialised (`config.remat`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp
import numpy as np

from longcat_jax import config as config_lib
from longcat_jax.config import ConfigDict, dtype_of
from longcat_jax.model.attention import MLA
from longcat_jax.model.layers import DenseMLP, RMSNorm, param, rms_norm, rope_cos_sin
from longcat_jax.model.moe import EXPERT_BIAS, EXPERT_LOAD, MoE
from longcat_jax.model.mtp import MTPHead
from longcat_jax.model.ngram import NgramEmbedding
from longcat_jax.model.placement import LOCAL, Placement
from longcat_jax.model.sparse_attention import INDEXER_KL, Indexer, distill_indexer

# Collections carried per layer through the scan (stacked on axis 0).
SCANNED_COLLECTIONS = ("params", EXPERT_BIAS, EXPERT_LOAD, "intermediates", "cache", INDEXER_KL)

_REMAT_POLICIES = {
    "full": None,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_moe": jax.checkpoint_policies.save_only_these_names("moe_out"),
}


def check_token_ids(input_ids, vocab_size: int) -> None:
  """Raises ValueError naming the first [row, position] whose id is outside [0, vocab_size), when
  the ids are concrete (model.apply outside jit). Traced ids (under jit) are not checked: such ids
  embed as NaN, so the logits are NaN rather than a silently wrong row."""
  if isinstance(input_ids, jax.core.Tracer):
    return
  ids = np.asarray(input_ids)
  bad = (ids < 0) | (ids >= vocab_size)
  if bad.any():
    where = tuple(int(i) for i in np.argwhere(bad)[0])
    raise ValueError(f"input_ids[{', '.join(map(str, where))}] = {int(ids[where])} is outside the vocabulary "
                     f"[0, {vocab_size}) ({int(bad.sum())} such id(s))")


class ScMoELayer(nn.Module):
  """One shortcut-connected MoE layer: 2 MLA blocks, 2 dense MLPs, 1 MoE, 4 RMSNorms."""

  config: ConfigDict
  cache_mode: str | None = None  # None (training), "prefill" or "decode" (KV cache; see MLA).
  placement: Placement = LOCAL

  @nn.compact
  def __call__(self, h, cos, sin, segment_ids, cache_lengths=None):
    c, p = self.config, self.placement
    norm = lambda name: RMSNorm(c, c.rms_norm_eps, name=name)

    # LongCat Sparse Attention: one indexer per layer picks the keys for both attention blocks,
    # computed from attn_0's input (config.sparse_attention; see model/sparse_attention.py).
    indexer = Indexer(c, p, name="indexer") if c.sparse_attention is not None else None
    selected = []

    def attention(name, x):
      mla = MLA(c, p, name=name)
      if indexer is not None and not selected:
        selected.append(indexer.select(x, mla.q_latent(x), cos, sin, segment_ids, self.cache_mode, cache_lengths))
        if self.is_mutable_collection(INDEXER_KL) and self.cache_mode is None:
          distill_indexer(self, indexer, mla, x, cos, sin, segment_ids, selected[0])
      indices = selected[0] if selected else None
      if self.cache_mode == "prefill":
        return mla.prefill(x, cos, sin, indices=indices)
      if self.cache_mode == "decode":
        return mla.decode(x, cos, sin, cache_lengths, indices=indices)
      return mla(x, cos, sin, segment_ids, indices=indices)

    h = p.constrain(h, ("batch", "length", "embed"))
    h = h + attention("attn_0", norm("input_norm_0")(h))
    x = norm("post_attn_norm_0")(h)
    moe_out = checkpoint_name(MoE(c, p, name="moe")(x), "moe_out")
    h = h + DenseMLP(c, p, name="mlp_0")(x)
    h = h + attention("attn_1", norm("input_norm_1")(h))
    h = h + DenseMLP(c, p, name="mlp_1")(norm("post_attn_norm_1")(h)) + moe_out
    return h, None


class Decoder(nn.Module):
  """`num_layers` ScMoE layers under `nn.scan`."""

  config: ConfigDict
  placement: Placement = LOCAL

  @nn.compact
  def __call__(self, h, cos, sin, segment_ids, cache_mode=None, cache_lengths=None):
    c = self.config
    layer_cls = ScMoELayer
    if c.remat != "none":
      layer_cls = nn.remat(layer_cls, policy=_REMAT_POLICIES[c.remat], prevent_cse=False)
    scanned = nn.scan(
        layer_cls,
        variable_axes={col: 0 for col in SCANNED_COLLECTIONS},
        split_rngs={"params": True},
        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
        length=c.num_layers,
        unroll=min(c.scan_unroll, c.num_layers),
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    h, _ = scanned(c, cache_mode=cache_mode, placement=self.placement, name="layers")(h, cos, sin, segment_ids, cache_lengths)
    return h


class LongcatForCausalLM(nn.Module):
  """LongCat-Flash causal LM: embed -> ScMoE layers -> final norm -> untied lm_head.

  `apply(variables, input_ids [B, S])` -> logits [B, S, vocab]. `positions` [B, S] default to
  0..S-1; `segment_ids` [B, S] (packed documents; equal ids attend to each other, causally).
  `return_hidden=True` returns the final-normed hidden states [B, S, hidden] instead of logits
  (the trainer computes a vocabulary-chunked loss from them and `params['lm_head']`).

  `placement` says where the computation runs: one device (`LOCAL`, the default) or a mesh
  (`longcat_jax.parallel.MeshPlacement`: sharding constraints, expert and context parallelism).
  """

  config: ConfigDict
  placement: Placement = LOCAL

  def setup(self):
    c = self.config
    config_lib.validate(c)
    self.embed_tokens = param(self, "embed_tokens", (c.vocab_size, c.hidden_size), ("vocab", "embed"))
    self.ngram_embedding = NgramEmbedding(c, self.placement) if c.ngram_embedding is not None else None
    self.decoder = Decoder(c, self.placement)
    self.final_norm = RMSNorm(c, c.rms_norm_eps)
    if not c.tie_word_embeddings:
      self.lm_head = param(self, "lm_head", (c.hidden_size, c.vocab_size), ("embed", "vocab"))
    self.mtp = MTPHead(c, self.placement) if c.mtp_num_heads else None

  def embed(self, input_ids, segment_ids=None, ngram_context=None):
    """input_ids [B, S] -> [B, S, hidden]; with n-gram embeddings, `ngram_context` [B, N-1] is the
    decoding n-gram cache (the tokens before input_ids) and `segment_ids` keep packed documents apart."""
    check_token_ids(input_ids, self.config.vocab_size)
    # Under jit ids cannot be checked: an id outside the table reads NaN (loud), never a clipped or
    # (for negative ids) wrapped-around row.
    ids = jnp.where(input_ids < 0, self.config.vocab_size, input_ids)
    x = self.placement.lookup(self.embed_tokens, ids, dtype_of(self.config.dtype))
    if self.ngram_embedding is not None:
      x = self.ngram_embedding(input_ids, x, context=ngram_context,
                               segment_ids=segment_ids if ngram_context is None else None)
    return x

  def unembed_matrix(self):
    """[hidden, vocab] output projection (the transposed embedding when tied)."""
    return self.embed_tokens.T if self.config.tie_word_embeddings else self.lm_head

  def logits(self, hidden):
    return jnp.dot(hidden, self.unembed_matrix().astype(hidden.dtype))

  def __call__(self, input_ids, positions=None, segment_ids=None, *, return_hidden: bool = False,
               ngram_context=None):
    b, s = input_ids.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    cos, sin = rope_cos_sin(self.config, positions)
    h = self.placement.constrain(self.embed(input_ids, segment_ids, ngram_context), ("batch", "length", "embed"))
    h = self.decoder(h, cos, sin, segment_ids)
    self.sow("intermediates", "last_hidden", h)  # pre-final-norm residual stream (hidden z-loss)
    h = self.final_norm(h)
    if self.mtp is not None and self.is_initializing():
      self.mtp_hidden(h, input_ids, positions, segment_ids)  # creates params['mtp']
    if return_hidden:
      return h
    return self.placement.constrain(self.logits(h), ("batch", "length", "vocab"))

  def mtp_hidden(self, hidden, input_ids, positions=None, segment_ids=None):
    """The MTP heads (`config.mtp_num_heads` > 0; `longcat_jax.model.mtp`): hidden [B, S, H] (this
    model's final-normed output for input_ids [B, S]) -> final-normed hidden of head k = 1..N
    [N, B, S, H]; head k at position t predicts token t + k + 1 through `unembed_matrix()`."""
    b, s = input_ids.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    cos, sin = rope_cos_sin(self.config, positions)
    ahead = jnp.stack([jnp.pad(input_ids, ((0, 0), (0, k)))[:, k:] for k in range(1, self.config.mtp_num_heads + 1)])
    return self.mtp(hidden, self.mtp_embed(ahead), cos, sin, segment_ids)

  def mtp_embed(self, ids):
    """The MTP steps' token embedding of ids [..., S]: the MTP module's own table
    (`mtp_shared_module`, LongCat-2.0) or the main one, never with n-grams."""
    if self.config.mtp_shared_module:
      return self.mtp.embed(ids)
    return self.placement.lookup(self.embed_tokens, ids, dtype_of(self.config.dtype))

  def prefill(self, input_ids):
    """Prompt forward that stores the compressed KV cache (apply with `mutable=["cache"]`).

    input_ids [B, S] right-padded, at positions 0..S-1 -> final-normed hidden [B, S, hidden].
    The `cache` collection gets, per attention block, latent [L, B, S, R] and k_rope
    [L, B, S, rope]; `longcat_jax.inference` pads them to the cache size.
    """
    b, s = input_ids.shape
    positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    return self._cached_forward(input_ids, positions, "prefill", None)

  def decode(self, input_ids, lengths, ngram_context=None):
    """input_ids [B, T] at positions lengths[b] + t (lengths [B] = tokens already cached) ->
    final-normed hidden [B, T, hidden]; appends the tokens to the cache (absorbed MLA).
    With n-gram embeddings, `ngram_context` [B, N-1] holds the tokens before input_ids."""
    positions = lengths[:, None] + jnp.arange(input_ids.shape[1], dtype=jnp.int32)
    return self._cached_forward(input_ids, positions, "decode", lengths, ngram_context)

  def _cached_forward(self, input_ids, positions, cache_mode, lengths, ngram_context=None):
    cos, sin = rope_cos_sin(self.config, positions)
    h = self.placement.constrain(self.embed(input_ids, None, ngram_context), ("batch", "length", "embed"))
    return self.final_norm(self.decoder(h, cos, sin, None, cache_mode, lengths))


def init_variables(model: LongcatForCausalLM, rng, batch: int = 1, seq: int = 8):
  """Fresh variables {"params", "expert_bias"} as plain arrays (jitted init; outputs dropped)."""
  ids = jnp.zeros((batch, seq), jnp.int32)

  @jax.jit
  def _init(rng):
    v = model.init(rng, ids)
    return {k: nn.meta.unbox(v[k]) for k in ("params", EXPERT_BIAS) if k in v}

  return _init(rng)
