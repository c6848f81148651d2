"""Logit parity against mlx-lm's pip-release LongCat models (an implementation no one on this
project wrote): `mlx_lm/models/longcat_flash.py` (LongCat-Flash) and `longcat_flash_ngram.py`
(LongCat-Flash-Lite), tiny random models, weights through our `save_pretrained` (the HF layout)
and mlx-lm's own `sanitize`, float32 logits within 1e-4.

mlx-lm's `longcat2.py` (LongCat-2.0) is not in the pip release, so it cannot run here without
vendoring it; the LongCat-2.0 parts are tested against its formulas in test_longcat2_release.py.
mlx-lm builds the q_a / kv_a latent norms with mlx's default eps (1e-5), which these models set as
`latent_norm_eps` (transformers' LongcatFlash uses 1e-6).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import longcat_jax as lj
from longcat_jax import config as config_lib

mx = pytest.importorskip("mlx.core")
mlx_flash = pytest.importorskip("mlx_lm.models.longcat_flash")
mlx_ngram = pytest.importorskip("mlx_lm.models.longcat_flash_ngram")

YARN = dict(type="yarn", factor=4.0, original_max_position_embeddings=16, beta_fast=32, beta_slow=1, mscale=1.0,
            mscale_all_dim=1.0)


def _mlx_args(c, module, tmp):
  """mlx-lm ModelArgs from our config.json (to_hf_config) with the fields mlx-lm reads."""
  hf = json.loads((tmp / "config.json").read_text())
  hf.update(rope_theta=c.rope_theta, attention_method="MLA", zero_expert_type="identity", attention_bias=False)
  hf["model_type"] = hf.get("model_type", "longcat_flash")
  if c.rope_scaling is not None:
    hf["rope_scaling"] = {k: v for k, v in dict(c.rope_scaling).items()}
  return module.ModelArgs.from_dict(hf)


def _mlx_model(c, module, tmp):
  model = module.Model(_mlx_args(c, module, tmp))
  w = {k: mx.array(v) for k, v in load_file(str(tmp / "model.safetensors")).items()
       if not (".mlp.experts." in k and int(k.split(".mlp.experts.")[1].split(".")[0]) >= c.num_ffn_experts)}
  model.load_weights(list(model.sanitize(w).items()), strict=True)
  return model


def _random_variables(model, seed):
  import flax
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
  rng = np.random.RandomState(seed)
  fill = lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype)
  v = {k: jax.tree.map(fill, flax.linen.meta.unbox(shapes[k])) for k in ("params", "expert_bias")}
  return v


@pytest.mark.parametrize("name", ["longcat_flash", "longcat_flash_ngram"])
def test_logits_match_mlx_lm(name, tmp_path):
  kw = dict(kernels="xla", latent_norm_eps=1e-5, rope_scaling=YARN, num_layers=2)
  module = mlx_flash
  if name == "longcat_flash_ngram":
    kw["ngram_embedding"] = dict(vocab_size_ratio=2.5, neighbor_num=3, split_num=2)
    module = mlx_ngram
  c = lj.get_config("tiny", **kw)
  model = lj.LongcatForCausalLM(c)
  variables = _random_variables(model, seed=1)
  # A non-zero expert bias, so the routing's bias correction is compared too.
  variables["expert_bias"] = jax.tree.map(lambda b: 0.05 * jnp.sin(jnp.arange(b.size, dtype=b.dtype)).reshape(b.shape),
                                          variables["expert_bias"])
  lj.save_pretrained(str(tmp_path), model, variables)
  ref = _mlx_model(c, module, tmp_path)
  ids = np.random.RandomState(2).randint(0, c.vocab_size, (2, 21))
  want = np.array(ref(mx.array(ids)).astype(mx.float32))
  got = np.asarray(jax.jit(model.apply)(variables, jnp.asarray(ids)))
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  assert np.abs(want).max() > 1e-2  # the comparison is not of two near-zero arrays
