"""What the plain and the speculative decoders share: the forward's variables, the n-gram
context of the next token, and the decode-sized model."""

from __future__ import annotations

import jax.numpy as jnp

from longcat_jax.model.moe import EXPERT_BIAS


def ngram_context_size(config) -> int:
  """Tokens of n-gram context the embedding needs before each new token (0 without n-grams)."""
  return config.ngram_embedding["neighbor_num"] - 1 if config.ngram_embedding is not None else 0


def model_variables(variables) -> dict:
  """The collections the forward reads: params and expert_bias (drops caches, outputs)."""
  return {k: variables[k] for k in ("params", EXPERT_BIAS) if k in variables}


def _ngram_context(tokens, lengths, size: int):
  """tokens [B, S], lengths [B] -> the `size` tokens before position lengths[b] ([B, size], 0 = before start)."""
  idx = lengths[:, None] - size + jnp.arange(size)
  ctx = jnp.take_along_axis(tokens, jnp.maximum(idx, 0), axis=1)
  return jnp.where(idx >= 0, ctx, 0).astype(jnp.int32)


def decode_model(model, routed_rows: int):
  """`model` with the grouped matmul's row block sized for `routed_rows` (token, slot) rows.

  The XLA grouped matmul pads each of the N = num_ffn_experts groups to a multiple of
  `moe_block_size` rows and runs about N + rows / block blocks: with the training block (64) a
  decode step's few rows would multiply every expert on padding. Here the block is the largest
  power of two <= rows / (8 N) (at least 1), so padding stays under ~1/8 of the rows. Dropless
  either way; only the padding changes. (CPU, `small` preset, 32 experts: block 1 beats 64 by
  1.9x at B=1 and 1.1x at B=32.)
  """
  c = model.config
  block = max(1, routed_rows // (8 * max(c.num_ffn_experts, 1)))
  block = min(1 << (block.bit_length() - 1), c.moe_block_size)
  if block == c.moe_block_size:
    return model
  small = c.copy_and_resolve_references()
  small.moe_block_size = block
  return model.clone(config=small)
