"""Multi-token prediction head: `config.mtp_num_heads` chained dense layers (spec section 6).

Head k (k = 1..N) at position t reads the token k positions ahead and the hidden state of the
head before it (the main model's final-normed output for k = 1, as vLLM's LongCat MTP feeds it),
and predicts token t + k + 1 through the main model's `lm_head`:

    x = eh_proj(concat([enorm(embed(tok_{t+k})), hnorm(h_{k-1})]))      # eh_proj: 2H -> H
    x = x + mla(input_norm(x));  x = x + mlp(post_attn_norm(x))          # one dense layer
    h_k = final_norm(x)                                                  # logits = h_k @ lm_head

The embedding and `lm_head` are the main model's; `final_norm` is shared by the heads
(`model.mtp.norm.weight` in the released checkpoint, which has one head).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from longcat_jax.config import ConfigDict, dtype_of
from longcat_jax.model.attention import MLA
from longcat_jax.model.layers import DenseMLP, RMSNorm, param
from longcat_jax.model.placement import LOCAL, Placement

_TOKENS = ("batch", "length", "embed")  # activations stay split over the token axes


class MTPLayer(nn.Module):
  """One MTP head: fuse embedding and previous hidden state, then one MLA + dense SwiGLU layer."""

  config: ConfigDict
  cache_mode: str | None = None  # None (training), "prefill" or "decode": speculative decoding's KV cache.
  placement: Placement = LOCAL

  @nn.compact
  def __call__(self, h_prev, emb, cos, sin, segment_ids, cache_lengths=None):
    """h_prev, emb [B, S, H] -> [B, S, H] (before the shared final norm)."""
    c, p = self.config, self.placement
    constrain = p.constrain
    norm = lambda name: RMSNorm(c, c.rms_norm_eps, name=name)
    eh_proj = param(self, "eh_proj", (2 * c.hidden_size, c.hidden_size), (None, "embed"))
    # Without these constraints GSPMD follows eh_proj's FSDP split of `embed` and replicates the
    # tokens in the backward pass (the whole batch's [B, S, 2H] float32 cotangent on every device).
    emb, h_prev = constrain(emb, _TOKENS), constrain(h_prev, _TOKENS)
    x = jnp.concatenate([norm("enorm")(emb), norm("hnorm")(h_prev)], axis=-1)
    x = constrain(x @ eh_proj.astype(dtype_of(c.dtype)), _TOKENS)
    x = x + MLA(c, p, name="attn")(norm("input_norm")(x), cos, sin, segment_ids,
                                cache_mode=self.cache_mode, cache_lengths=cache_lengths)
    x = constrain(x, _TOKENS)
    return constrain(x + DenseMLP(c, p, name="mlp")(norm("post_attn_norm")(x)), _TOKENS)


class MTPHead(nn.Module):
  """`mtp_num_heads` chained `MTPLayer`s (`layer_0` ..) and one shared `final_norm`."""

  config: ConfigDict
  placement: Placement = LOCAL

  @nn.compact
  def __call__(self, hidden, embeds, cos, sin, segment_ids=None):
    """hidden [B, S, H] (main model, final-normed), embeds [N, B, S, H] (embed(tok_{t+k}) for
    k = 1..N) -> final-normed hidden of every head [N, B, S, H]."""
    c = self.config
    final_norm = RMSNorm(c, c.rms_norm_eps, name="final_norm")
    outs, h = [], hidden
    for k in range(c.mtp_num_heads):
      h = final_norm(MTPLayer(c, placement=self.placement, name=f"layer_{k}")(h, embeds[k], cos, sin, segment_ids))
      outs.append(h)
    return jnp.stack(outs)
