"""Model-growth initialisation: a deeper model from a trained shallow one by stacking (spec section 5).

The report trains a half-depth model (14 layers) and stacks it twice for the 28-layer run. With
the scanned decoder every per-layer leaf (`params` and `expert_bias` under `decoder/layers`) has a
leading [L] axis, so stacking is one concatenation per leaf:

    [l_0 .. l_{L-1}]  ->  [l_0 .. l_{L-1}, l_0 .. l_{L-1}]      (factor 2)

Everything else (embeddings, final norm, lm_head, MTP heads) is copied. The optimizer state is
fresh: the grown model starts a new run (`train.state_from_params`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LAYERS_PATH = ("decoder", "layers")


def grow_config(model_config, factor: int = 2):
  """The model config of the grown model (num_layers * factor)."""
  c = model_config.copy_and_resolve_references()
  c.num_layers = model_config.num_layers * factor
  return c


def stack_layers(tree, num_layers: int, factor: int = 2):
  """Stacks the [num_layers, ...] leaves under `decoder/layers` `factor` times; other leaves copied."""
  if factor < 1:
    raise ValueError(f"grow factor={factor} must be >= 1")
  if "decoder" not in tree or "layers" not in tree["decoder"]:
    return tree

  def stack(x):
    if x.shape[:1] != (num_layers,):
      raise ValueError(f"a decoder/layers leaf has shape {x.shape}, expected a leading num_layers={num_layers} axis")
    return jnp.concatenate([x] * factor, axis=0)

  out = dict(tree)
  out["decoder"] = dict(tree["decoder"])
  out["decoder"]["layers"] = jax.tree.map(stack, tree["decoder"]["layers"])
  return out


def grow(params, expert_bias, num_layers: int, factor: int = 2):
  """(params, expert_bias) of a num_layers model -> those of a num_layers * factor model."""
  return stack_layers(params, num_layers, factor), stack_layers(expert_bias, num_layers, factor)
