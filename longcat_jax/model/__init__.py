"""The LongCat model family in Flax linen."""

from longcat_jax.model.transformer import LongcatForCausalLM, ScMoELayer, SCANNED_COLLECTIONS
from longcat_jax.model.moe import EXPERT_BIAS, EXPERT_LOAD, MoE
from longcat_jax.model.attention import MLA

__all__ = ["LongcatForCausalLM", "ScMoELayer", "MoE", "MLA", "EXPERT_BIAS", "EXPERT_LOAD",
           "SCANNED_COLLECTIONS"]
