"""longcat_jax: the LongCat MoE model family (LongCat-Flash, -Flash-Lite, 2.0) in JAX/Flax.

    model, variables = longcat_jax.load_pretrained("path/to/hf_checkpoint")
    logits = model.apply(variables, input_ids)          # [batch, seq, vocab]
"""

from longcat_jax import config
from longcat_jax.config import get_config
from longcat_jax.interop import CheckpointError, load_pretrained, save_pretrained
from longcat_jax.model import LongcatForCausalLM
from longcat_jax.model.transformer import init_variables
from longcat_jax.params import ParamCount, count_params

__all__ = ["config", "get_config", "LongcatForCausalLM", "init_variables", "load_pretrained",
           "save_pretrained", "CheckpointError", "count_params", "ParamCount"]
