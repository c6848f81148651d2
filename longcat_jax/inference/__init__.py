"""Inference: compressed KV cache, absorbed MLA decoding, batched generation, MTP speculation.

    from longcat_jax.inference import generate
    out = generate(model, variables, prompts, max_new_tokens=64, temperature=0.0)
"""

from longcat_jax.inference.cache import cache_bytes_per_token, cache_values_per_token, pad_cache
from longcat_jax.inference.engine import Engine, Generation, engine_for, generate, plan_cache_size, prefill_bucket
from longcat_jax.inference.sampling import Sampling, filter_logits, make_sampling, sample, token_probs

__all__ = ["generate", "Generation", "Engine", "engine_for", "Sampling", "make_sampling", "sample", "filter_logits",
           "token_probs", "pad_cache", "cache_values_per_token", "cache_bytes_per_token", "plan_cache_size",
           "prefill_bucket"]
