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

- Muon (`optimizer.name="muon"`; Jordan et al. 2024, Moonshot's "Muon is Scalable for LLM
  Training", arXiv 2502.16982; LongCat-2.0 was trained with Muon [card]): Nesterov momentum,
  orthogonalised by 5 Newton-Schulz steps (optax's `orthogonalize_via_newton_schulz`), times
  `muon_update_rms * sqrt(max(fan_in, fan_out))` so that its update RMS matches AdamW's (~0.2) and
  AdamW's learning rate and weight decay carry over. Muon takes the hidden matrices, one matrix per
  stacked layer and per expert (`layers` and `exp` are batch axes); AdamW the embeddings, the
  unembedding, norms, the router and every vector (`muon_dimension_numbers`).

Parameter groups come from the logical axis names every parameter carries (`layers.param`):
no parameter path strings.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from optax.contrib import MuonDimensionNumbers
from optax.contrib._muon import orthogonalize_via_newton_schulz

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


# ---------------------------------------------------------------------------------------------
# Muon.

MUON_BATCH_AXES = ("layers", "exp")      # stacked layers / experts: one matrix each
_HEAD_AXES = ("heads", "index_heads")
NS_COEFFS = (3.4445, -4.7750, 2.0315)    # Jordan et al.'s quintic Newton-Schulz coefficients


def muon_dimension_numbers(axes: tuple, group: str):
  """The matrix a parameter is orthogonalised as (optax `MuonDimensionNumbers`: reduction = input
  axes, output axes; every other axis a batch axis), or None for AdamW: non-hidden groups, the
  router (`exp_all`), and anything with fewer than 2 matrix axes. Parameters are stored
  [*in, *out]; a leading head axis belongs to the input ([heads, v, hidden] output projections)."""
  if group != "hidden" or "exp_all" in axes:
    return None
  mat = [i for i, a in enumerate(axes) if a not in MUON_BATCH_AXES]
  if len(mat) < 2:
    return None
  if axes[mat[0]] in _HEAD_AXES:
    return MuonDimensionNumbers(reduction_axis=tuple(mat[:-1]), output_axis=(mat[-1],))
  return MuonDimensionNumbers(reduction_axis=(mat[0],), output_axis=tuple(mat[1:]))


def muon_leaf_dims(model) -> list:
  """`muon_dimension_numbers` of every parameter, in `jax.tree.leaves(params)` order."""
  is_axes = lambda x: isinstance(x, tuple)
  axes = jax.tree.leaves(param_logical_axes(model), is_leaf=is_axes)
  groups = jax.tree.leaves(param_groups(model))
  return [muon_dimension_numbers(a, g) for a, g in zip(axes, groups)]


def _fans(shape, dims: MuonDimensionNumbers) -> tuple[int, int]:
  n = len(shape)
  return (math.prod(shape[a % n] for a in dims.reduction_axis), math.prod(shape[a % n] for a in dims.output_axis))


class MuonAdamState(NamedTuple):
  count: jax.Array   # int32 []
  mu: optax.Params   # Muon momentum / Adam first moment
  nu: optax.Params   # Adam second moment ([] placeholders for Muon leaves)


def scale_by_muon_adam(leaf_dims: list, *, momentum: float = 0.95, ns_steps: int = 5, update_rms: float = 0.2,
                       b1: float = 0.9, b2: float = 0.95, eps: float = 1e-16) -> optax.GradientTransformation:
  """Per leaf: Muon where `leaf_dims[i]` is set, else Adam (both before weight decay and LR).

      Muon:  m = momentum * m + g;  u = NS5(g + momentum * m) * update_rms * sqrt(max(fan_in, fan_out))
      Adam:  the usual bias-corrected moments, u = m_hat / (sqrt(v_hat) + eps)

  (Moonshot's recipe, arXiv 2502.16982 Algorithm 1: Nesterov momentum without bias correction; the
  Newton-Schulz input is Frobenius-normalised, so the momentum's scale does not matter.)
  """
  coeffs = jnp.asarray(NS_COEFFS, jnp.float32)

  def check(leaves):
    if len(leaves) != len(leaf_dims):
      raise ValueError(f"scale_by_muon_adam: {len(leaves)} parameters but {len(leaf_dims)} dimension numbers")

  def init(params):
    leaves, treedef = jax.tree.flatten(params)
    if not leaves and leaf_dims:
      # `optax.tree_map_params` (how the trainer shards optimizer state) passes one stand-in object
      # for the whole parameter tree; both moments are trees shaped like the parameters.
      return MuonAdamState(jnp.zeros((), jnp.int32), params, params)
    check(leaves)
    mu = [jnp.zeros_like(p) for p in leaves]
    nu = [jnp.zeros((), p.dtype) if d is not None else jnp.zeros_like(p) for p, d in zip(leaves, leaf_dims)]
    return MuonAdamState(jnp.zeros((), jnp.int32), treedef.unflatten(mu), treedef.unflatten(nu))

  def update(updates, state, params=None):
    del params
    g, treedef = jax.tree.flatten(updates)
    check(g)
    mu, nu = treedef.flatten_up_to(state.mu), treedef.flatten_up_to(state.nu)
    count = state.count + 1
    t = count.astype(jnp.float32)
    out, new_mu, new_nu = [], [], []
    for gi, mi, vi, d in zip(g, mu, nu, leaf_dims):
      if d is None:
        mi = b1 * mi + (1 - b1) * gi
        vi = b2 * vi + (1 - b2) * gi * gi
        out.append((mi / (1 - b1 ** t)) / (jnp.sqrt(vi / (1 - b2 ** t)) + eps))
      else:
        mi = momentum * mi + gi
        o = orthogonalize_via_newton_schulz((gi + momentum * mi).astype(jnp.float32), coeffs, ns_steps,
                                            eps=1e-7, dimension_numbers=d)
        fan_in, fan_out = _fans(gi.shape, d)
        out.append((o * (update_rms * math.sqrt(max(fan_in, fan_out)))).astype(gi.dtype))
      new_mu.append(mi)
      new_nu.append(vi)
    return treedef.unflatten(out), MuonAdamState(count, treedef.unflatten(new_mu), treedef.unflatten(new_nu))

  return optax.GradientTransformation(init, update)


def make_optimizer(opt_config, groups, total_steps: int, hidden_size: int, leaf_dims: list | None = None):
  """(optax transformation, schedule). `groups` from `param_groups(model)`; `leaf_dims` from
  `muon_leaf_dims(model)` when `opt_config.name == "muon"`."""
  c = opt_config
  schedule = make_schedule(c, total_steps)
  s = width_factor(c, hidden_size)
  decay_mask = jax.tree.map(lambda g: g != "norm", groups)
  parts = []
  if c.grad_clip and c.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(float(c.grad_clip)))
  name = c.get("name", "adamw")
  if name == "adamw":
    parts.append(optax.scale_by_adam(b1=float(c.b1), b2=float(c.b2), eps=float(c.eps)))
  elif name == "muon":
    if leaf_dims is None:
      raise ValueError("optimizer.name='muon' needs leaf_dims (optimizer.muon_leaf_dims(model))")
    parts.append(scale_by_muon_adam(leaf_dims, momentum=float(c.get("muon_momentum", 0.95)),
                                    ns_steps=int(c.get("muon_ns_steps", 5)),
                                    update_rms=float(c.get("muon_update_rms", 0.2)),
                                    b1=float(c.b1), b2=float(c.b2), eps=float(c.eps)))
  else:
    raise ValueError(f"optimizer.name={name!r} must be 'adamw' or 'muon'")
  parts.append(optax.add_decayed_weights(float(c.weight_decay), mask=decay_mask))
  if s != 1.0:
    parts.append(scale_by_tree(lr_multipliers(groups, s)))
  parts.append(optax.scale_by_learning_rate(schedule))
  return optax.chain(*parts), schedule
