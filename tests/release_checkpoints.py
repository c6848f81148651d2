"""Small checkpoints shaped like the released LongCat ones (spec section 4b), written with
`safetensors.torch` (not with longcat_jax's writer): config.json field names and types as released,
tensor names, dtypes (BF16 weights, float32 router, float8_e4m3fn + float32 `weight_scale_inv`
for FP8) and file sharding as in the releases, random values, small sizes.

    path = make_release(tmp_path, "flash_fp8")      # or flash, thinking_2601, lite, longcat2

The key list is written out here from the spec, independently of `longcat_jax.interop.layouts`.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import torch
from safetensors.torch import save_file

SMALL = dict(vocab_size=256, hidden_size=64, num_layers=2, num_attention_heads=4, q_lora_rank=48, kv_lora_rank=32,
             qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, ffn_hidden_size=96, expert_ffn_hidden_size=40,
             n_routed_experts=8, zero_expert_num=4, moe_topk=3)
BLOCK = [16, 16]   # weight_block_size of the small FP8 copies (the releases use [128, 128])


def release_config(kind: str, **over) -> dict:
  """config.json as the release ships it (small sizes)."""
  hf = dict(SMALL, architectures=["LongcatFlashForCausalLM"], attention_method="MLA", zero_expert_type="identity",
            routed_scaling_factor=6.0, rms_norm_eps=1e-5, rope_theta=10000000.0, max_position_embeddings=4096,
            mla_scale_q_lora=True, mla_scale_kv_lora=True, attention_bias=False, router_bias=False,
            bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16", num_nextn_predict_layers=1)
  if kind == "flash":
    hf["model_type"] = "longcat_flash"
  elif kind == "flash_fp8":
    hf["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                 "weight_block_size": BLOCK}
  elif kind == "thinking_2601":  # no model_type, deepseek_yarn
    hf["rope_scaling"] = {"rope_type": "deepseek_yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
                          "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
  elif kind == "lite":
    hf.update(architectures=["LongcatFlashNgramForCausalLM"], model_type="longcat_flash_ngram",
              ngram_vocab_size_ratio=3, emb_neighbor_num=3, emb_split_num=4, rope_theta=5000000.0,
              rope_scaling={"type": "yarn", "factor": 10.0, "original_max_position_embeddings": 512,
                            "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})
  elif kind == "longcat2":  # LongcatCausalLM, no model_type, no use_longcat_dsa; MTP is issue 15's
    hf.update(architectures=["LongcatCausalLM"], routed_scaling_factor=9.0, rope_theta=1000000.0,
              rope_scaling={"rope_type": "deepseek_yarn", "factor": 8.0, "original_max_position_embeddings": 512,
                            "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
              oe_vocab_size_ratio=2.5, oe_neighbor_num=3, oe_split_num=2, index_n_heads=2, index_head_dim=16,
              index_topk=8, index_init_tokens=2, index_local_tokens=4, index_k_norm_type="rms", cli_factor=2,
              dsa_mtp_cli=True, mtp_num_layers=0, mtp_disable_over_tokenizer=True)
    hf.pop("num_nextn_predict_layers")
  else:
    raise ValueError(kind)
  hf.update(over)
  return hf


def release_shapes(hf: dict) -> dict[str, tuple[tuple[int, ...], str]]:
  """{name: (shape, role)} of every tensor of the release; role: weight (quantizable linear), norm,
  router, embed."""
  h, nh = hf["hidden_size"], hf["num_attention_heads"]
  qk, v, ql, kl, rope = (hf["qk_nope_head_dim"] + hf["qk_rope_head_dim"], hf["v_head_dim"], hf["q_lora_rank"],
                         hf["kv_lora_rank"], hf["qk_rope_head_dim"])
  n, z, f, fe, vocab = (hf["n_routed_experts"], hf["zero_expert_num"], hf["ffn_hidden_size"],
                        hf["expert_ffn_hidden_size"], hf["vocab_size"])
  out = {"model.embed_tokens.weight": ((vocab, h), "embed"), "model.norm.weight": ((h,), "norm"),
         "lm_head.weight": ((vocab, h), "embed")}

  def mla(pre):
    return {pre + "q_a_proj.weight": ((ql, h), "weight"), pre + "q_a_layernorm.weight": ((ql,), "norm"),
            pre + "q_b_proj.weight": ((nh * qk, ql), "weight"),
            pre + "kv_a_proj_with_mqa.weight": ((kl + rope, h), "weight"),
            pre + "kv_a_layernorm.weight": ((kl,), "norm"), pre + "kv_b_proj.weight": ((nh * (qk - rope + v), kl), "weight"),
            pre + "o_proj.weight": ((h, nh * v), "weight")}

  def mlp(pre, width):
    return {pre + "gate_proj.weight": ((width, h), "weight"), pre + "up_proj.weight": ((width, h), "weight"),
            pre + "down_proj.weight": ((h, width), "weight")}

  for l in range(hf["num_layers"]):
    p = f"model.layers.{l}."
    for i in (0, 1):
      out[p + f"input_layernorm.{i}.weight"] = ((h,), "norm")
      out[p + f"post_attention_layernorm.{i}.weight"] = ((h,), "norm")
      out.update(mla(p + f"self_attn.{i}."))
      out.update(mlp(p + f"mlps.{i}.", f))
    out[p + "mlp.router.classifier.weight"] = ((n + z, h), "router")
    out[p + "mlp.router.e_score_correction_bias"] = ((n + z,), "router")
    for e in range(n):
      out.update(mlp(p + f"mlp.experts.{e}.", fe))
    if "index_topk" in hf:
      hi, di = hf["index_n_heads"], hf["index_head_dim"]
      q = p + "self_attn.0.indexer."
      out.update({q + "wq_b.weight": ((hi * di, ql), "norm"), q + "wk.weight": ((di, h), "norm"),
                  q + "k_norm.weight": ((di,), "norm"), q + "weights_proj.weight": ((hi, h), "norm")})
  ratio = hf.get("ngram_vocab_size_ratio") or hf.get("oe_vocab_size_ratio")
  if ratio:
    nb = hf.get("emb_neighbor_num") or hf.get("oe_neighbor_num")
    sp = hf.get("emb_split_num") or hf.get("oe_split_num")
    tables, m = sp * (nb - 1), int(ratio * vocab)
    for i in range(tables):
      rows, d = m + 2 * i + 1, h // tables
      if "oe_vocab_size_ratio" in hf:
        out[f"model.oe_embed_tokens{i}.weight"] = ((rows, d), "embed")
        out[f"model.oe_embed_proj{i}.weight"] = ((h, d), "norm")
      else:
        out[f"model.ngram_embeddings.embedders.{i}.weight"] = ((rows, d), "embed")
        out[f"model.ngram_embeddings.post_projs.{i}.weight"] = ((h, d), "norm")
  if hf.get("num_nextn_predict_layers"):
    p = "model.mtp.layers.0."
    out.update({"model.mtp.embed_tokens.weight": ((vocab, h), "embed"), "model.mtp.norm.weight": ((h,), "norm"),
                p + "eh_proj.weight": ((h, 2 * h), "weight"), p + "enorm.m.weight": ((h,), "norm"),
                p + "hnorm.m.weight": ((h,), "norm"), p + "input_layernorm.weight": ((h,), "norm"),
                p + "post_attention_layernorm.weight": ((h,), "norm")})
    out.update(mla(p + "self_attn."))
    out.update(mlp(p + "transformer_layer.mlp.", f))
  return out


def quantize_fp8(w: torch.Tensor, block) -> tuple[torch.Tensor, torch.Tensor]:
  """DeepSeek-style block quantization in torch: s = amax / 448 per block, q = e4m3(w / s)."""
  out, inn = w.shape
  ob, ib = math.ceil(out / block[0]), math.ceil(inn / block[1])
  pad = torch.zeros(ob * block[0], ib * block[1], dtype=torch.float32)
  pad[:out, :inn] = w.float()
  blocks = pad.reshape(ob, block[0], ib, block[1])
  s = blocks.abs().amax(dim=(1, 3)) / 448.0
  q = (blocks / s[:, None, :, None].clamp_min(1e-30)).reshape(pad.shape)[:out, :inn]
  return q.clamp(-448, 448).to(torch.float8_e4m3fn), s.float()


def dequantize_fp8(q: torch.Tensor, s: torch.Tensor, block) -> torch.Tensor:
  full = s.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
  return q.float() * full[:q.shape[0], :q.shape[1]]


def write_checkpoint(path: str, tensors: dict[str, torch.Tensor], hf: dict, files: int = 3) -> None:
  """Sharded safetensors + index (files split in key order, as transformers does) + config.json."""
  os.makedirs(path, exist_ok=True)
  keys = list(tensors)
  per = -(-len(keys) // files)
  weight_map = {}
  for i in range(files):
    chunk = keys[i * per:(i + 1) * per]
    if not chunk:
      continue
    fname = f"model-{i + 1:05d}-of-{files:05d}.safetensors"
    save_file({k: tensors[k].contiguous() for k in chunk}, os.path.join(path, fname), metadata={"format": "pt"})
    weight_map.update({k: fname for k in chunk})
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf, f)


def release_tensors(hf: dict, seed: int = 0, fast: bool = False) -> dict[str, torch.Tensor]:
  """Random tensors of the release's names/shapes/dtypes (FP8 quantized when the config says so).
  `fast`: windows at random offsets of one random pool (big checkpoints, quickly)."""
  g = torch.Generator().manual_seed(seed)
  quant = hf.get("quantization_config")
  pool = (0.02 * torch.randn(1 << 22, generator=g)).to(torch.bfloat16) if fast else None
  out = {}
  for name, (shape, role) in release_shapes(hf).items():
    if fast:
      n = math.prod(shape)
      start = int(torch.randint(0, pool.numel(), (1,), generator=g))
      src = pool if n <= pool.numel() - start else pool.repeat(-(-(n + start) // pool.numel()))
      w = src[start:start + n].reshape(shape).clone()
    else:
      w = torch.randn(shape, generator=g) * (0.02 if role != "norm" or len(shape) > 1 else 1.0)
    if role == "norm" and len(shape) == 1:
      w = 1.0 + 0.1 * torch.randn(shape, generator=g)
    if role == "router":
      out[name] = w.float()
    elif quant and role == "weight":
      q, s = quantize_fp8(w, quant["weight_block_size"])
      out[name], out[name + "_scale_inv"] = q, s
    else:
      out[name] = w.to(torch.bfloat16)
  if "model.mtp.embed_tokens.weight" in out:  # the MTP head shares the main embedding (a stored copy)
    out["model.mtp.embed_tokens.weight"] = out["model.embed_tokens.weight"].clone()
  return out


def make_release(root, kind: str, seed: int = 0, files: int = 3, fast: bool = False, **over) -> str:
  hf = release_config(kind, **over)
  path = os.path.join(str(root), kind)
  write_checkpoint(path, release_tensors(hf, seed, fast), hf, files)
  return path


def read_all(path: str) -> dict[str, tuple]:
  """Every tensor of a checkpoint as (dtype, shape, sha256 of its bytes), read with safetensors.torch
  (for bitwise comparisons)."""
  import hashlib
  from safetensors import safe_open
  out = {}
  for f in sorted(os.listdir(path)):
    if f.endswith(".safetensors"):
      with safe_open(os.path.join(path, f), "pt") as h:
        for k in h.keys():
          t = h.get_tensor(k).contiguous()
          out[k] = (str(t.dtype), tuple(t.shape), hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest())
  return out
