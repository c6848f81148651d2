"""Parameter accounting from abstract shapes (`jax.eval_shape`: nothing is allocated)."""

from __future__ import annotations

import dataclasses

import flax
import jax
import jax.numpy as jnp
import numpy as np

from longcat_jax.config import ConfigDict, get_config
from longcat_jax.model import LongcatForCausalLM, ngram


@dataclasses.dataclass(frozen=True)
class ParamCount:
  """Parameter counts of a config (the MTP head is counted separately)."""

  total: int
  expert: int           # all routed FFN experts of all layers
  non_expert: int       # everything else (attention, dense MLPs, norms, router, embeddings)
  per_expert: int       # one FFN expert of one layer
  embedding: int        # input embedding (+ n-gram tables when present)
  num_layers: int
  top_k: int
  target_ffn_experts: float
  mtp: int = 0
  mtp_unused_ngram: int = 0   # n-gram tables the released MTP module stores but never reads (LongCat-2.0)

  @property
  def serialized(self) -> int:
    """Elements in the released checkpoint: the model, the MTP module and its unused n-gram tables."""
    return self.total + self.mtp + self.mtp_unused_ngram

  def activated(self, ffn_experts_per_token: float) -> float:
    """Parameters touched per token with that many FFN experts per layer (the rest zero experts).

    Counts every non-expert weight except the embedding tables, of which a token reads one row
    (plus the n-gram rows), as the report does.
    """
    return self.non_expert - self.embedding + ffn_experts_per_token * self.per_expert * self.num_layers

  @property
  def activated_min(self) -> float:
    return self.activated(0)

  @property
  def activated_target(self) -> float:
    return self.activated(self.target_ffn_experts)

  @property
  def activated_max(self) -> float:
    return self.activated(self.top_k)

  def summary(self) -> str:
    b = lambda x: f"{x / 1e9:,.2f}B"
    return (f"total {b(self.total)} (experts {b(self.expert)}, non-expert {b(self.non_expert)}, "
            f"embeddings {b(self.embedding)}); activated per token: {b(self.activated_min)} (0 FFN experts), "
            f"{b(self.activated_target)} ({self.target_ffn_experts:g}), {b(self.activated_max)} ({self.top_k})"
            + (f"; MTP {b(self.mtp)}" if self.mtp else "")
            + (f" (+ {b(self.mtp_unused_ngram)} unused MTP n-gram tables; serialized {b(self.serialized)})"
               if self.mtp_unused_ngram else ""))


def param_shapes(config: ConfigDict):
  """Abstract `params` tree (ShapeDtypeStructs) of the model built from `config`."""
  model = LongcatForCausalLM(config)
  v = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
  return flax.linen.meta.unbox(v["params"])


def count_params(config: ConfigDict | str) -> ParamCount:
  """Total, non-expert and per-token activated parameter counts of `config` (or a preset name)."""
  if isinstance(config, str):
    config = get_config(config)
  elif not isinstance(config, ConfigDict):
    raise TypeError(f"count_params takes a model ConfigDict or a preset name, got {type(config).__name__}")
  params = param_shapes(config)
  flat = flax.traverse_util.flatten_dict(params)
  size = lambda s: int(np.prod(s.shape))
  total = sum(size(s) for s in flat.values())
  is_expert = lambda k: k[-1] in ("w_gate", "w_up", "w_down")
  expert = sum(size(s) for k, s in flat.items() if is_expert(k))
  embedding = sum(size(s) for k, s in flat.items() if k[0] in ("embed_tokens", "ngram_embedding"))
  mtp = sum(size(s) for k, s in flat.items() if k[0] == "mtp")
  n = config.num_ffn_experts
  per_expert = 3 * config.hidden_size * config.expert_ffn_size if n else 0
  unused = 0
  if config.mtp_num_heads and config.mtp_shared_module and config.ngram_embedding is not None:
    # LongCat-2.0's checkpoint carries a second set of n-gram tables (+ projections) with the MTP
    # module, which `mtp_disable_over_tokenizer` leaves unused: [derived] 1,775.56B serialized
    # elements - (model + MTP layer) = one set of unpadded tables (docs/LONGCAT2.md section 6).
    d = ngram.ngram_dim(config)
    unused = sum(m * d + d * config.hidden_size for m in ngram.ngram_moduli(config))
  return ParamCount(mtp_unused_ngram=unused, total=total - mtp, expert=expert, non_expert=total - mtp - expert, per_expert=per_expert,
                    embedding=embedding, num_layers=config.num_layers, top_k=config.top_k,
                    target_ffn_experts=config.target_ffn_experts, mtp=mtp)
