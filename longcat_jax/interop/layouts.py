"""The released checkpoint layouts as data: which HF tensor feeds which JAX leaf, and how.

A `Leaf` is one JAX variable (possibly stacked over layers [L, ...] and experts [L, N, ...]) and
the HF tensor name template of each of its slices (`{l}` layer, `{e}` expert). The relation of a
slice to its HF tensor is a pure re-indexing: HF dim k is the merge, in order, of the JAX slice
axes `hf_axes[k]`. E.g. `q_b` [q_lora, heads, qk] is HF [heads * qk, q_lora]: hf_axes ((1, 2), (0,)).
Being data, a box of JAX indices maps to a box of HF rows and columns, so a shard is read (and
written) without touching the rest of the tensor.

`LAYOUTS` has one entry per released `architectures` name (spec section 4b); each entry names the
tensor-name families it uses. A new release is one entry.
"""

from __future__ import annotations

import dataclasses
import re
import math
from typing import Callable

from longcat_jax.config import ConfigDict, hf_architecture
from longcat_jax.model import ngram

ID1 = ((0,),)                 # [n] <-> [n]
ID2 = ((0,), (1,))            # [a, b] <-> [a, b]
T = ((1,), (0,))              # [in, out] <-> [out, in] (PyTorch Linear)
HEADS_IN = ((1, 2), (0,))     # [in, heads, d] <-> [heads * d, in]
HEADS_OUT = ((2,), (0, 1))    # [heads, d, out] <-> [out, heads * d]


@dataclasses.dataclass(frozen=True)
class Leaf:
  collection: str
  path: tuple[str, ...]
  hf_key: str                          # template with {l} (layer) and/or {e} (expert)
  hf_axes: tuple[tuple[int, ...], ...]
  per_layer: bool = False
  per_expert: bool = False
  fp8: bool = False                    # a linear weight that FP8 releases store block-quantized
  float32: bool = False                # kept in float32 in JAX whatever the load dtype (router)
  hf_rows: int | None = None           # stored rows when the JAX leaf is row-padded (n-gram tables)

  @property
  def lead(self) -> int:
    """Number of stacked axes in front of the per-tensor slice."""
    return int(self.per_layer) + int(self.per_expert)

  def hf_shape(self, slice_shape) -> tuple[int, ...]:
    shape = [math.prod(slice_shape[a] for a in g) for g in self.hf_axes]
    if self.hf_rows is not None:
      shape[0] = self.hf_rows
    return tuple(shape)

  def instances(self, c: ConfigDict):
    """(index into the stacked leaf, HF key) for every HF tensor behind this leaf."""
    layers = range(c.num_layers) if self.per_layer else [None]
    experts = range(c.num_ffn_experts) if self.per_expert else [None]
    for l in layers:
      for e in experts:
        yield tuple(i for i in (l, e) if i is not None), self.hf_key.format(l=l, e=e)


def _leaf(path, key, axes, collection="params", **kw):
  return Leaf(collection, tuple(path), key, axes, **kw)


# ---------------------------------------------------------------------------------------------
# Tensor-name families.


def trunk(c: ConfigDict) -> list[Leaf]:
  """Embedding, 2 x (MLA + dense MLP) per ScMoE layer, router, experts, final norm, lm_head
  (transformers.LongcatFlashForCausalLM names; spec section 7)."""
  out = [_leaf(("embed_tokens",), "model.embed_tokens.weight", ID2),
         _leaf(("final_norm", "scale"), "model.norm.weight", ID1)]
  if not c.tie_word_embeddings:
    out.append(_leaf(("lm_head",), "lm_head.weight", T))
  lay, pre = ("decoder", "layers"), "model.layers.{l}."
  layer = dict(per_layer=True)
  for i in (0, 1):
    out += [_leaf(lay + (f"input_norm_{i}", "scale"), f"{pre}input_layernorm.{i}.weight", ID1, **layer),
            _leaf(lay + (f"post_attn_norm_{i}", "scale"), f"{pre}post_attention_layernorm.{i}.weight", ID1, **layer)]
    out += [dataclasses.replace(l, path=lay + (f"attn_{i}",) + l.path, hf_key=pre + f"self_attn.{i}." + l.hf_key,
                                per_layer=True) for l in mla()]
    out += [dataclasses.replace(l, path=lay + (f"mlp_{i}",) + l.path, hf_key=pre + f"mlps.{i}." + l.hf_key,
                                per_layer=True) for l in dense_mlp()]
  moe = lay + ("moe",)
  out += [_leaf(moe + ("router",), pre + "mlp.router.classifier.weight", T, float32=True, **layer),
          _leaf(moe + ("router",), pre + "mlp.router.e_score_correction_bias", ID1, collection="expert_bias",
                float32=True, **layer)]
  if c.num_ffn_experts:
    for proj, ours in (("gate_proj", "w_gate"), ("up_proj", "w_up"), ("down_proj", "w_down")):
      out.append(_leaf(moe + (ours,), pre + f"mlp.experts.{{e}}.{proj}.weight", T, per_layer=True, per_expert=True,
                       fp8=True))
  return out


def mla() -> list[Leaf]:
  """One MLA block, relative to `...self_attn.{i}.` / params[attn_i]."""
  return [_leaf(("q_a",), "q_a_proj.weight", T, fp8=True),
          _leaf(("q_a_norm",), "q_a_layernorm.weight", ID1),
          _leaf(("q_b",), "q_b_proj.weight", HEADS_IN, fp8=True),
          _leaf(("kv_a",), "kv_a_proj_with_mqa.weight", T, fp8=True),
          _leaf(("kv_a_norm",), "kv_a_layernorm.weight", ID1),
          _leaf(("kv_b",), "kv_b_proj.weight", HEADS_IN, fp8=True),
          _leaf(("o",), "o_proj.weight", HEADS_OUT, fp8=True)]


def dense_mlp() -> list[Leaf]:
  return [_leaf((ours,), f"{proj}.weight", T, fp8=True)
          for proj, ours in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down"))]


MTP_EMBED_KEY = "model.mtp.embed_tokens.weight"


def _mtp_layer(pre: str, path: tuple[str, ...]) -> list[Leaf]:
  """One MTP layer `{pre}*` <-> params[path]: eh_proj, enorm / hnorm, its MLA and dense MLP."""
  out = [_leaf(path + ("eh_proj",), pre + "eh_proj.weight", T),
         _leaf(path + ("enorm", "scale"), pre + "enorm.m.weight", ID1),
         _leaf(path + ("hnorm", "scale"), pre + "hnorm.m.weight", ID1),
         _leaf(path + ("input_norm", "scale"), pre + "input_layernorm.weight", ID1),
         _leaf(path + ("post_attn_norm", "scale"), pre + "post_attention_layernorm.weight", ID1)]
  out += [dataclasses.replace(l, path=path + ("attn",) + l.path, hf_key=pre + "self_attn." + l.hf_key)
          for l in mla()]
  out += [dataclasses.replace(l, path=path + ("mlp",) + l.path, hf_key=pre + "transformer_layer.mlp." + l.hf_key)
          for l in dense_mlp()]
  return out


def mtp_per_head(c: ConfigDict) -> list[Leaf]:
  """`model.mtp.layers.{k}.*` <-> params['mtp'][layer_k] (LongCat-Flash; spec section 7). The
  heads share `model.mtp.norm.weight`; `model.mtp.embed_tokens.weight` is a copy of the main
  embedding (written, not read)."""
  out = [_leaf(("mtp", "final_norm", "scale"), "model.mtp.norm.weight", ID1)]
  for k in range(c.mtp_num_heads):
    out += _mtp_layer(f"model.mtp.layers.{k}.", ("mtp", f"layer_{k}"))
  return out


def mtp_shared(c: ConfigDict) -> list[Leaf]:
  """LongCat-2.0's ONE MTP module `model.mtp.layers.0.*` <-> params['mtp']['layer'] (applied
  `mtp_num_heads` times; `mtp_shared_module`): its MLA under `self_attn.*` with its own indexer
  `self_attn.indexer.*`, `transformer_layer.mlp.*`, `eh_proj`, `enorm.m` / `hnorm.m`, and its own
  `model.mtp.embed_tokens` and `model.mtp.norm` (docs/LONGCAT2.md section 0)."""
  if not c.mtp_shared_module:
    return mtp_per_head(c)
  pre, path = "model.mtp.layers.0.", ("mtp", "layer")
  out = [_leaf(("mtp", "final_norm", "scale"), "model.mtp.norm.weight", ID1),
         _leaf(("mtp", "embed_tokens"), MTP_EMBED_KEY, ID2)] + _mtp_layer(pre, path)
  if c.sparse_attention is not None:
    out += [dataclasses.replace(l, path=path + ("indexer",) + l.path[3:], per_layer=False,
                                hf_key=pre + "self_attn.indexer." + l.hf_key.split("self_attn.0.indexer.", 1)[1])
            for l in indexer(c)]
  return out


# LongCat-2.0 stores n-gram tables with its MTP module that the released code never reads
# (`mtp_disable_over_tokenizer`): kept aside on load (`read_mtp_tensors`), never model variables.
UNUSED_MTP_NGRAM = re.compile(r"^model\.mtp\..*oe_embed_(tokens|proj)\d+\.weight$")


def _ngram(c: ConfigDict, table_key: str, proj_key: str) -> list[Leaf]:
  out = []
  for i, stored in enumerate(ngram.ngram_moduli(c)):
    out += [_leaf(("ngram_embedding", f"table_{i}"), table_key.format(i=i), ID2, hf_rows=stored),
            _leaf(("ngram_embedding", f"post_proj_{i}"), proj_key.format(i=i), T)]
  return out


def ngram_lite(c: ConfigDict) -> list[Leaf]:
  """LongCat-Flash-Lite: `model.ngram_embeddings.{embedders,post_projs}.{i}.weight`, tables stored
  with exactly m + 2i + 1 rows (padded here to the sharding multiple)."""
  return _ngram(c, "model.ngram_embeddings.embedders.{i}.weight", "model.ngram_embeddings.post_projs.{i}.weight")


def ngram_oe(c: ConfigDict) -> list[Leaf]:
  """LongCat-2.0: `model.oe_embed_tokens{i}.weight` / `model.oe_embed_proj{i}.weight` (spec 4b).
  The key table of issue 15 may re-point these at its model."""
  return _ngram(c, "model.oe_embed_tokens{i}.weight", "model.oe_embed_proj{i}.weight")


def indexer(c: ConfigDict) -> list[Leaf]:
  """The sparse-attention indexer, in the first attention block of each layer
  (`model.layers.{l}.self_attn.0.indexer.*`, DeepSeek-V3.2 names; spec section 4b)."""
  pre, ind = "model.layers.{l}.self_attn.0.indexer.", ("decoder", "layers", "indexer")
  layer = dict(per_layer=True)
  return [_leaf(ind + ("wq_b",), pre + "wq_b.weight", HEADS_IN, **layer),
          _leaf(ind + ("wk",), pre + "wk.weight", T, **layer),
          _leaf(ind + ("k_norm",), pre + "k_norm.weight", ID1, **layer),
          _leaf(ind + ("weights_proj",), pre + "weights_proj.weight", T, **layer)]


# ---------------------------------------------------------------------------------------------
# One entry per released `architectures` name.


@dataclasses.dataclass(frozen=True)
class Layout:
  architecture: str
  model_type: str | None                                   # written when the source had none
  ngram: Callable[[ConfigDict], list[Leaf]] | None         # the n-gram family, if the model has one
  mtp: Callable[[ConfigDict], list[Leaf]]
  identity_expert_tensors: bool                            # write gate/up of zero experts (transformers)


LAYOUTS = {
    "LongcatFlashForCausalLM": Layout("LongcatFlashForCausalLM", "longcat_flash", ngram_lite, mtp_per_head, True),
    "LongcatFlashNgramForCausalLM": Layout("LongcatFlashNgramForCausalLM", "longcat_flash_ngram", ngram_lite,
                                           mtp_per_head, False),
    # LongCat-2.0: n-gram and indexer names as released, one MTP module applied 3 times.
    "LongcatCausalLM": Layout("LongcatCausalLM", None, ngram_oe, mtp_shared, False),
}


def architecture(c: ConfigDict) -> str:
  """The layout a config is saved in: where it was loaded from, else by its features."""
  return hf_architecture(c)


def leaves(c: ConfigDict) -> list[Leaf]:
  """Every JAX leaf of a model with this config, with its HF tensors in the config's layout."""
  lay = LAYOUTS[architecture(c)]
  out = trunk(c)
  if c.ngram_embedding is not None:
    out += lay.ngram(c)
  if c.sparse_attention is not None:
    out += indexer(c)
  if c.mtp_num_heads:
    out += lay.mtp(c)
  return out


def identity_expert_keys(c: ConfigDict) -> list[str]:
  """gate/up of the zero (identity) experts, which transformers allocates and saves but never uses."""
  return [f"model.layers.{l}.mlp.experts.{e}.{p}.weight" for l in range(c.num_layers)
          for e in range(c.num_ffn_experts, c.num_ffn_experts + c.zero_experts) for p in ("gate_proj", "up_proj")]
