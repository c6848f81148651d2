"""Bad input at the public entry points: one clear error naming the row and position, never a
silent wrong answer (issue 17)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import longcat_jax as lj
from longcat_jax import inference


@pytest.fixture(scope="module")
def tiny():
  model = lj.LongcatForCausalLM(lj.get_config("tiny", max_position_embeddings=64))
  return model, lj.init_variables(model, jax.random.key(0))


def test_generate_refuses_bad_prompts(tiny):
  model, variables = tiny
  v = model.config.vocab_size
  with pytest.raises(ValueError, match=rf"prompt 0, position 2: token id {v + 5} is outside the vocabulary \[0, {v}\)"):
    inference.generate(model, variables, [[1, 2, v + 5]], 4)
  with pytest.raises(ValueError, match=r"prompt 1, position 0: token id -1"):
    inference.generate(model, variables, [[1, 2], [-1]], 4)
  with pytest.raises(ValueError, match="prompt 1 is empty"):
    inference.generate(model, variables, [[1, 2], []], 4)
  with pytest.raises(ValueError, match="prompt 1 has 64 tokens; the model has max_position_embeddings=64"):
    inference.generate(model, variables, [[1], [3] * 64], 4)
  with pytest.raises(ValueError, match=r"prompt \(60\) \+ max_new_tokens \(8\) = 68 tokens exceeds"):
    inference.generate(model, variables, [[3] * 60], 8)
  with pytest.raises(ValueError, match="cache_size=32 is too small for prompts of 10 tokens"):
    inference.generate(model, variables, [[3] * 10], 30, cache_size=32)


def test_apply_refuses_out_of_vocab_ids_and_jit_gives_nan(tiny):
  model, variables = tiny
  v = model.config.vocab_size
  ids = np.array([[1, 2, 3], [4, v, 6]], np.int32)
  with pytest.raises(ValueError, match=rf"input_ids\[1, 1\] = {v} is outside the vocabulary \[0, {v}\)"):
    model.apply(variables, ids)
  with pytest.raises(ValueError, match=r"input_ids\[0, 0\] = -3"):
    model.apply(variables, jnp.asarray([[-3, 1]]))
  for bad in (v, -3):   # traced ids cannot raise: the bad id's row is NaN (loudly), the others are not touched
    logits = np.asarray(jax.jit(model.apply)(variables, np.array([[1, 2, 3], [4, bad, 6]], np.int32)))
    assert np.isnan(logits[1, 1:]).all() and np.isfinite(logits[0]).all()


def test_count_params_takes_a_preset_name():
  assert lj.count_params("flash") == lj.count_params(lj.get_config("flash"))   # what a new user tries first
  with pytest.raises(ValueError, match="unknown config preset 'flsh'"):
    lj.count_params("flsh")
  with pytest.raises(TypeError, match="a model ConfigDict or a preset name, got dict"):
    lj.count_params({"hidden_size": 8})
