"""longcat_jax: the LongCat MoE model family (LongCat-Flash, -Flash-Lite, 2.0) in JAX/Flax.

    model, variables = longcat_jax.load_pretrained("path/to/hf_checkpoint")
    logits = model.apply(variables, input_ids)          # [batch, seq, vocab]
    out = longcat_jax.generate(model, variables, prompts, max_new_tokens=32, temperature=0.0)
"""

from longcat_jax import platforms

platforms.keep_cpu_without_tpu()  # libtpu installed, no TPU attached: JAX opens the CPU only
platforms.keep_freed_host_memory()  # XLA:CPU's per-call buffers reuse freed pages (no page faults)

from longcat_jax import config  # noqa: E402
from longcat_jax import parallel
from longcat_jax.config import get_config
from longcat_jax.interop import CheckpointError, load_pretrained, save_pretrained
from longcat_jax.model import LongcatForCausalLM
from longcat_jax.model.transformer import init_variables
from longcat_jax.params import ParamCount, count_params
from longcat_jax.inference import generate  # also `python -m longcat_jax.generate` (the CLI module)

__all__ = ["config", "parallel", "get_config", "LongcatForCausalLM", "init_variables", "load_pretrained",
           "save_pretrained", "CheckpointError", "count_params", "ParamCount", "generate"]
