"""AdamW with the report's settings, LR schedules and width-scaling hyperparameter transfer.

    tx, schedule = make_optimizer(config.optimizer, param_groups(model), total_steps)

- Adam epsilon 1e-16 by default: the report finds quality degrades as epsilon approaches the
  gradient RMS, which at scale is tiny (spec section 5).
- Weight decay skips `norm` parameters (RMSNorm gains); global-norm clipping before Adam.
- Schedules: `wsd` (linear warmup, constant, linear decay over the last `decay_fraction` of the
  steps) and `cosine` (linear warmup, cosine to `final_lr_ratio * lr`), or `constant`.
- Width transfer ("Adam LR full align", standard parameterisation, spec section 5): with
  s = hidden_size / proxy_hidden_size, hidden and unembedding matrices get LR / s and init
  variance / s, embeddings and norm gains keep both. Tune `lr` on the proxy width, then train
  the wide model with the same config.

Parameter groups come from the logical axis names every parameter carries (`layers.param`):
no parameter path strings.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

GROUPS = ("embedding", "norm", "unembedding", "hidden")


def param_logical_axes(model):
  """Tree of logical axis-name tuples, same structure as `params` (from abstract init)."""
  ids = jnp.zeros((1, 1), jnp.int32)
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), ids))["params"]
  is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)
  return jax.tree.map(lambda x: tuple(x.names) if is_box(x) else (), boxed, is_leaf=is_box)


def group_of(axes: tuple) -> str:
  """Parameter group from logical axis names (the leading `layers` axis is ignored)."""
  axes = tuple(a for a in axes if a != "layers")
  if "norm" in axes:
    return "norm"
  if axes and axes[0] in ("vocab", "ngram_vocab"):
    return "embedding"
  if axes and axes[-1] == "vocab":
    return "unembedding"
  return "hidden"


def param_groups(model):
  """Tree of group names (`GROUPS`), same structure as `params`."""
  return jax.tree.map(group_of, param_logical_axes(model), is_leaf=lambda x: isinstance(x, tuple))


def width_factor(opt_config, hidden_size: int) -> float:
  """s = hidden_size / proxy_hidden_size (1 when transfer is off)."""
  proxy = opt_config.get("proxy_hidden_size", 0) or 0
  return hidden_size / proxy if proxy else 1.0


def lr_multipliers(groups, s: float):
  """Per-leaf LR multiplier: 1 / s for hidden and unembedding matrices, 1 otherwise."""
  return jax.tree.map(lambda g: 1.0 / s if g in ("hidden", "unembedding") else 1.0, groups)


def scale_init_for_width(params, groups, s: float):
  """Fresh-init rescale: hidden and unembedding weights * s**-0.5 (variance / s)."""
  if s == 1.0:
    return params
  return jax.tree.map(lambda p, g: p * jnp.asarray(s ** -0.5, p.dtype) if g in ("hidden", "unembedding") else p,
                      params, groups)


def make_schedule(opt_config, total_steps: int):
  """Learning rate as a function of the step (optax schedule)."""
  c = opt_config
  peak, warmup = float(c.lr), int(c.warmup_steps)
  end = peak * float(c.final_lr_ratio)
  warm = optax.linear_schedule(0.0, peak, max(warmup, 1))
  if c.schedule == "constant":
    return optax.join_schedules([warm, optax.constant_schedule(peak)], [warmup])
  if c.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, peak, max(warmup, 1), max(total_steps, warmup + 1), end)
  if c.schedule == "wsd":
    decay = max(1, int(round(total_steps * float(c.decay_fraction))))
    stable = max(0, total_steps - warmup - decay)
    return optax.join_schedules(
        [warm, optax.constant_schedule(peak), optax.linear_schedule(peak, end, decay)],
        [warmup, warmup + stable])
  raise ValueError(f"optimizer.schedule={c.schedule!r} must be one of 'wsd', 'cosine', 'constant'")


def scale_by_tree(multipliers) -> optax.GradientTransformation:
  """Multiplies each update leaf by a fixed per-leaf factor (per-group learning rates)."""

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, m: u * jnp.asarray(m, u.dtype), updates, multipliers), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_optimizer(opt_config, groups, total_steps: int, hidden_size: int):
  """(optax transformation, schedule). `groups` from `param_groups(model)`."""
  c = opt_config
  schedule = make_schedule(c, total_steps)
  s = width_factor(c, hidden_size)
  decay_mask = jax.tree.map(lambda g: g != "norm", groups)
  parts = []
  if c.grad_clip and c.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(float(c.grad_clip)))
  parts += [
      optax.scale_by_adam(b1=float(c.b1), b2=float(c.b2), eps=float(c.eps)),
      optax.add_decayed_weights(float(c.weight_decay), mask=decay_mask),
  ]
  if s != 1.0:
    parts.append(scale_by_tree(lr_multipliers(groups, s)))
  parts.append(optax.scale_by_learning_rate(schedule))
  return optax.chain(*parts), schedule
