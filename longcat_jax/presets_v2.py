"""Presets `flash_lite` (LongCat-Flash-Lite, 68.5B) and `longcat2` (LongCat-2.0, 1.6T).

Every number's source is in docs/LONGCAT2.md. In short: flash_lite is the released config.json
(spec section 4); longcat2 takes the defaults of SGLang's `LongcatFlashProConfig`
(sgl-project/sglang python/sglang/srt/configs/longcat_flash_pro.py), which reproduce the published
totals (1.6T parameters, ~48B activated, 135B n-gram parameters, 3-step MTP), with the released
config.json's positions and YaRN and the released code's math (mlx-lm longcat2.py).

    cfg = longcat_jax.get_config("flash_lite")
    longcat_jax.count_params(cfg).total        # 68.5e9

Each function fills in a `config.base_config()` it is given; `longcat_jax.config` registers them.
"""

from __future__ import annotations

from ml_collections import ConfigDict


def flash_lite(c: ConfigDict) -> ConfigDict:
  """LongCat-Flash-Lite: 68.5B total of which 31.4B n-gram tables; 2.9B-4.5B activated."""
  c.name = "flash_lite"
  c.update(vocab_size=131072, hidden_size=3072, num_layers=14, num_heads=32, q_lora_rank=1536,
           kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, ffn_size=6144,
           num_ffn_experts=256, zero_experts=128, top_k=12, expert_ffn_size=1024, routed_scaling_factor=6.0,
           rope_theta=5e6, max_position_embeddings=327680, mtp_num_heads=1)
  c.rope_scaling = dict(type="yarn", factor=10.0, original_max_position_embeddings=32768, beta_fast=32,
                        beta_slow=1, mscale=1.0, mscale_all_dim=1.0)
  c.ngram_embedding = dict(vocab_size_ratio=78, neighbor_num=4, split_num=4)
  return c


def longcat2(c: ConfigDict) -> ConfigDict:
  """LongCat-2.0 as released (1.6T without the MTP module, ~48B activated): LongCat Sparse
  Attention, 135B n-gram tables, one MTP module applied 3 times (docs/LONGCAT2.md)."""
  c.name = "longcat2"
  c.update(vocab_size=163840, hidden_size=8192, num_layers=38, num_heads=64, q_lora_rank=1536,
           kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, ffn_size=12288,
           num_ffn_experts=768, zero_experts=128, top_k=12, expert_ffn_size=2048, routed_scaling_factor=9.0,
           target_ffn_experts=8.0, rope_theta=1e6, mtp_num_heads=3, mtp_shared_module=True,
           # config.json: 262144 native positions (1M tokens is an override of this field); the
           # latent norms use rms_norm_eps (mlx-lm longcat2.py `Longcat2Attention`).
           max_position_embeddings=262144, latent_norm_eps=1e-5)
  c.rope_scaling = dict(type="yarn", factor=120.0, original_max_position_embeddings=8192, beta_fast=32,
                        beta_slow=1, mscale=1.0, mscale_all_dim=1.0)  # config.json `deepseek_yarn`
  # eos_reset: the n-gram look-back stops at EOS (mlx-lm 9049ab3a longcat_flash_ngram.py `reach`).
  c.ngram_embedding = dict(vocab_size_ratio=100.567, neighbor_num=5, split_num=4, eos_reset=True)
  c.sparse_attention = dict(index_heads=32, index_dim=128, top_k=2048, init_tokens=16, local_tokens=1024)
  return c
