"""`TrainState`, `init_train_state` and the pure training step.

    state = init_train_state(model, config, jax.random.PRNGKey(config.seed))
    train_step = make_train_step(model, config)
    step_fn = jax.jit(train_step, in_shardings=(state_shardings, batch_shardings),
                      out_shardings=(state_shardings, None))
    state, metrics = step_fn(state, batch)

Signature (for the AOT planner and sharding tests):

  make_train_step(model: LongcatForCausalLM, config: ConfigDict (`train.config.get_train_config`))
    -> train_step(state: TrainState, batch: dict[str, Array]) -> (TrainState, dict[str, Array])

  batch: the data pipeline's dict, each [global_batch, seq]: input_ids, targets, segment_ids,
    positions (int32), loss_mask (float32). global_batch must divide by `config.grad_accum_steps`.
  The step is a pure function of its arguments (no Python side effects, no host callbacks), so it
  can be jitted with any in/out shardings or lowered ahead of time with ShapeDtypeStructs
  (`abstract_train_state`).
  With `loss.indexer_kl_weight` > 0 and sparse attention the indexer trains as DeepSeek-V3.2's
  (`indexer_objective`): for the first `loss.indexer_dense_warmup_steps` steps attention is dense and
  only the indexer's weights move; then attention is sparse and the KL is taken over the selected
  keys; metrics gain indexer_kl and indexer_recall (top-k recall of attention's heaviest keys).
  metrics: float32 scalars loss (the optimised objective), nll (mean next-token cross-entropy),
    z_loss (hidden z-loss without lambda), balance_loss (without alpha), mtp_loss (mean over
    heads; 0 without MTP; per head: mtp_loss_per_head [N]), grad_norm (before clipping), lr, tokens (loss tokens), nonfinite
    (1 if the step was non-finite: with `nonfinite="skip"` its update was dropped); spike (1 if the
    spike guard dropped the update; `train.spike`), loss_limit / grad_norm_limit (its thresholds,
    +inf when off); grad_checksum uint32 [2] (only with `config.sdc_every` > 0: for the SDC check);
    ffn_experts_mean / ffn_experts_std [L] (FFN experts per real token, per layer);
    expert_load [L, N+Z] (global assignment counts this step).

The state after the step holds the optimizer update of `params` and the compute-budget
controller's update of `expert_bias` (from the step's global expert load); the optimizer never
sees `expert_bias`.
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from longcat_jax.model import EXPERT_BIAS, EXPERT_LOAD
from longcat_jax.model.sparse_attention import INDEXER_KL
from longcat_jax.model.transformer import init_variables
from longcat_jax.train import controller, losses, optimizer as optim, spike as spike_lib
from longcat_jax.train.checksum import tree_checksum

BATCH_KEYS = ("input_ids", "targets", "segment_ids", "positions", "loss_mask")


@flax.struct.dataclass
class TrainState:
  step: jax.Array            # int32 []: optimizer steps taken
  params: Any                # master weights (config.model.param_dtype, float32 by default)
  opt_state: Any             # optax state
  expert_bias: Any           # controller state: the `expert_bias` collection
  rng: jax.Array             # uint32 [2]: raw PRNG key (checkpointable), split every step
  guard: Any = None          # spike-guard statistics (`train.spike`): float32 [] each


def make_optimizer(model, config):
  """(optax transformation, lr schedule) for `config` (see `train.optimizer`)."""
  groups = optim.param_groups(model)
  dims = optim.muon_leaf_dims(model) if config.optimizer.get("name", "adamw") == "muon" else None
  return optim.make_optimizer(config.optimizer, groups, config.total_steps, config.model.hidden_size, dims)


def init_train_state(model, config, rng) -> TrainState:
  """Fresh state: model init (width-rescaled when `optimizer.proxy_hidden_size` > 0), zero bias."""
  rng = jnp.asarray(rng)
  if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.key_data(rng)
  init_rng, rng = jax.random.split(rng)
  variables = init_variables(model, init_rng)
  params = variables["params"]
  s = optim.width_factor(config.optimizer, config.model.hidden_size)
  if s != 1.0:
    params = optim.scale_init_for_width(params, optim.param_groups(model), s)
  return state_from_params(model, config, params, variables[EXPERT_BIAS], rng)


def state_from_params(model, config, params, expert_bias, rng) -> TrainState:
  """A step-0 state around given weights (fresh optimizer state), e.g. after model growth."""
  tx, _ = make_optimizer(model, config)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=jax.jit(tx.init)(params),
                    expert_bias=expert_bias, rng=jnp.asarray(rng, jnp.uint32), guard=spike_lib.init_stats())


def abstract_train_state(model, config) -> TrainState:
  """ShapeDtypeStruct tree of the state (no allocation): for restore targets and AOT lowering."""
  return jax.eval_shape(lambda: init_train_state(model, config, jax.random.PRNGKey(0)))


def _find(tree, name: str):
  """The leaf sown under `name` (unwrapping sow's 1-tuple); the model sows each name once."""
  found = [v for path, v in flax.traverse_util.flatten_dict(flax.core.unfreeze(tree)).items() if path[-1] == name]
  if len(found) != 1:
    raise KeyError(f"expected one intermediate named {name!r}, found {len(found)}")
  v = found[0]
  return v[0] if isinstance(v, tuple) else v


def _single_leaf(tree):
  leaves = jax.tree.leaves(tree)
  if len(leaves) != 1:
    raise ValueError(f"expected one MoE expert-load leaf, found {len(leaves)}")
  return leaves[0]


def trains_indexer(config) -> bool:
  return bool(config.loss.get("indexer_kl_weight", 0.0)) and config.model.sparse_attention is not None


def dense_attention_model(model):
  """The same model with attention forced dense (the indexer's warm-up stage); same parameters."""
  c = model.config.copy_and_resolve_references()
  c.sparse_attention = dict(c.sparse_attention, dense=True)
  return model.clone(config=c)


def indexer_mask(params):
  """True for the sparse indexers' weights (DeepSeek-V3.2's warm-up trains only these)."""
  flat = flax.traverse_util.flatten_dict(params)
  return flax.traverse_util.unflatten_dict({k: "indexer" in k for k in flat})


def make_loss_fn(model, config):
  """loss_fn(params, expert_bias, microbatch, norms, rng) -> (objective, aux) for one microbatch.

  `norms` = (loss tokens, real tokens, MTP tokens per head [N], microbatches) of the WHOLE batch,
  so that the objectives of the microbatches add up to the objective of the batch.
  """
  c, lc = config.model, config.loss
  n_mtp = c.mtp_num_heads
  kl_on = trains_indexer(config)
  mtp_kl_on = kl_on and bool(c.mtp_num_heads) and bool(c.mtp_shared_module)
  # The unembedding gradient's transpose in row tiles where XLA:CPU runs it on one device
  # (`losses.transpose_2d`; on a mesh the vocabulary axis may be sharded). Not with tied
  # embeddings: there the gradient is transposed back, and XLA cancels the two plain transposes.
  on_one_cpu = not model.placement.distributed and jax.default_backend() == "cpu"
  tile = 256 if on_one_cpu and not c.tie_word_embeddings else 0
  nll = functools.partial(losses.next_token_nll, chunk_tokens=lc.chunk_tokens or None, transpose_tile=tile)

  def loss_fn(params, expert_bias, mb, norms, rng):
    n_loss, n_real, n_mtp_tokens, n_micro = norms
    variables = {"params": params, EXPERT_BIAS: expert_bias}
    hidden, out = model.apply(variables, mb["input_ids"], mb["positions"], mb["segment_ids"], return_hidden=True,
                              mutable=[EXPERT_LOAD, "intermediates"] + ([INDEXER_KL] if kl_on else []),
                              rngs={"dropout": rng})
    unembed = params["embed_tokens"].T if c.tie_word_embeddings else params["lm_head"]
    nll_sum, _ = nll(hidden, unembed, mb["targets"], mb["loss_mask"])
    inter = out["intermediates"]
    token_mask = mb["segment_ids"] > 0
    z_sum = losses.hidden_z_loss_sum(_find(inter, "last_hidden"), token_mask)
    load = out[EXPERT_LOAD]
    objective = nll_sum / n_loss + lc.z_loss_weight * z_sum / n_real
    lb = jnp.zeros((), jnp.float32)
    if c.num_ffn_experts and c.zero_experts + c.num_ffn_experts > 1:
      lb = losses.balance_loss(_find(inter, "router_prob_mean"), _single_leaf(load),
                               num_ffn_experts=c.num_ffn_experts, zero_experts=c.zero_experts, top_k=c.top_k,
                               target_ffn_experts=c.target_ffn_experts, num_groups=lc.balance_groups)
      objective = objective + lc.balance_loss_weight * lb / n_micro
    mtp_sums = jnp.zeros((max(n_mtp, 1),), jnp.float32)
    if n_mtp:
      mtp_h = model.apply(variables, hidden, mb["input_ids"], mb["positions"], mb["segment_ids"],
                          method=model.mtp_hidden, mutable=[INDEXER_KL] if mtp_kl_on else False)
      if mtp_kl_on:  # LongCat-2.0's MTP module has its own indexer: the same KL (step 1's selection)
        mtp_h, mtp_out = mtp_h
        objective = objective + lc.indexer_kl_weight * jnp.mean(_find(mtp_out[INDEXER_KL], "mtp_kl")) / n_micro
      targets, weights = losses.mtp_targets(mb["input_ids"], mb["loss_mask"], n_mtp)
      mtp_sums = jnp.stack([nll(mtp_h[k], unembed, targets[k], weights[k])[0] for k in range(n_mtp)])
      objective = objective + lc.mtp_loss_weight * jnp.mean(mtp_sums / jnp.maximum(n_mtp_tokens, 1.0))
    fpt = _find(inter, "ffn_experts_per_token")
    aux = dict(nll_sum=nll_sum, z_sum=z_sum, balance=lb / n_micro, mtp_sums=mtp_sums, load=load, fpt=fpt)
    if kl_on:  # mean over layers; the KL reaches only the indexer (inputs and attention detached)
      kl, recall = jnp.mean(_find(out[INDEXER_KL], "kl")), jnp.mean(_find(out[INDEXER_KL], "recall"))
      objective = objective + lc.indexer_kl_weight * kl / n_micro
      aux.update(indexer_kl=kl / n_micro, indexer_recall=recall / n_micro)
    return objective, aux

  return loss_fn


def _batch_norms(batch, n_mtp: int, n_micro: int):
  n_loss = jnp.maximum(batch["loss_mask"].astype(jnp.float32).sum(), 1.0)
  n_real = jnp.maximum((batch["segment_ids"] > 0).astype(jnp.float32).sum(), 1.0)
  if n_mtp:
    _, w = losses.mtp_targets(batch["input_ids"], batch["loss_mask"], n_mtp)
    n_mtp_tokens = w.sum(axis=(1, 2))
  else:
    n_mtp_tokens = jnp.ones((1,), jnp.float32)
  return n_loss, n_real, n_mtp_tokens, jnp.asarray(n_micro, jnp.float32)


def make_train_step(model, config):
  """The pure training step `(state, batch) -> (state, metrics)`; see the module docstring."""
  c = config.model
  spike_cfg = config.get("spike")
  sdc = bool(config.get("sdc_every", 0))
  n_micro = int(config.grad_accum_steps)
  tx, schedule = make_optimizer(model, config)
  loss_fn = make_loss_fn(model, config)
  sparse_grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  warmup = int(config.loss.get("indexer_dense_warmup_steps", 0)) if trains_indexer(config) else 0
  dense_grad_fn = (jax.value_and_grad(make_loss_fn(dense_attention_model(model), config), has_aux=True)
                   if warmup else None)

  def train_step(state: TrainState, batch):
    def grad_fn(*args):  # the indexer's dense warm-up stage, then the sparse stage
      if dense_grad_fn is None:
        return sparse_grad_fn(*args)
      return jax.lax.cond(state.step < warmup, lambda a: dense_grad_fn(*a), lambda a: sparse_grad_fn(*a), args)

    batch = {k: batch[k] for k in BATCH_KEYS}
    rng, step_rng = jax.random.split(state.rng)
    norms = _batch_norms(batch, c.mtp_num_heads, n_micro)
    if n_micro == 1:
      (objective, aux), grads = grad_fn(state.params, state.expert_bias, batch, norms, step_rng)
      fpt = aux.pop("fpt")
    else:
      micro = jax.tree.map(lambda x: x.reshape((n_micro, x.shape[0] // n_micro) + x.shape[1:]), batch)

      def body(carry, xs):
        mb, i = xs
        (obj, aux), g = grad_fn(state.params, state.expert_bias, mb, norms, jax.random.fold_in(step_rng, i))
        fpt = aux.pop("fpt")
        acc_obj, acc_aux, acc_g = carry
        carry = (acc_obj + obj, jax.tree.map(jnp.add, acc_aux, aux), jax.tree.map(jnp.add, acc_g, g))
        return carry, fpt

      zeros = lambda t: jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32 if x.dtype != jnp.int32 else x.dtype), t)
      aux_shape = jax.eval_shape(lambda: grad_fn(state.params, state.expert_bias,
                                                 jax.tree.map(lambda x: x[0], micro), norms, step_rng)[0][1])
      aux_shape = {k: v for k, v in aux_shape.items() if k != "fpt"}
      init = (jnp.zeros((), jnp.float32), zeros(aux_shape),
              jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params))
      (objective, aux, grads), fpt = jax.lax.scan(body, init, (micro, jnp.arange(n_micro)))
      grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
      fpt = jnp.moveaxis(fpt, 0, 1).reshape((fpt.shape[1], -1) + fpt.shape[3:])  # [L, B, S]

    grad_norm = optax.tree.norm(grads)

    def update(params, opt_state, expert_bias):  # AdamW (or Muon) and the router-bias controller
      updates, opt_state = tx.update(grads, opt_state, params)
      if warmup:  # warm-up: only the indexer moves (the others' zero gradients would still decay them)
        warm = state.step < warmup
        updates = jax.tree.map(lambda u, ind: jnp.where(warm & ~ind, jnp.zeros_like(u), u), updates,
                               indexer_mask(updates))
      expert_bias = controller.update_expert_bias(expert_bias, aux["load"], c, state.step,
                                                  rate=config.controller.rate,
                                                  decay_steps=config.controller.decay_steps)
      return optax.apply_updates(params, updates), opt_state, expert_bias

    ok = jnp.isfinite(objective) & jnp.isfinite(grad_norm)
    if state.guard is None:  # a state built without guard statistics: no spike guard
      spike, limits, guard = spike_lib.is_spike(None, objective, grad_norm, None) + (None,)
    else:
      spike, limits = spike_lib.is_spike(state.guard, objective, grad_norm, spike_cfg)
      spike = spike & ok
      guard = spike_lib.update_stats(state.guard, objective, grad_norm, ok & ~spike, spike_cfg)
    old = (state.params, state.opt_state, state.expert_bias)
    if config.nonfinite == "skip" or spike_lib.enabled(spike_cfg):
      # A skipped update leaves the state as it was. A branch, not a select between the new and
      # the old state: with the state donated, XLA:CPU copied every optimizer moment at entry to
      # keep the old values alive for the select (68 copies, small preset).
      apply = ~spike & ok if config.nonfinite == "skip" else ~spike
      params, opt_state, expert_bias = jax.lax.cond(apply, update, lambda *a: a, *old)
    else:
      params, opt_state, expert_bias = update(*old)
    new = TrainState(step=state.step + 1, params=params, opt_state=opt_state, expert_bias=expert_bias, rng=rng,
                     guard=guard)

    n_loss, n_real, n_mtp_tokens, _ = norms
    token_mask = (batch["segment_ids"] > 0)
    fpt_mean, fpt_std = controller.ffn_experts_stats(fpt, token_mask)
    mtp_per_head = aux["mtp_sums"][:c.mtp_num_heads] / jnp.maximum(n_mtp_tokens, 1.0)
    metrics = dict(
        loss=objective, nll=aux["nll_sum"] / n_loss, z_loss=aux["z_sum"] / n_real, balance_loss=aux["balance"],
        mtp_loss=jnp.mean(mtp_per_head) if c.mtp_num_heads else jnp.zeros((), jnp.float32),
        mtp_loss_per_head=mtp_per_head,
        grad_norm=grad_norm, lr=jnp.asarray(schedule(state.step), jnp.float32), tokens=n_loss,
        nonfinite=(~ok).astype(jnp.float32), ffn_experts_mean=fpt_mean, ffn_experts_std=fpt_std,
        expert_load=_single_leaf(aux["load"]) if c.num_ffn_experts + c.zero_experts else jnp.zeros((0,)),
        spike=spike.astype(jnp.float32), loss_limit=limits["loss"], grad_norm_limit=limits["grad_norm"])
    if sdc:
      metrics["grad_checksum"] = tree_checksum(grads)
    if trains_indexer(config):
      metrics.update(indexer_kl=aux["indexer_kl"], indexer_recall=aux["indexer_recall"])
    return new, metrics

  return train_step


def make_eval_step(model, config):
  """eval_step(params, expert_bias, batch) -> mean next-token cross-entropy over the loss mask."""
  c = config.model

  def eval_step(params, expert_bias, batch):
    hidden = model.apply({"params": params, EXPERT_BIAS: expert_bias}, batch["input_ids"], batch["positions"],
                         batch["segment_ids"], return_hidden=True)
    unembed = params["embed_tokens"].T if c.tie_word_embeddings else params["lm_head"]
    nll, n = losses.next_token_nll(hidden, unembed, batch["targets"], batch["loss_mask"])
    return nll / jnp.maximum(n, 1.0)

  return eval_step
