"""Every released checkpoint layout (spec section 4b) loads with no missing or unknown tensor from
a release-shaped directory, lands where the model reads it, and saves back bitwise; bad input is
one CheckpointError naming the file and the tensor."""

import json
import os
import shutil
import struct

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from release_checkpoints import BLOCK, dequantize_fp8, make_release, read_all, release_config

import longcat_jax as lj
from longcat_jax import config as config_lib
from longcat_jax.interop import CheckpointError

KINDS = ("flash", "flash_fp8", "thinking_2601", "lite", "longcat2")


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
  root = tmp_path_factory.mktemp("releases")
  return {k: make_release(root, k, seed=i) for i, k in enumerate(KINDS)}


def _torch(path, key):
  from safetensors.torch import load_file
  with open(os.path.join(path, "model.safetensors.index.json")) as f:
    fname = json.load(f)["weight_map"][key]
  return load_file(os.path.join(path, fname))


def _weight(path, key):
  """The release's tensor as float32 numpy: BF16 as stored, FP8 dequantized with the torch formula
  and rounded to bfloat16 (the load dtype, the checkpoint's embedding dtype)."""
  t = _torch(path, key)
  if key + "_scale_inv" in t:
    return dequantize_fp8(t[key], t[key + "_scale_inv"], BLOCK).to(torch.bfloat16).float().numpy()
  return t[key].float().numpy()


@pytest.mark.parametrize("kind", KINDS)
def test_release_layout_loads_and_saves_back_bitwise(releases, kind, tmp_path):
  path = releases[kind]
  model, variables = lj.load_pretrained(path)
  c = model.config
  assert c.hf_format.architecture == release_config(kind)["architectures"][0]
  p = variables["params"]
  # Tensors land where the model reads them (a few per family, against the file's own values).
  w = _weight(path, "model.layers.1.mlp.experts.5.up_proj.weight")              # [I, H]
  np.testing.assert_array_equal(np.asarray(p["decoder"]["layers"]["moe"]["w_up"][1, 5], np.float32), w.T)
  o = _weight(path, "model.layers.0.self_attn.1.o_proj.weight")                 # [H, nh * v]
  np.testing.assert_array_equal(np.asarray(p["decoder"]["layers"]["attn_1"]["o"][0], np.float32),
                                o.T.reshape(c.num_heads, c.v_head_dim, c.hidden_size))
  assert p["decoder"]["layers"]["moe"]["router"].dtype == jnp.float32
  if kind in ("lite", "longcat2"):
    name = "model.ngram_embeddings.embedders.2.weight" if kind == "lite" else "model.oe_embed_tokens2.weight"
    t = _weight(path, name)
    table = np.asarray(p["ngram_embedding"]["table_2"], np.float32)
    np.testing.assert_array_equal(table[:t.shape[0]], t)
    assert not table[t.shape[0]:].any()
  if kind == "longcat2":
    q = _weight(path, "model.layers.1.self_attn.0.indexer.wq_b.weight")         # [Hi * Di, q_lora]
    np.testing.assert_array_equal(np.asarray(p["decoder"]["layers"]["indexer"]["wq_b"][1], np.float32),
                                  q.T.reshape(c.q_lora_rank, 2, 16))
    assert c.sparse_attention is not None and c.mtp_num_heads == 0
  if kind in ("thinking_2601", "longcat2"):
    assert c.rope_scaling["type"] == "yarn"
  out = str(tmp_path / "saved")
  lj.save_pretrained(out, model, variables, fp8_scales=path if kind == "flash_fp8" else None, max_shard_bytes=60_000)
  a, b = read_all(path), read_all(out)
  assert sorted(a) == sorted(b), (set(a) ^ set(b))
  bad = [k for k in a if a[k] != b[k]]
  assert not bad, f"{len(bad)} tensors differ, e.g. {bad[0]}: {a[bad[0]][:2]} vs {b[bad[0]][:2]}"
  with open(os.path.join(path, "config.json")) as f:
    src = json.load(f)
  with open(os.path.join(out, "config.json")) as f:
    dst = json.load(f)
  assert dst["architectures"] == src["architectures"]
  assert ("model_type" in dst) == ("model_type" in src)
  assert dst.get("quantization_config") == src.get("quantization_config")
  assert (dst.get("rope_scaling") or {}).get("rope_type") == (src.get("rope_scaling") or {}).get("rope_type")
  # The saved directory loads to the same variables.
  _, again = lj.load_pretrained(out)
  for x, y in zip(jax_leaves(variables), jax_leaves(again)):
    assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))


def jax_leaves(tree):
  import jax
  return jax.tree.leaves(tree)


def test_longcat2_config_as_released():
  """LongCat-2.0's config.json (no model_type, no use_longcat_dsa, oe_* / index_* fields, 3 MTP
  layers, deepseek_yarn) maps to the longcat2 preset's switches."""
  hf = dict(architectures=["LongcatCausalLM"], vocab_size=163840, hidden_size=8192, num_layers=38,
            num_attention_heads=64, n_routed_experts=768, zero_expert_num=128, moe_topk=12,
            expert_ffn_hidden_size=2048, ffn_hidden_size=12288, routed_scaling_factor=9.0, rope_theta=1000000.0,
            max_position_embeddings=262144, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
            qk_rope_head_dim=64, v_head_dim=128,
            rope_scaling={"rope_type": "deepseek_yarn", "factor": 120, "original_max_position_embeddings": 8192,
                          "beta_fast": 32, "beta_slow": 1, "mscale": 1, "mscale_all_dim": 1},
            oe_vocab_size_ratio=100.567, oe_neighbor_num=5, oe_split_num=4, index_n_heads=32, index_head_dim=128,
            index_topk=2048, index_init_tokens=16, index_local_tokens=1024, index_k_norm_type="rms", cli_factor=2,
            dsa_mtp_cli=True, mtp_num_layers=3, mtp_disable_over_tokenizer=True)
  c = config_lib.from_hf_config(hf)
  want = lj.get_config("longcat2")
  for f in ("vocab_size", "hidden_size", "num_layers", "num_ffn_experts", "zero_experts", "mtp_num_heads",
            "routed_scaling_factor"):
    assert c[f] == want[f], f
  assert dict(c.sparse_attention) == dict(want.sparse_attention)
  assert dict(c.ngram_embedding) == dict(want.ngram_embedding)
  assert c.rope_scaling["type"] == "yarn" and c.rope_scaling["factor"] == 120
  config_lib.validate(c)
  back = config_lib.to_hf_config(c)
  assert back["architectures"] == ["LongcatCausalLM"] and "model_type" not in back and "use_longcat_dsa" not in back
  assert back["rope_scaling"]["rope_type"] == "deepseek_yarn" and back["oe_split_num"] == 4


# ---------------------------------------------------------------------------------------------
# Bad input: one CheckpointError naming the file and the tensor.


def _copy(src, dst):
  shutil.copytree(src, dst)
  return str(dst)


def _file_of(path, key):
  with open(os.path.join(path, "model.safetensors.index.json")) as f:
    return json.load(f)["weight_map"][key]


def _rewrite(path, key, fn):
  """Rewrites the file holding `key` with fn(tensors) applied (safetensors.torch)."""
  from safetensors.torch import load_file, save_file
  fname = os.path.join(path, _file_of(path, key))
  t = load_file(fname)
  fn(t)
  save_file(t, fname, metadata={"format": "pt"})


def test_error_truncated_shard(releases, tmp_path):
  p = _copy(releases["flash_fp8"], tmp_path / "c")
  fname = _file_of(p, "model.layers.1.mlp.experts.7.down_proj.weight")
  full = os.path.join(p, fname)
  data = open(full, "rb").read()
  open(full, "wb").write(data[:len(data) - 100])
  with pytest.raises(CheckpointError, match=rf"{fname}: tensor '[^']+' ends at byte .* \(truncated shard"):
    lj.load_pretrained(p)


def test_error_scale_of_wrong_shape(releases, tmp_path):
  p = _copy(releases["flash_fp8"], tmp_path / "c")
  key = "model.layers.0.self_attn.1.kv_b_proj.weight_scale_inv"
  _rewrite(p, key, lambda t: t.__setitem__(key, t[key][:-1]))
  with pytest.raises(CheckpointError, match=rf"{_file_of(p, key)}: scale '{key}' has shape .* needs"):
    lj.load_pretrained(p)


def test_error_weight_without_scale(releases, tmp_path):
  p = _copy(releases["flash_fp8"], tmp_path / "c")
  key = "model.layers.1.mlps.0.up_proj.weight"
  fname = _file_of(p, key + "_scale_inv")
  _rewrite(p, key + "_scale_inv", lambda t: t.pop(key + "_scale_inv"))
  index = os.path.join(p, "model.safetensors.index.json")
  with open(index) as f:
    idx = json.load(f)
  del idx["weight_map"][key + "_scale_inv"]
  with open(index, "w") as f:
    json.dump(idx, f)
  with pytest.raises(CheckpointError, match=rf"{_file_of(p, key)}: FP8 tensor '{key}' has no '{key}_scale_inv'"):
    lj.load_pretrained(p)
  assert fname


def test_error_unknown_fp8_dtype(releases, tmp_path):
  p = _copy(releases["flash_fp8"], tmp_path / "c")
  key = "model.layers.0.mlp.experts.2.gate_proj.weight"
  _rewrite(p, key, lambda t: t.__setitem__(key, t[key].float().to(torch.float8_e5m2)))
  with pytest.raises(CheckpointError, match=rf"{_file_of(p, key)}: tensor '{key}' is stored as float8_e5m2"):
    lj.load_pretrained(p)
  # A dtype name the loader has never heard of (edited header, same byte count).
  fname = os.path.join(p, _file_of(p, key))
  data = bytearray(open(fname, "rb").read())
  n = struct.unpack("<Q", bytes(data[:8]))[0]
  data[8:8 + n] = bytes(data[8:8 + n]).replace(b'"F8_E5M2"', b'"F8_E9M9"')
  open(fname, "wb").write(bytes(data))
  with pytest.raises(CheckpointError, match=rf"{fname}: tensor '{key}' has dtype 'F8_E9M9'"):
    lj.load_pretrained(p)


def test_error_unknown_architecture(releases, tmp_path):
  p = _copy(releases["flash"], tmp_path / "c")
  cfg = os.path.join(p, "config.json")
  with open(cfg) as f:
    hf = json.load(f)
  hf["architectures"] = ["LongcatFlashOmniForCausalLM"]
  with open(cfg, "w") as f:
    json.dump(hf, f)
  with pytest.raises(CheckpointError, match=r"config\.json: architectures \['LongcatFlashOmniForCausalLM'\]"):
    lj.load_pretrained(p)


def test_error_index_names_missing_file(releases, tmp_path):
  p = _copy(releases["lite"], tmp_path / "c")
  key = "model.layers.1.mlp.router.classifier.weight"
  fname = _file_of(p, key)
  os.remove(os.path.join(p, fname))
  with pytest.raises(CheckpointError, match=rf"index\.json: names file '{fname}' \(e\.g\. for tensor '[^']+'\)"):
    lj.load_pretrained(p)
