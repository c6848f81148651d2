"""Foundation: parity with transformers.LongcatFlashForCausalLM, checkpoint interop, accounting."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_reference import make_reference, reference_logits
from transformers import LongcatFlashForCausalLM

import longcat_jax as lj
from longcat_jax import config as config_lib

REFERENCES = {
    # name: (hf overrides, bias_scale, save kwargs)
    "tiny_sharded_bias": (dict(), 0.05, dict(max_shard_size="40KB")),
    "no_zero_experts": (dict(zero_expert_num=0, n_routed_experts=6, moe_topk=2), 0.0, dict()),
    "wider_3_layers": (dict(num_layers=3, hidden_size=96, num_attention_heads=6, q_lora_rank=48, kv_lora_rank=24,
                            qk_nope_head_dim=8, qk_rope_head_dim=4, head_dim=4, v_head_dim=12, moe_topk=5,
                            n_routed_experts=10, zero_expert_num=6, routed_scaling_factor=2.5), 0.1, dict()),
}


def _ids(batch, seq, vocab, seed=0):
  return np.random.RandomState(seed).randint(0, vocab, (batch, seq))


@pytest.fixture(scope="module")
def saved_references(tmp_path_factory):
  out = {}
  for name, (overrides, bias, save_kw) in REFERENCES.items():
    ref = make_reference(seed=len(out), bias_scale=bias, **overrides)
    path = str(tmp_path_factory.mktemp(name))
    ref.save_pretrained(path, **save_kw)
    out[name] = (ref, path)
  return out


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_logits_match_reference(saved_references, name):
  ref, path = saved_references[name]
  if name == "tiny_sharded_bias":
    assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) > 1, "expected a sharded save"
  model, variables = lj.load_pretrained(path)
  bias = np.asarray(variables["expert_bias"]["decoder"]["layers"]["moe"]["router"])
  assert (np.abs(bias).max() > 0) == (REFERENCES[name][1] > 0)
  ids = _ids(2, 24, ref.config.vocab_size)
  ours = np.asarray(jax.jit(model.apply)(variables, ids))
  theirs = reference_logits(ref, ids)
  assert ours.shape == theirs.shape == (2, 24, ref.config.vocab_size)
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_bias_changes_routing(saved_references):
  """The expert bias must change which experts are chosen (else the parity test proves nothing)."""
  ref, path = saved_references["wider_3_layers"]
  model, variables = lj.load_pretrained(path)
  ids = _ids(1, 16, ref.config.vocab_size)
  no_bias = jax.tree.map(jnp.zeros_like, variables["expert_bias"])
  a = model.apply(variables, ids)
  b = model.apply({**variables, "expert_bias": no_bias}, ids)
  assert float(jnp.abs(a - b).max()) > 1e-3


def test_roundtrip_bitwise_and_loads_in_transformers(saved_references, tmp_path):
  ref, path = saved_references["tiny_sharded_bias"]
  model, variables = lj.load_pretrained(path)
  out = str(tmp_path / "resaved")
  lj.save_pretrained(out, model, variables, max_shard_bytes=30_000)
  assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
  model2, variables2 = lj.load_pretrained(out)
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(variables2)):
    assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
  assert jax.tree.structure(variables) == jax.tree.structure(variables2)
  # HF -> JAX -> HF files load in transformers, with no missing/unexpected keys, same logits.
  hf2, info = LongcatFlashForCausalLM.from_pretrained(out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  ids = _ids(2, 12, ref.config.vocab_size, seed=3)
  np.testing.assert_allclose(reference_logits(hf2.float().eval(), ids), reference_logits(ref, ids), atol=1e-6)


def test_random_init_roundtrip_through_transformers(tmp_path):
  """A JAX-initialised model saved in HF format gives the same logits in transformers."""
  cfg = lj.get_config("tiny", zero_experts=3, num_layers=2)
  model = lj.LongcatForCausalLM(cfg)
  variables = lj.init_variables(model, jax.random.key(1))
  variables["expert_bias"] = jax.tree.map(lambda b: 0.05 * jax.random.normal(jax.random.key(2), b.shape),
                                          variables["expert_bias"])
  lj.save_pretrained(str(tmp_path), model, variables)
  hf = LongcatFlashForCausalLM.from_pretrained(str(tmp_path)).float().eval()
  ids = _ids(2, 10, cfg.vocab_size)
  np.testing.assert_allclose(np.asarray(model.apply(variables, ids)), reference_logits(hf, ids), atol=1e-4)


def test_bf16_load_close_to_float32(saved_references):
  ref, path = saved_references["tiny_sharded_bias"]
  model, variables = lj.load_pretrained(path, dtype=jnp.bfloat16)
  assert variables["params"]["embed_tokens"].dtype == jnp.bfloat16
  assert variables["params"]["decoder"]["layers"]["moe"]["router"].dtype == jnp.float32
  ids = _ids(2, 16, ref.config.vocab_size)
  ours = np.asarray(model.apply(variables, ids).astype(jnp.float32))
  theirs = reference_logits(ref, ids)
  # bf16 has ~3 significant digits; compare relative to the logits' scale.
  assert np.abs(ours - theirs).max() <= 3e-2 * np.abs(theirs).max() + 1e-2


# ---------------------------------------------------------------------------------------------
# Checkpoint errors name the file and the tensor.


def _copy_ckpt(src, dst):
  import shutil
  shutil.copytree(src, dst)
  return str(dst)


def test_error_unknown_key(saved_references, tmp_path):
  _, path = saved_references["no_zero_experts"]
  path = _copy_ckpt(path, tmp_path / "c")
  from safetensors.numpy import load_file, save_file
  f = os.path.join(path, "model.safetensors")
  tensors = load_file(f)
  tensors["model.layers.0.mystery.weight"] = np.zeros(3, np.float32)
  save_file(tensors, f)
  with pytest.raises(lj.CheckpointError, match=r"model\.layers\.0\.mystery\.weight.*model\.safetensors"):
    lj.load_pretrained(path)


def test_mtp_keys_are_kept_aside(saved_references, tmp_path):
  _, path = saved_references["no_zero_experts"]
  path = _copy_ckpt(path, tmp_path / "c")
  from safetensors.numpy import load_file, save_file
  f = os.path.join(path, "model.safetensors")
  tensors = load_file(f)
  tensors["model.mtp.norm.weight"] = np.ones(64, np.float32)
  save_file(tensors, f)
  lj.load_pretrained(path)  # accepted
  from longcat_jax.interop import read_mtp_tensors
  assert list(read_mtp_tensors(path)) == ["model.mtp.norm.weight"]


def test_error_missing_and_wrong_shape(saved_references, tmp_path):
  _, path = saved_references["no_zero_experts"]
  from safetensors.numpy import load_file, save_file
  p1 = _copy_ckpt(path, tmp_path / "missing")
  f = os.path.join(p1, "model.safetensors")
  t = load_file(f)
  del t["model.layers.1.self_attn.0.kv_b_proj.weight"]
  save_file(t, f)
  with pytest.raises(lj.CheckpointError, match=r"missing.*model\.layers\.1\.self_attn\.0\.kv_b_proj\.weight"):
    lj.load_pretrained(p1)
  p2 = _copy_ckpt(path, tmp_path / "shape")
  f = os.path.join(p2, "model.safetensors")
  t = load_file(f)
  t["model.layers.0.mlps.1.up_proj.weight"] = np.zeros((7, 64), np.float32)
  save_file(t, f)
  with pytest.raises(lj.CheckpointError, match=r"model\.safetensors.*model\.layers\.0\.mlps\.1\.up_proj\.weight.*\[7, 64\]"):
    lj.load_pretrained(p2)


def test_error_truncated_file(saved_references, tmp_path):
  _, path = saved_references["tiny_sharded_bias"]
  p = _copy_ckpt(path, tmp_path / "trunc")
  with open(os.path.join(p, "model.safetensors.index.json")) as fh:
    victim = sorted(set(json.load(fh)["weight_map"].values()))[2]
  full = os.path.join(p, victim)
  data = open(full, "rb").read()
  open(full, "wb").write(data[: len(data) // 2])
  with pytest.raises(lj.CheckpointError, match=victim):
    lj.load_pretrained(p)


def test_failed_save_keeps_previous_checkpoint(saved_references, tmp_path, monkeypatch):
  _, path = saved_references["no_zero_experts"]
  model, variables = lj.load_pretrained(path)
  out = str(tmp_path / "ckpt")
  lj.save_pretrained(out, model, variables)
  before = sorted(os.listdir(out))
  import longcat_jax.interop.hf as hf_mod

  def boom(*a, **k):
    raise OSError("disk full")

  monkeypatch.setattr(hf_mod, "pwrite_all", boom)
  with pytest.raises(OSError):
    lj.save_pretrained(out, model, variables)
  assert sorted(os.listdir(out)) == before
  lj.load_pretrained(out)  # still loads


# ---------------------------------------------------------------------------------------------
# Config, accounting, routing statistics, scan.


def test_count_params_flash():
  pc = lj.count_params(lj.get_config("flash"))
  assert abs(pc.total - 560e9) / 560e9 < 0.01, pc.summary()
  assert abs(pc.activated_min - 18.6e9) / 18.6e9 < 0.02, pc.summary()
  assert abs(pc.activated_max - 31.3e9) / 31.3e9 < 0.02, pc.summary()
  assert pc.activated_min < pc.activated_target < pc.activated_max


def test_small_is_about_100m():
  pc = lj.count_params(lj.get_config("small"))
  assert 80e6 < pc.total < 130e6, pc.summary()


@pytest.mark.parametrize("field,value,msg", [
    ("top_k", 20, "top_k=20 exceeds the 12 routable experts"),
    ("qk_rope_head_dim", 7, "qk_rope_head_dim=7 must be positive and even"),
    ("kernels", "cuda", "kernels='cuda' must be one of"),
    ("target_ffn_experts", 5.0, r"target_ffn_experts=5.0 must lie in \[0, top_k=3\]"),
])
def test_validation_names_the_field(field, value, msg):
  cfg = lj.get_config("tiny", **{field: value})
  with pytest.raises(ValueError, match=msg):
    lj.LongcatForCausalLM(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))


def test_hf_config_mapping_roundtrip():
  c = lj.get_config("flash")
  back = config_lib.from_hf_config(config_lib.to_hf_config(c))
  for k in ("vocab_size", "hidden_size", "num_layers", "num_heads", "q_lora_rank", "kv_lora_rank",
            "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "ffn_size", "num_ffn_experts",
            "zero_experts", "top_k", "expert_ffn_size", "routed_scaling_factor", "rope_theta", "rms_norm_eps"):
    assert back[k] == c[k], k


def test_routing_statistics():
  cfg = lj.get_config("tiny")
  model = lj.LongcatForCausalLM(cfg)
  variables = lj.init_variables(model, jax.random.key(0))
  ids = _ids(2, 16, cfg.vocab_size)
  _, state = model.apply(variables, ids, mutable=["expert_load", "intermediates"])
  load = state["expert_load"]["decoder"]["layers"]["moe"]["router"]
  assert load.shape == (cfg.num_layers, cfg.num_ffn_experts + cfg.zero_experts)
  np.testing.assert_array_equal(np.asarray(load.sum(-1)), 2 * 16 * cfg.top_k)
  per_tok = state["intermediates"]["decoder"]["layers"]["moe"]["ffn_experts_per_token"][0]
  assert per_tok.shape == (cfg.num_layers, 2, 16)
  np.testing.assert_array_equal(np.asarray(per_tok.sum((1, 2))), np.asarray(load[:, :cfg.num_ffn_experts].sum(-1)))
  assert jax.tree.structure(state["expert_load"]) == jax.tree.structure(variables["expert_bias"])


def test_zero_experts_are_identity():
  """With only zero experts, the MoE output is routed_scaling_factor * sum(top-k probs) * x."""
  from longcat_jax.model.moe import MoE
  cfg = lj.get_config("tiny", num_ffn_experts=0, zero_experts=4, top_k=2, target_ffn_experts=0.0)
  moe = MoE(cfg)
  x = jax.random.normal(jax.random.key(0), (1, 5, cfg.hidden_size))
  v = moe.init(jax.random.key(1), x)
  y = moe.apply(v, x)
  probs = jax.nn.softmax(x.reshape(5, -1) @ v["params"]["router"].unbox(), -1)
  w = jax.lax.top_k(probs, 2)[0].sum(-1) * cfg.routed_scaling_factor
  np.testing.assert_allclose(np.asarray(y[0]), np.asarray(w[:, None] * x[0]), rtol=1e-5, atol=1e-6)


def _lowered_text(num_layers):
  cfg = lj.get_config("tiny", num_layers=num_layers, scan_unroll=1)
  model = lj.LongcatForCausalLM(cfg)
  variables = jax.eval_shape(lambda: lj.init_variables(model, jax.random.key(0)))
  ids = jax.ShapeDtypeStruct((2, 32), jnp.int32)
  return jax.jit(model.apply).lower(variables, ids).as_text()


def test_program_size_flat_in_depth():
  """The layers run under one scan: the program for 8 layers is the 2-layer program (one layer
  body in a while loop), not 4x its size (deterministic, unlike a compile-time measurement)."""
  p2, p8 = _lowered_text(2), _lowered_text(8)
  assert "stablehlo.while" in p8
  assert len(p8) < 1.05 * len(p2), f"program for 8 layers {len(p8)} chars vs 2 layers {len(p2)}: the scan is not working"


def test_unrolled_layers_compute_what_the_scan_computes():
  """`scan_unroll` changes how the layers run, not what they compute: same (stacked) parameters,
  same logits as one layer per loop iteration; the unrolled program holds a body per layer."""
  cfg = lj.get_config("tiny", num_layers=3, scan_unroll=1)
  ids = jnp.asarray(np.random.RandomState(0).randint(3, cfg.vocab_size, (2, 16)))
  variables = lj.init_variables(lj.LongcatForCausalLM(cfg), jax.random.key(0))
  scan, unrolled = [jax.jit(lj.LongcatForCausalLM(lj.get_config("tiny", num_layers=3, scan_unroll=u)).apply)
                    for u in (1, 3)]
  assert len(scan.lower(variables, ids).as_text()) < len(unrolled.lower(variables, ids).as_text())
  np.testing.assert_allclose(scan(variables, ids), unrolled(variables, ids), rtol=1e-5, atol=1e-5)
