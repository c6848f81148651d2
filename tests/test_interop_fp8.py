"""FP8 (block e4m3) checkpoints: the codec is exact both ways, and a transformers model quantized
in the released format gives the logits of transformers running the dequantized weights."""

import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from hf_reference import make_reference, reference_logits
from release_checkpoints import dequantize_fp8, quantize_fp8, read_all, write_checkpoint

import longcat_jax as lj
from longcat_jax.interop import fp8

BLOCK = [16, 8]


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_requantize_with_same_scales_gives_the_stored_bytes(dtype):
  """Every finite e4m3 value, times scales over many binades, dequantized to float32 / bfloat16 and
  requantized with the same scales, gives the same byte."""
  codes = np.arange(256, dtype=np.uint8).view(fp8.E4M3)
  codes = codes[np.isfinite(codes.astype(np.float32))]                    # 254 values (no NaN)
  rng = np.random.default_rng(0)
  q = np.tile(codes, (32, 4))[:, :1000].reshape(32, -1)                    # [32, 1000]
  block = (8, 128)
  s = (2.0 ** rng.uniform(-30, 10, fp8.scale_shape(q.shape, block))).astype(np.float32)
  rows, cols = (0, q.shape[0]), (0, q.shape[1])
  w = fp8.dequantize(q, s, rows, cols, block, dtype)
  back = fp8.quantize(w, s, rows, cols, block)
  np.testing.assert_array_equal(back.view(np.uint8), q.view(np.uint8))
  # Dequantization is the formula w[i, j] = q[i, j] * s[i // B0, j // B1] (float32), cropped.
  i, j = 13, 777
  assert w[i, j] == np.asarray(np.float32(q[i, j].astype(np.float32)) * s[i // 8, j // 128]).astype(dtype)
  # Fresh scales: amax / 448 per block, partial blocks cropped.
  x = rng.normal(size=(20, 30)).astype(np.float32)
  fresh = fp8.block_scales(x, (16, 16))
  assert fresh.shape == (2, 2) and fresh[1, 1] == np.float32(np.abs(x[16:, 16:]).max() / np.float32(448))


QUANTIZED = ("_proj.weight",)   # attention projections, dense MLPs, experts (not router, embeddings, norms)


def _fp8_copy(ref, tmp_path, block):
  """transformers saves the model; its tensors are quantized in the released FP8 format (torch
  formulas) into `fp8/`, and the dequantized weights are written to `dequant/` for transformers."""
  from safetensors.torch import load_file
  saved = str(tmp_path / "hf")
  ref.save_pretrained(saved)
  sd = {}
  for f in sorted(os.listdir(saved)):
    if f.endswith(".safetensors"):
      sd.update(load_file(os.path.join(saved, f)))
  with open(os.path.join(saved, "config.json")) as f:
    hf = json.load(f)
  n = hf["n_routed_experts"]
  tensors, dequant = {}, {}
  for k, v in sd.items():
    parts = k.split(".")
    if ".mlp.experts." in k and int(parts[parts.index("experts") + 1]) >= n:
      dequant[k] = v  # identity experts: unused; the releases have no tensors for them
      continue
    if k.endswith(QUANTIZED) and v.ndim == 2:
      q, s = quantize_fp8(v, block)
      tensors[k], tensors[k + "_scale_inv"] = q, s
      dequant[k] = dequantize_fp8(q, s, block)
    else:
      tensors[k] = dequant[k] = v.float()
  write_checkpoint(str(tmp_path / "dequant"), dequant, hf, files=2)
  hf["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                               "weight_block_size": list(block)}
  write_checkpoint(str(tmp_path / "fp8"), tensors, hf, files=2)
  return str(tmp_path / "fp8"), str(tmp_path / "dequant")


def test_fp8_checkpoint_logits_match_transformers_on_dequantized_weights(tmp_path):
  from transformers import LongcatFlashForCausalLM
  ref = make_reference(seed=3, bias_scale=0.05, hidden_size=72, q_lora_rank=40, kv_lora_rank=24,
                       ffn_hidden_size=80, expert_ffn_hidden_size=36)
  path, dequant = _fp8_copy(ref, tmp_path, BLOCK)
  theirs = LongcatFlashForCausalLM.from_pretrained(dequant).float().eval()
  model, variables = lj.load_pretrained(path, dtype=np.float32)
  assert model.config.hf_format.quantization["weight_block_size"] == BLOCK
  ids = np.random.RandomState(0).randint(0, ref.config.vocab_size, (2, 20))
  ours = np.asarray(jax.jit(model.apply)(variables, ids))
  want = reference_logits(theirs, ids)
  assert np.abs(want - reference_logits(ref, ids)).max() > 1e-4   # the quantization is visible
  np.testing.assert_allclose(ours, want, atol=1e-4, rtol=0)

  # FP8 -> JAX (float32) -> FP8 keeps every stored byte and scale (scales kept from the source).
  out = str(tmp_path / "back")
  lj.save_pretrained(out, model, variables, fp8_scales=path)
  a, b = read_all(path), read_all(out)
  assert sorted(a) == sorted(b) and all(a[k] == b[k] for k in a)
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["quantization_config"]["weight_block_size"] == BLOCK

  # Fresh scales (amax / 448): another valid FP8 copy, within half an e4m3 step of the weights.
  fresh = str(tmp_path / "fresh")
  lj.save_pretrained(fresh, model, variables, quantization="fp8")
  _, v2 = lj.load_pretrained(fresh, dtype=np.float32)
  for x, y in zip(jax.tree.leaves(variables), jax.tree.leaves(v2)):
    x, y = np.asarray(x), np.asarray(y)
    assert np.all(np.abs(x - y) <= 2.0 ** -4 * np.abs(x) + 1e-12)
