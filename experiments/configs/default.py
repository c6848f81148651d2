"""The main job: `python experiments/train.py` with no arguments trains this.

A small-width LongCat (2 ScMoE layers, hidden 128, 16 FFN + 8 zero experts, top-4 with a target of
3 FFN experts per token) on the byte-tokenized Python standard library (found at run time, built
once under ./data_cache), for 400 steps of 16 x 128 tokens: a few minutes on a 2-core CPU, loss
from ~5.8 (uniform over the 320-entry vocabulary) to ~2 nats/byte.

Variants (`--config experiments/configs/default.py:<variant>`):
  smoke   a seconds-long run of a tiny model (tests: resume, checkpoints).
"""

from longcat_jax.train.config import get_train_config


def get_config(variant: str = ""):
  c = get_train_config("tiny")
  c.model.name = "default"
  c.model.update(vocab_size=320,            # byte tokenizer: 259 ids, rounded up to a multiple of 64
                 hidden_size=128, num_layers=2, num_heads=4, q_lora_rank=64, kv_lora_rank=32,
                 qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, ffn_size=256,
                 num_ffn_experts=16, zero_experts=8, top_k=4, expert_ffn_size=64, target_ffn_experts=3.0,
                 moe_block_size=64, attention_block_q=128, attention_block_k=128)
  c.total_steps = 400
  c.batch_size = 16
  c.seq_len = 128
  c.optimizer.lr = 3e-3
  c.optimizer.warmup_steps = 40
  c.optimizer.decay_fraction = 0.3
  c.checkpoint_every = 100
  c.keep_checkpoints = 2
  c.log_every = 1
  c.sample_prompt = "    def __init__(self"
  c.sample_tokens = 80
  if variant == "smoke":
    c.model.update(hidden_size=32, num_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                   qk_rope_head_dim=8, v_head_dim=8, ffn_size=64, num_ffn_experts=4, zero_experts=2,
                   top_k=2, expert_ffn_size=16, target_ffn_experts=1.0, moe_block_size=8)
    c.total_steps = 12
    c.batch_size = 4
    c.seq_len = 32
    c.optimizer.warmup_steps = 2
    c.checkpoint_every = 4
    c.data.max_files = 40
    c.data.num_threads = 0
    c.data.prefetch = 0
    c.sample_tokens = 8
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of experiments/configs/default.py (known: smoke)")
  return c
