"""Model configurations as `ml_collections.ConfigDict` presets, with validation and HF mapping.

Presets reproduce the released configs (../shared/LONGCAT_SPEC.md section 4). Every architectural
feature is a config switch, never a model-name branch: `zero_experts=0` turns zero-computation
experts off, `ngram_embedding=None` turns n-gram embeddings off, `rope_scaling=None` plain RoPE.

    cfg = longcat_jax.config.get_config("tiny")
    cfg.num_layers = 4
    model = longcat_jax.LongcatForCausalLM(cfg)      # validates
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections

from longcat_jax import presets_v2

ConfigDict = ml_collections.ConfigDict

KERNEL_CHOICES = ("auto", "pallas", "interpret", "xla")
KERNEL_TARGETS = ("cpu", "gpu", "tpu")  # kernels="MODE:TARGET", e.g. "auto:tpu" (AOT for a TPU)
REMAT_CHOICES = ("none", "full", "save_dots", "save_moe")
DTYPES = ("float32", "bfloat16", "float16")


def base_config() -> ConfigDict:
  """Every field the model reads, with LongCat-Flash's values where they are fixed by design."""
  c = ConfigDict()
  c.name = "base"
  # Trunk.
  c.vocab_size = 131072
  c.hidden_size = 6144
  c.num_layers = 28                 # ScMoE layers; each has 2 attention blocks.
  c.rms_norm_eps = 1e-5
  c.latent_norm_eps = 1e-6          # q_a / kv_a latent norms in the reference code.
  c.initializer_range = 0.02
  c.tie_word_embeddings = False
  c.bos_token_id = 1
  c.eos_token_id = 2
  c.pad_token_id = 0
  c.max_position_embeddings = 131072
  # MLA (spec section 2).
  c.num_heads = 64
  c.q_lora_rank = 1536
  c.kv_lora_rank = 512
  c.qk_nope_head_dim = 128
  c.qk_rope_head_dim = 64
  c.v_head_dim = 128
  c.mla_scale_q_lora = True
  c.mla_scale_kv_lora = True
  c.rope_theta = 1e7
  c.rope_scaling = None             # e.g. dict(type="yarn", factor=10, original_max_position_embeddings=32768, ...)
  # Dense MLPs.
  c.ffn_size = 12288
  # MoE (spec section 3).
  c.num_ffn_experts = 512
  c.zero_experts = 256
  c.top_k = 12
  c.expert_ffn_size = 2048
  c.routed_scaling_factor = 6.0
  c.target_ffn_experts = 8.0        # K_e: compute-budget controller target (FFN experts per token).
  c.moe_block_size = 64             # row block of the XLA grouped matmul (dropless; padding only).
  # Optional features (issue-specific modules read these; None/0 = off).
  c.ngram_embedding = None
  c.sparse_attention = None
  c.mtp_num_heads = 0
  c.mtp_shared_module = False       # True: one MTP layer applied mtp_num_heads times (LongCat-2.0, model/mtp.py)
  # Numerics and execution.
  c.dtype = "float32"               # activation / compute dtype.
  c.param_dtype = "float32"         # master weights.
  c.kernels = "auto"                # auto | pallas | interpret | xla (pallas_kernels registry);
                                    # "MODE:tpu" etc. for another target ("interpret:tpu").
  c.remat = "none"                  # none | full | save_dots | save_moe.
  c.scan_unroll = 1                 # layers per iteration of the scan over layers; >= num_layers
                                    # unrolls them (no while loop: on XLA:CPU `small`'s training step
                                    # 9.6 -> 8.5 s, and 2-layer programs compile faster; deep models
                                    # keep 1, compile time grows with it). Parameters stay stacked.
  c.attention_block_q = 512         # flash-attention block sizes (Pallas / chunked paths).
  c.attention_block_k = 512
  # How the checkpoint this config came from was stored (set by `from_hf_config` and the loader;
  # None = derived from the features): architecture, model_type, quantization_config, rope type
  # name, per-tensor stored dtypes. `save_pretrained` writes the same layout back.
  c.hf_format = None
  return c


def tiny() -> ConfigDict:
  """Unit-test size: compiles in seconds on one CPU core."""
  c = base_config()
  c.name = "tiny"
  c.update(vocab_size=320, hidden_size=64, num_layers=2, num_heads=4, q_lora_rank=32, kv_lora_rank=16,
           qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, ffn_size=128, num_ffn_experts=8,
           zero_experts=4, top_k=3, expert_ffn_size=32, target_ffn_experts=2.0, moe_block_size=16,
           max_position_embeddings=4096, attention_block_q=64, attention_block_k=64, scan_unroll=2)
  return c


def small() -> ConfigDict:
  """~100M total parameters, trains on a laptop CPU (hidden 512, 4 ScMoE layers, 32 + 16 experts)."""
  c = base_config()
  c.name = "small"
  c.update(vocab_size=32768, hidden_size=512, num_layers=4, num_heads=8, q_lora_rank=256,
           kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, ffn_size=1024,
           num_ffn_experts=32, zero_experts=16, top_k=6, expert_ffn_size=256,
           target_ffn_experts=4.0, max_position_embeddings=8192, scan_unroll=4)
  return c


def flash() -> ConfigDict:
  """LongCat-Flash (560B total, 18.6B-31.3B activated), the released config.json [cfg]."""
  c = base_config()
  c.name = "flash"
  return c


PRESETS = {"tiny": tiny, "small": small, "flash": flash,
           "flash_lite": lambda: presets_v2.flash_lite(base_config()),
           "longcat2": lambda: presets_v2.longcat2(base_config())}


def register_preset(name: str, fn) -> None:
  """Adds a preset (used by the LongCat-2.0 / Lite modules)."""
  PRESETS[name] = fn


def get_config(name: str = "tiny", **overrides: Any) -> ConfigDict:
  """Returns a fresh preset by name, with field overrides applied."""
  if name not in PRESETS:
    raise ValueError(f"unknown config preset {name!r}; known presets: {sorted(PRESETS)}")
  c = PRESETS[name]()
  for k, v in overrides.items():
    if k not in c:
      raise ValueError(f"config preset {name!r} has no field {k!r}")
    c[k] = v
  return c


# ----------------------------------------------------------------------------------------------
# Derived quantities and validation.


def qk_head_dim(c: ConfigDict) -> int:
  return c.qk_nope_head_dim + c.qk_rope_head_dim


def num_experts_total(c: ConfigDict) -> int:
  """Router classes: FFN experts first, then the zero (identity) experts."""
  return c.num_ffn_experts + c.zero_experts


def validate(c: ConfigDict) -> None:
  """Raises ValueError naming the field and the constraint it breaks."""

  def need(cond: bool, msg: str):
    if not cond:
      raise ValueError(f"invalid config {c.get('name', '?')!r}: {msg}")

  for f in ("vocab_size", "hidden_size", "num_layers", "num_heads", "q_lora_rank", "kv_lora_rank",
            "qk_nope_head_dim", "v_head_dim", "ffn_size", "top_k", "moe_block_size", "scan_unroll"):
    need(isinstance(c[f], int) and c[f] > 0, f"{f}={c[f]!r} must be a positive integer")
  need(c.qk_rope_head_dim > 0 and c.qk_rope_head_dim % 2 == 0,
       f"qk_rope_head_dim={c.qk_rope_head_dim} must be positive and even (RoPE rotates pairs)")
  need(c.num_ffn_experts >= 0 and c.zero_experts >= 0,
       f"num_ffn_experts={c.num_ffn_experts} and zero_experts={c.zero_experts} must be >= 0")
  e = num_experts_total(c)
  need(e > 0, "num_ffn_experts + zero_experts must be > 0")
  need(c.top_k <= e, f"top_k={c.top_k} exceeds the {e} routable experts "
       f"(num_ffn_experts={c.num_ffn_experts} + zero_experts={c.zero_experts})")
  need(c.num_ffn_experts == 0 or c.expert_ffn_size > 0,
       f"expert_ffn_size={c.expert_ffn_size} must be > 0 when num_ffn_experts > 0")
  need(0.0 <= c.target_ffn_experts <= c.top_k,
       f"target_ffn_experts={c.target_ffn_experts} must lie in [0, top_k={c.top_k}]")
  need(c.rms_norm_eps > 0 and c.latent_norm_eps > 0, "rms_norm_eps and latent_norm_eps must be > 0")
  need(c.dtype in DTYPES, f"dtype={c.dtype!r} must be one of {DTYPES}")
  need(c.param_dtype in DTYPES, f"param_dtype={c.param_dtype!r} must be one of {DTYPES}")
  mode, _, target = str(c.kernels).partition(":")
  need(mode in KERNEL_CHOICES and (not target or (target in KERNEL_TARGETS and mode != "xla")),
       f"kernels={c.kernels!r} must be one of {KERNEL_CHOICES}, or MODE:TARGET with TARGET in "
       f"{KERNEL_TARGETS} (e.g. 'interpret:tpu')")
  need(c.remat in REMAT_CHOICES, f"remat={c.remat!r} must be one of {REMAT_CHOICES}")
  need(c.routed_scaling_factor > 0, f"routed_scaling_factor={c.routed_scaling_factor} must be > 0")
  need(c.mtp_num_heads >= 0, f"mtp_num_heads={c.mtp_num_heads} must be >= 0")
  if c.rope_scaling is not None:
    t = c.rope_scaling.get("type", c.rope_scaling.get("rope_type"))
    need(t in ("yarn",), f"rope_scaling type {t!r} is not supported (only 'yarn')")


# ----------------------------------------------------------------------------------------------
# Hugging Face config.json mapping (transformers.LongcatFlashConfig field names).

_HF_FIELDS = {  # ours -> HF
    "vocab_size": "vocab_size", "hidden_size": "hidden_size", "num_layers": "num_layers",
    "num_heads": "num_attention_heads", "q_lora_rank": "q_lora_rank", "kv_lora_rank": "kv_lora_rank",
    "qk_nope_head_dim": "qk_nope_head_dim", "qk_rope_head_dim": "qk_rope_head_dim",
    "v_head_dim": "v_head_dim", "ffn_size": "ffn_hidden_size", "num_ffn_experts": "n_routed_experts",
    "zero_experts": "zero_expert_num", "top_k": "moe_topk", "expert_ffn_size": "expert_ffn_hidden_size",
    "routed_scaling_factor": "routed_scaling_factor", "rms_norm_eps": "rms_norm_eps",
    "max_position_embeddings": "max_position_embeddings", "initializer_range": "initializer_range",
    "tie_word_embeddings": "tie_word_embeddings", "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id", "pad_token_id": "pad_token_id",
}
_HF_ALIASES = {"num_local_experts": "n_routed_experts", "num_experts_per_tok": "moe_topk",
               "intermediate_size": "ffn_hidden_size", "moe_intermediate_size": "expert_ffn_hidden_size"}


ARCHITECTURES = ("LongcatFlashForCausalLM", "LongcatFlashNgramForCausalLM", "LongcatCausalLM")
ROPE_YARN_NAMES = ("yarn", "deepseek_yarn")   # LongCat-Flash-Thinking-2601 / 2.0: same math as YaRN


def from_hf_config(hf: dict, **overrides: Any) -> ConfigDict:
  """Builds a ConfigDict from a parsed HF `config.json`, as the releases ship it (spec section 4b):
  `architectures` tells Flash / Flash-Lite (n-gram) / LongCat-2.0 apart (`model_type` is often
  absent), `rope_scaling.rope_type` may be `deepseek_yarn`, `quantization_config` is kept for the
  writer. Raises ValueError naming the field."""
  hf = dict(hf)
  for alias, name in _HF_ALIASES.items():
    if alias in hf and name not in hf:
      hf[name] = hf[alias]
  archs = hf.get("architectures") or []
  arch = archs[0] if archs else None
  if arch is not None and arch not in ARCHITECTURES:
    raise ValueError(f"config.json: architectures {archs!r} names no LongCat model this package knows "
                     f"(known: {list(ARCHITECTURES)})")
  c = base_config()
  c.name = hf.get("_name_or_path") or hf.get("model_type") or arch or "hf"
  for ours, theirs in _HF_FIELDS.items():
    if theirs in hf and hf[theirs] is not None:
      v = hf[theirs]
      if ours == "eos_token_id" and isinstance(v, (list, tuple)):
        v = v[0]
      c[ours] = type(c[ours])(v) if c[ours] is not None and not isinstance(c[ours], bool) else v
  if hf.get("num_layers") is None and hf.get("num_hidden_layers") is not None:
    c.num_layers = hf["num_hidden_layers"] // 2
  # zero_expert_num may be null in some releases
  c.zero_experts = int(hf.get("zero_expert_num") or 0)
  rope = hf.get("rope_parameters") or {}
  theta = rope.get("rope_theta", hf.get("rope_theta"))
  if theta is not None:
    c.rope_theta = float(theta)
  scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
  rope_name = None
  if scaling:
    s = dict(scaling)
    rope_name = s.pop("rope_type", s.get("type"))
    s["type"] = "yarn" if rope_name in ROPE_YARN_NAMES else rope_name
    s.pop("rope_theta", None)
    c.rope_scaling = s
  head_dim = hf.get("head_dim")
  if head_dim is not None and head_dim != c.qk_rope_head_dim:
    raise ValueError(f"config.json: head_dim={head_dim} differs from qk_rope_head_dim={c.qk_rope_head_dim}; "
                     "the reference uses head_dim as the RoPE dimension, so they must agree")
  c.mla_scale_q_lora = bool(hf.get("mla_scale_q_lora", True))
  c.mla_scale_kv_lora = bool(hf.get("mla_scale_kv_lora", True))
  if hf.get("ngram_vocab_size_ratio"):
    c.ngram_embedding = dict(vocab_size_ratio=hf["ngram_vocab_size_ratio"],
                             neighbor_num=hf.get("emb_neighbor_num", 4), split_num=hf.get("emb_split_num", 4))
  c.mtp_num_heads = int(hf.get("mtp_num_layers") or hf.get("num_nextn_predict_layers", 0) or 0)
  _from_hf_longcat2(c, hf)
  c.target_ffn_experts = min(c.target_ffn_experts, float(c.top_k))
  c.moe_block_size = min(c.moe_block_size, 64)
  quant = hf.get("quantization_config")
  if quant is not None:
    _check_quantization(quant)
  c.hf_format = dict(architecture=arch, model_type=hf.get("model_type"), rope_type=rope_name,
                     quantization=dict(quant) if quant else None,
                     router_dtype=hf.get("rounter_params_dtype", hf.get("router_dtype")))
  for k, v in overrides.items():
    c[k] = v
  return c


def _check_quantization(q: dict) -> None:
  """Only block-wise e4m3 FP8 (the LongCat FP8 releases) is read."""
  method, fmt = q.get("quant_method"), q.get("fmt", "e4m3")
  if method != "fp8" or fmt != "e4m3":
    raise ValueError(f"config.json: quantization_config quant_method={method!r} fmt={fmt!r} is not supported "
                     "(only quant_method 'fp8', fmt 'e4m3', block-wise)")
  block = q.get("weight_block_size")
  if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
    raise ValueError(f"config.json: quantization_config weight_block_size={block!r} must be two positive integers")


LONGCAT2_ARCHITECTURE = "LongcatCausalLM"  # the released LongCat-2.0 config.json (no model_type)


def is_longcat2_config(hf: dict) -> bool:
  """A LongCat-2.0 config.json: `architectures` LongcatCausalLM, or SGLang's `longcat_flash_pro`."""
  return LONGCAT2_ARCHITECTURE in (hf.get("architectures") or []) or hf.get("model_type") == "longcat_flash_pro"


def _from_hf_longcat2(c: ConfigDict, hf: dict) -> None:
  """LongCat-2.0 fields (the released config.json; SGLang's LongcatFlashProConfig and mlx-lm
  longcat2.py `ModelArgs` defaults): `oe_*` n-gram embeddings, the LongCat Sparse Attention
  indexer (`index_*`; on unless `use_longcat_dsa` is false: the release has no such field), the
  one-module MTP (`mtp_replicate_modules`), and the released code's norms (docs/LONGCAT2.md)."""
  v2 = is_longcat2_config(hf)
  if hf.get("oe_vocab_size_ratio") and hf.get("use_oe_embedding", True) is not False and c.ngram_embedding is None:
    c.ngram_embedding = dict(vocab_size_ratio=hf["oe_vocab_size_ratio"], neighbor_num=hf.get("oe_neighbor_num", 5),
                             split_num=hf.get("oe_split_num", 4), eos_reset=True)  # 2.0 code stops at EOS
  if v2:
    c.latent_norm_eps = c.rms_norm_eps  # mlx-lm longcat2.py: q_a / kv_a layernorms use rms_norm_eps
    c.mtp_shared_module = bool(hf.get("mtp_replicate_modules", True))
    if c.mtp_num_heads and hf.get("mtp_disable_over_tokenizer", True) is not True:
      raise ValueError("config.json: mtp_disable_over_tokenizer=false (an MTP module with n-gram embeddings) "
                       "is not supported")
  # LongCat-2.0's config.json has the index_* fields but no `use_longcat_dsa` switch.
  dsa = hf.get("use_longcat_dsa")
  if dsa is None:
    dsa = hf.get("index_topk") is not None or hf.get("index_n_heads") is not None
  if dsa:
    if hf.get("index_k_norm_type", "rms") != "rms":
      raise ValueError(f"config.json: index_k_norm_type={hf['index_k_norm_type']!r} is not supported (only 'rms')")
    if hf.get("cli_factor", 2) != 2:
      raise ValueError(f"config.json: cli_factor={hf['cli_factor']} is not supported: the indexer is shared by "
                       "the 2 attention blocks of a ScMoE layer (cli_factor=2)")
    if c.mtp_num_heads and hf.get("dsa_mtp_cli", True) is not True:
      raise ValueError("config.json: dsa_mtp_cli=false (a key selection per MTP step) is not supported")
    if hf.get("rope_interleave", hf.get("indexer_rope_interleave", True)) is not True:
      raise ValueError("config.json: a rotate-half indexer RoPE (rope_interleave=false) is not supported")
    c.sparse_attention = dict(index_heads=int(hf.get("index_n_heads", 32)), index_dim=int(hf.get("index_head_dim", 128)),
                              top_k=int(hf.get("index_topk", 2048)), init_tokens=int(hf.get("index_init_tokens") or 0),
                              local_tokens=int(hf.get("index_local_tokens") or 0))
    pattern = "".join(hf.get("index_topk_pattern") or [])
    if pattern and pattern != "CS" * c.num_layers:  # kept only when not the default (checked by the model)
      c.sparse_attention["topk_pattern"] = pattern


def hf_architecture(c: ConfigDict) -> str:
  """The `architectures` name a config is saved as: the one it was loaded from, else by features."""
  fmt = c.get("hf_format")
  if fmt is not None and fmt.get("architecture"):
    return fmt["architecture"]
  if c.sparse_attention is not None or c.get("mtp_shared_module"):
    return LONGCAT2_ARCHITECTURE  # LongCat-2.0's features: its released layout
  return "LongcatFlashNgramForCausalLM" if c.ngram_embedding is not None else "LongcatFlashForCausalLM"


def to_hf_config(c: ConfigDict) -> dict:
  """The HF `config.json` dict, in the style of the release the config came from (`hf_format`);
  a fresh config gives the dict `transformers.LongcatFlashForCausalLM` loads."""
  fmt = c.get("hf_format") or {}
  arch = hf_architecture(c)
  hf = {"architectures": [arch], "model_type": "longcat_flash",
        "hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0,
        "head_dim": c.qk_rope_head_dim, "qk_head_dim": qk_head_dim(c),
        "num_key_value_heads": c.num_heads, "use_cache": True,
        "mla_scale_q_lora": bool(c.mla_scale_q_lora), "mla_scale_kv_lora": bool(c.mla_scale_kv_lora)}
  for ours, theirs in _HF_FIELDS.items():
    hf[theirs] = c[ours]
  rope = {"rope_theta": float(c.rope_theta), "rope_type": "default"}
  rope_name = fmt.get("rope_type")
  if c.rope_scaling is not None:
    s = dict(c.rope_scaling)
    rope.update({k: v for k, v in s.items() if k != "type"})
    rope["rope_type"] = rope_name if rope_name in ROPE_YARN_NAMES else s.get("type", "yarn")
  if rope_name == "deepseek_yarn":  # the Thinking-2601 / 2.0 style: rope_theta + rope_scaling
    hf["rope_theta"] = rope.pop("rope_theta")
    hf["rope_scaling"] = rope
  else:
    hf["rope_parameters"] = rope
  if c.mtp_num_heads:
    hf["num_nextn_predict_layers"] = int(c.mtp_num_heads)
  if c.ngram_embedding is not None:
    g = c.ngram_embedding
    if arch == "LongcatCausalLM":
      hf.update(oe_vocab_size_ratio=g["vocab_size_ratio"], oe_neighbor_num=g["neighbor_num"],
                oe_split_num=g["split_num"])
    else:
      hf["model_type"] = "longcat_flash_ngram"
      hf.update(ngram_vocab_size_ratio=g["vocab_size_ratio"], emb_neighbor_num=g["neighbor_num"],
                emb_split_num=g["split_num"])
  if c.sparse_attention is not None:
    s = c.sparse_attention
    hf.update(index_n_heads=s["index_heads"], index_head_dim=s["index_dim"],
              index_topk=s["top_k"], index_init_tokens=s.get("init_tokens", 0),
              index_local_tokens=s.get("local_tokens", 0), index_k_norm_type="rms", cli_factor=2)
    if arch != "LongcatCausalLM":
      hf["use_longcat_dsa"] = True
  if arch == "LongcatCausalLM" and c.mtp_num_heads:
    hf["mtp_num_layers"] = int(c.mtp_num_heads)
  if arch == LONGCAT2_ARCHITECTURE:
    _to_hf_longcat2(c, hf)
  if fmt.get("architecture") and fmt.get("model_type") is None:
    hf.pop("model_type", None)  # as released (Thinking-2601, 2.0)
  if fmt.get("router_dtype") is not None:
    hf["rounter_params_dtype"] = fmt["router_dtype"]
  return hf


def _to_hf_longcat2(c: ConfigDict, hf: dict) -> None:
  """The released LongCat-2.0 config.json layout: `LongcatCausalLM`, no model_type, no
  use_longcat_dsa, `oe_*` n-gram fields, `index_*` fields, `mtp_num_layers`."""
  hf.pop("model_type", None)
  hf["architectures"] = [LONGCAT2_ARCHITECTURE]
  hf["rms_norm_eps"] = c.rms_norm_eps
  if c.latent_norm_eps != c.rms_norm_eps:
    raise ValueError(f"config {c.name!r}: latent_norm_eps={c.latent_norm_eps} differs from rms_norm_eps="
                     f"{c.rms_norm_eps}, which the LongCat-2.0 config.json cannot express")
  if c.ngram_embedding is not None:
    n = c.ngram_embedding
    if not n.get("eos_reset", False):
      raise ValueError(f"config {c.name!r}: the LongCat-2.0 layout's n-grams stop at EOS (eos_reset=True)")
    for k in ("ngram_vocab_size_ratio", "emb_neighbor_num", "emb_split_num"):
      hf.pop(k, None)
    hf.update(oe_vocab_size_ratio=n["vocab_size_ratio"], oe_neighbor_num=n["neighbor_num"], oe_split_num=n["split_num"])
  if c.sparse_attention is not None:
    s = c.sparse_attention
    hf.update(index_n_heads=s["index_heads"], index_head_dim=s["index_dim"], index_topk=s["top_k"],
              index_init_tokens=s.get("init_tokens", 0), index_local_tokens=s.get("local_tokens", 0),
              index_k_norm_type="rms", cli_factor=2, index_topk_pattern=list("CS" * c.num_layers))
  hf.pop("num_nextn_predict_layers", None)
  if c.mtp_num_heads:
    if not c.mtp_shared_module:
      raise ValueError(f"config {c.name!r}: the LongCat-2.0 layout has one MTP module (mtp_shared_module=True)")
    hf.update(mtp_num_layers=int(c.mtp_num_heads), mtp_replicate_modules=True, mtp_disable_over_tokenizer=True,
              dsa_mtp_cli=True)


def dtype_of(name: str):
  import jax.numpy as jnp
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]


def softmax_scale(c: ConfigDict) -> float:
  """qk_head_dim**-0.5, times YaRN's mscale**2 when YaRN is on (spec section 2)."""
  scale = qk_head_dim(c) ** -0.5
  s = c.rope_scaling
  if s is not None and s.get("mscale_all_dim"):
    factor = float(s["factor"])
    m = 0.1 * float(s["mscale_all_dim"]) * math.log(factor) + 1.0 if factor > 1 else 1.0
    scale *= m * m
  return scale
