"""Builds random-weight `transformers.LongcatFlashForCausalLM` reference models for parity tests."""

from __future__ import annotations

import numpy as np
import torch
from transformers import LongcatFlashConfig, LongcatFlashForCausalLM

TINY_HF = dict(vocab_size=128, hidden_size=64, num_layers=2, num_attention_heads=4, ffn_hidden_size=96,
               q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, head_dim=8,
               v_head_dim=16, moe_topk=3, n_routed_experts=8, zero_expert_num=4, expert_ffn_hidden_size=32,
               rope_parameters={"rope_theta": 10000.0, "rope_type": "default"})


def make_reference(seed: int = 0, bias_scale: float = 0.0, **overrides) -> LongcatFlashForCausalLM:
  """A float32 reference model; `bias_scale` > 0 puts a random nonzero expert bias in."""
  torch.manual_seed(seed)
  kw = dict(TINY_HF)
  kw.update(overrides)
  model = LongcatFlashForCausalLM(LongcatFlashConfig(**kw)).float().eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      # Norm weights at exactly 1 would hide scale bugs: perturb them.
      if name.endswith("layernorm.weight") or ".layernorm." in name or name.endswith("norm.weight"):
        p.add_(0.1 * torch.randn_like(p))
    if bias_scale:
      g = torch.Generator().manual_seed(seed + 1)
      for layer in model.model.layers:
        b = layer.mlp.router.e_score_correction_bias
        b.copy_(bias_scale * torch.randn(b.shape, generator=g))
  return model


def reference_logits(model, input_ids: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.as_tensor(input_ids, dtype=torch.long)).logits.float().numpy()
