"""Multi-token prediction: `config.mtp_num_heads` = N steps of dense MTP layers (spec section 6).

Step k (k = 1..N) at position t reads the token k positions ahead and the hidden state of the
step before it (the main model's final-normed output for k = 1, as vLLM's LongCat MTP feeds it),
and predicts token t + k + 1 through the main model's `lm_head`:

    x = eh_proj(concat([enorm(embed(tok_{t+k})), hnorm(h_{k-1})]))      # eh_proj: 2H -> H
    x = x + mla(input_norm(x));  x = x + mlp(post_attn_norm(x))          # one dense layer
    h_k = final_norm(x)                                                  # logits = h_k @ lm_head

Two layouts (`config.mtp_shared_module`):
- False: N chained layers `layer_0` .. `layer_{N-1}` with dense attention; the embedding is the
  main model's (LongCat-Flash / Flash-Lite ship one MTP layer, N = 1).
- True, LongCat-2.0 as released (`mtp_replicate_modules: true`; only `model.mtp.layers.0.*` in the
  checkpoint): ONE layer `layer` applied N times, with its own `embed_tokens` (no n-gram
  embedding: `mtp_disable_over_tokenizer`), and, with LongCat Sparse Attention, its own indexer
  whose selection of step 1 is reused by the later steps (`dsa_mtp_cli`).
`final_norm` is shared by the steps (`model.mtp.norm.weight`).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from longcat_jax.config import ConfigDict, dtype_of
from longcat_jax.model.attention import MLA
from longcat_jax.model.layers import DenseMLP, RMSNorm, param
from longcat_jax.model.placement import LOCAL, Placement
from longcat_jax.model.sparse_attention import INDEXER_KL, Indexer, distill_indexer

_TOKENS = ("batch", "length", "embed")  # activations stay split over the token axes


class MTPLayer(nn.Module):
  """One MTP layer: fuse embedding and previous hidden state, then one MLA + dense SwiGLU layer."""

  config: ConfigDict
  cache_mode: str | None = None  # None (training), "prefill" or "decode": speculative decoding's KV cache.
  placement: Placement = LOCAL

  @nn.compact
  def __call__(self, h_prev, emb, cos, sin, segment_ids, cache_lengths=None, indices=None, reuse: bool = False):
    """h_prev, emb [B, S, H] -> ([B, S, H] before the shared final norm, the key selection or None).

    With `mtp_shared_module` and sparse attention the layer owns an indexer: step 1 selects keys
    (`reuse=False`), the later steps pass that selection back with `reuse=True` (None = dense)."""
    c, p = self.config, self.placement
    constrain = p.constrain
    norm = lambda name: RMSNorm(c, c.rms_norm_eps, name=name)
    eh_proj = param(self, "eh_proj", (2 * c.hidden_size, c.hidden_size), (None, "embed"))
    # Without these constraints GSPMD follows eh_proj's FSDP split of `embed` and replicates the
    # tokens in the backward pass (the whole batch's [B, S, 2H] float32 cotangent on every device).
    emb, h_prev = constrain(emb, _TOKENS), constrain(h_prev, _TOKENS)
    x = jnp.concatenate([norm("enorm")(emb), norm("hnorm")(h_prev)], axis=-1)
    x = constrain(x @ eh_proj.astype(dtype_of(c.dtype)), _TOKENS)
    mla, y = MLA(c, p, name="attn"), norm("input_norm")(x)
    if c.mtp_shared_module and c.sparse_attention is not None:
      indexer = Indexer(c, p, name="indexer")
      if not reuse or self.is_initializing():
        indices = indexer.select(y, mla.q_latent(y), cos, sin, segment_ids, self.cache_mode, cache_lengths)
        if self.is_mutable_collection(INDEXER_KL) and self.cache_mode is None:  # trains like the main ones
          distill_indexer(self, indexer, mla, y, cos, sin, segment_ids, indices, prefix="mtp_")
    x = x + mla(y, cos, sin, segment_ids, indices, cache_mode=self.cache_mode, cache_lengths=cache_lengths)
    x = constrain(x, _TOKENS)
    return constrain(x + DenseMLP(c, p, name="mlp")(norm("post_attn_norm")(x)), _TOKENS), indices


def step_names(config: ConfigDict) -> list[str]:
  """The parameter name of the layer each of the N steps applies."""
  return ["layer"] * config.mtp_num_heads if config.mtp_shared_module else [
      f"layer_{k}" for k in range(config.mtp_num_heads)]


class MTPHead(nn.Module):
  """The N MTP steps and the shared `final_norm` (+ the own `embed_tokens` with `mtp_shared_module`)."""

  config: ConfigDict
  placement: Placement = LOCAL

  def setup(self):
    c = self.config
    self.final_norm = RMSNorm(c, c.rms_norm_eps)
    for n in sorted(set(step_names(c))):
      setattr(self, n, MTPLayer(c, placement=self.placement))  # named `layer` or `layer_{k}`
    if c.mtp_shared_module:
      self.embed_tokens = param(self, "embed_tokens", (c.vocab_size, c.hidden_size), ("vocab", "embed"))

  def embed(self, ids):
    """ids [..., S] -> the MTP layer's own token embedding (`mtp_shared_module`)."""
    return self.placement.lookup(self.embed_tokens, ids, dtype_of(self.config.dtype))

  def __call__(self, hidden, embeds, cos, sin, segment_ids=None):
    """hidden [B, S, H] (main model, final-normed), embeds [N, B, S, H] (embed(tok_{t+k}) for
    k = 1..N, from `embed` or the main table) -> final-normed hidden of every step [N, B, S, H]."""
    outs, h, indices = [], hidden, None
    for k, name in enumerate(step_names(self.config)):
      x, indices = getattr(self, name)(h, embeds[k], cos, sin, segment_ids, indices=indices, reuse=k > 0)
      h = self.final_norm(x)
      outs.append(h)
    return jnp.stack(outs)
