"""The training job: data, state (fresh, grown or resumed), the step loop, metrics, checkpoints, sample.

    summary = run(config, workdir)      # experiments/train.py is the command-line front end

Resuming is automatic: if `workdir/checkpoints` holds a complete checkpoint, the run continues
from it (params, optimizer state, expert bias, rng, step, data iterator), and the per-step losses
are bitwise those of an uninterrupted run. A finished run says so and only samples.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from longcat_jax.model import LongcatForCausalLM
from longcat_jax.train import config as config_lib
from longcat_jax.train import faults, growth, metrics as metrics_lib, spike as spike_lib
from longcat_jax.train.checkpoint import Checkpointer, with_shardings
from longcat_jax.train.step import abstract_train_state, init_train_state, make_train_step, state_from_params


class NonFiniteLoss(RuntimeError):
  """Raised with `nonfinite="stop"` when a step's loss or gradient is not finite."""


def _log(msg: str) -> None:
  print(msg, flush=True)


def data_store(config) -> str:
  """The token store path: `data.store`, or the Python-stdlib corpus built under `data.cache_dir`."""
  if config.data.store:
    return config.data.store
  from longcat_jax.data import prepare_default_corpus  # pylint: disable=import-outside-toplevel
  return prepare_default_corpus(config.data.cache_dir, max_files=config.data.max_files or None)


def make_mesh():
  """A 1-D `data` mesh over all devices: batch split, state replicated (the simple layout)."""
  return Mesh(np.array(jax.devices()), ("data",))


def state_shardings(abstract_state, mesh):
  return jax.tree.map(lambda _: NamedSharding(mesh, P()), abstract_state)


def batch_sharding(mesh, batch_size: int):
  n = mesh.devices.size
  return NamedSharding(mesh, P("data") if batch_size % n == 0 else P())


def initial_state(model, config, rng, log=_log):
  """Fresh state, or a grown one when `config.init_from` names a trained run's checkpoints."""
  if not config.init_from:
    return init_train_state(model, config, rng)
  if not os.path.isdir(config.init_from):  # [issue 19] before orbax: one error, no background thread
    raise FileNotFoundError(f"init_from={config.init_from!r}: no such directory")
  src = Checkpointer(config.init_from, async_save=False, read_only=True, log=log)
  try:
    step = src.latest_step()
    if step is None:
      raise FileNotFoundError(f"init_from={config.init_from!r} holds no complete checkpoint")
    meta = src.read_meta(step)
    src_config = config_lib.ConfigDict(json.loads(meta["config"]))
    src_model = LongcatForCausalLM(src_config.model)
    src_state, _, _ = src.restore(abstract_train_state(src_model, src_config), step,
                                  defaults={"guard": spike_lib.init_stats()})
  finally:
    src.close()
  want = src_config.model.num_layers * config.grow_factor
  if config.model.num_layers != want:
    raise ValueError(f"model.num_layers={config.model.num_layers} but growing the {src_config.model.num_layers}-layer "
                     f"checkpoint {config.init_from!r} by grow_factor={config.grow_factor} gives {want}")
  params, bias = growth.grow(src_state.params, src_state.expert_bias, src_config.model.num_layers,
                             config.grow_factor)
  log(f"grown from {config.init_from} step {step}: {src_config.model.num_layers} -> {want} layers (stacked)")
  return state_from_params(model, config, params, bias, jax.random.split(jnp.asarray(rng))[0])


def greedy_sample(model, params, expert_bias, prompt: list[int], num_tokens: int) -> list[int]:
  """Greedy continuation: `longcat_jax.inference.generate` when present, else a full-forward loop."""
  variables = {"params": params, "expert_bias": expert_bias}
  try:
    from longcat_jax.inference import generate  # pylint: disable=import-outside-toplevel
  except ImportError:
    generate = None
  if generate is not None:
    out = generate(model, variables, [prompt], num_tokens, temperature=0.0, eos_token_id=())
    return [int(t) for t in out.tokens[0][:int(out.num_tokens[0])]]
  total = len(prompt) + num_tokens
  ids = np.zeros((1, total), np.int32)
  ids[0, :len(prompt)] = prompt
  step = jax.jit(lambda ids, pos: jnp.argmax(model.apply(variables, ids)[0, pos - 1]))
  for pos in range(len(prompt), total):
    ids[0, pos] = int(step(ids, pos))
  return ids[0, len(prompt):].tolist()


def run(config, workdir: str, *, progress: bool = True, log=_log) -> dict:
  """Trains `config` in `workdir` (resuming if possible); returns a summary dict."""
  config_lib.validate(config)
  if config.compilation_cache:
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(config.compilation_cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  os.makedirs(workdir, exist_ok=True)
  c = config.model
  model = LongcatForCausalLM(c)

  store_path = data_store(config)
  from longcat_jax.data import TokenStore, load_tokenizer, make_train_iterator  # pylint: disable=import-outside-toplevel
  store = TokenStore.open(store_path)
  if store.vocab_size > c.vocab_size:
    raise ValueError(f"data store {store_path} has vocab_size={store.vocab_size} > model.vocab_size={c.vocab_size}")
  it = make_train_iterator(store_path, config.seq_len, config.batch_size, config.seed, 0, 1,
                           num_threads=config.data.num_threads, prefetch=config.data.prefetch)

  mesh = make_mesh()
  abstract = abstract_train_state(model, config)
  shardings = state_shardings(abstract, mesh)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), every=config.checkpoint_every,
                      keep=config.keep_checkpoints, async_save=config.async_checkpoint,
                      on_save_error=config.on_save_error, log=log)
  meta = {"config": config.to_json()}
  if ckpt.latest_step() is not None:
    # [issue 19] the newest checkpoint that reads and verifies (strict_resume: refuse a bad one)
    state, data_state, _, _ = ckpt.restore_intact(with_shardings(abstract, shardings), strict=config.strict_resume,
                                                  defaults={"guard": jax.device_put(spike_lib.init_stats(),
                                                                                    shardings.guard)})
    it.set_state(data_state)
    log(f"resumed from {ckpt.directory} step {int(state.step)}")
  else:
    state = jax.device_put(initial_state(model, config, jax.random.PRNGKey(config.seed), log), shardings)
  start = int(state.step)

  tokenizer = load_tokenizer(store.meta.get("tokenizer", "byte"))
  summary = {"workdir": workdir, "start_step": start, "total_steps": config.total_steps}
  if start >= config.total_steps:
    log(f"already done: step {start} of {config.total_steps} (checkpoint in {ckpt.directory})")
  else:
    preempt = faults.Preemption(log=log)  # [issue 19] SIGTERM / SIGINT: stop after the step in flight, save
    watchdog = faults.Watchdog(config.step_timeout_s) if config.step_timeout_s else None  # [issue 19] hangs
    try:
      summary.update(_train_loop(model, config, state, it, ckpt, meta, mesh, shardings, workdir, progress, log,
                                 preempt, watchdog))
    finally:
      preempt.close()
      if watchdog:
        watchdog.close()
    state = summary.pop("state")
  ckpt.close()

  if config.sample_tokens > 0 and not summary.get("preempted"):
    prompt = tokenizer.encode(config.sample_prompt)
    if getattr(tokenizer, "bos_id", None) is not None:
      prompt = [tokenizer.bos_id] + list(prompt)
    out = greedy_sample(model, state.params, state.expert_bias, list(prompt), config.sample_tokens)
    text = tokenizer.decode(out)
    summary["sample"] = config.sample_prompt + text
    log("sample (greedy):\n" + summary["sample"])
  return summary


def _train_loop(model, config, state, it, ckpt, meta, mesh, shardings, workdir, progress, log, preempt,
                watchdog) -> dict:
  c = config.model
  start = int(state.step)
  writer = metrics_lib.MetricWriter(workdir, resume_step=start)
  step_fn = jax.jit(make_train_step(model, config), in_shardings=(shardings, batch_sharding(mesh, config.batch_size)),
                    out_shardings=(shardings, None))
  tokens_per_step = config.batch_size * config.seq_len
  peak = metrics_lib.device_peak_flops(c.dtype) * mesh.devices.size
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  bar = tqdm(total=config.total_steps, initial=start, disable=not progress, unit="step", dynamic_ncols=True,
             file=sys.stdout)
  first_loss = last_loss = None
  t_prev = time.perf_counter()
  t_start, compile_s, skipped = t_prev, None, 0
  spikes_in_a_row, preempted = 0, False
  for step in range(start + 1, config.total_steps + 1):
    batch = next(it)
    prev = state
    state, m = step_fn(state, batch)
    m = jax.device_get(m)
    if watchdog:
      watchdog.pet(step)
    if config.sdc_every and step % config.sdc_every == 0:  # [issue 19] rerun, compare gradients bitwise
      state, m = faults.recheck_step(step_fn, prev, batch, (state, m), step, log)
    del prev
    now = time.perf_counter()
    dt, t_prev = now - t_prev, now
    if compile_s is None:
      compile_s = dt
    loss = float(m["loss"])
    if m["nonfinite"]:
      skipped += 1
      log(f"step {step}: non-finite loss {loss} / grad norm {float(m['grad_norm'])} "
          f"({'update skipped' if config.nonfinite == 'skip' else 'stopping'})")
      if config.nonfinite == "stop":
        writer.write(step, {"loss": loss, "nonfinite": 1.0})
        writer.close()
        bar.close()
        raise NonFiniteLoss(f"step {step}: non-finite loss {loss}; last checkpoint: step {ckpt.latest_step()}")
    if m["spike"]:  # [issue 19] spike guard
      skipped += 1
      spikes_in_a_row += 1
      log(f"step {step}: loss spike, update skipped ({spikes_in_a_row} in a row): loss {loss:.4f} "
          f"(limit {float(m['loss_limit']):.4f}), grad norm {float(m['grad_norm']):.4g} "
          f"(limit {float(m['grad_norm_limit']):.4g})")
      if spikes_in_a_row >= config.spike.max_in_a_row:
        writer.close()
        bar.close()
        raise faults.RunStopped(f"step {step}: {spikes_in_a_row} loss spikes in a row (spike.max_in_a_row="
                                f"{config.spike.max_in_a_row}); last checkpoint: step {ckpt.latest_step()}")
    else:
      spikes_in_a_row = 0
    first_loss = loss if first_loss is None else first_loss
    last_loss = loss
    fpt = np.asarray(m["ffn_experts_mean"])
    tok_s = tokens_per_step / dt
    mfu = tok_s * metrics_lib.training_flops_per_token(c, config.seq_len, float(fpt.mean()) if fpt.size else 0) / peak
    if step % config.log_every == 0 or step == config.total_steps:
      scalars = {k: m[k] for k in ("loss", "nll", "z_loss", "balance_loss", "mtp_loss", "grad_norm", "lr", "nonfinite",
                                    "spike")}
      scalars.update(tokens_per_s=tok_s, mfu=mfu, step_seconds=dt, ffn_experts_per_token=float(fpt.mean()))
      writer.write(step, scalars, arrays={"ffn_experts_mean": m["ffn_experts_mean"],
                                          "ffn_experts_std": m["ffn_experts_std"], "expert_load": m["expert_load"]})
    bar.set_postfix(loss=f"{loss:.3f}", nll=f"{float(m['nll']):.3f}", ffn=f"{fpt.mean():.2f}",
                    tok_s=f"{tok_s:.0f}", mfu=f"{mfu:.0%}", refresh=False)
    bar.update(1)
    if not progress and (step % max(config.log_every, 10) == 0 or step == config.total_steps):
      log(f"step {step}: loss {loss:.4f} nll {float(m['nll']):.4f} ffn/token {fpt.mean():.2f} {tok_s:.0f} tok/s")
    preempted = preempt.should_stop(step)  # [issue 19] every process agrees on the step
    ckpt.save(step, state, data=it.get_state(), meta=meta, force=step == config.total_steps or preempted)
    if preempted:
      ckpt.wait()
      break
  bar.close()
  writer.close()
  if preempted:
    if ckpt.latest_step() != step:  # on_save_error=retry and that save failed (said above)
      raise faults.RunStopped(f"preempted after step {step}, but its checkpoint could not be saved; "
                              f"last good checkpoint: step {ckpt.latest_step()}")
    log(preempt.message(step, ckpt.step_dir(step)))
    return {"state": state, "first_loss": first_loss, "last_loss": last_loss, "skipped_steps": skipped,
            "preempted": step, "seconds": time.perf_counter() - t_start, "compile_seconds": compile_s}
  total_s = time.perf_counter() - t_start
  log(f"trained steps {start + 1}..{config.total_steps} in {total_s:.0f}s (first step incl. compile {compile_s:.0f}s); "
      f"loss {first_loss:.3f} -> {last_loss:.3f}; checkpoint {ckpt.directory}, metrics {writer.path}")
  return {"state": state, "first_loss": first_loss, "last_loss": last_loss, "skipped_steps": skipped,
          "seconds": total_s, "compile_seconds": compile_s}
