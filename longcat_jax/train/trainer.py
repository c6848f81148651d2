"""The training job: one path from one CPU device to a multi-host mesh.

    program = build(config)            # mesh from config.mesh, model placed on it, sharded step
    summary = run(config, workdir)     # experiments/train.py is the command-line front end

`build(config, mesh)` is the one place where the mesh, the logical-axis rules, the model's
placement, the state and batch shardings and the jitted step are put together; the planner
(`experiments/plan.py`, via `Program.lower`), the benchmarks and the tests use it too.

Multi-host: every process runs the same program over the global mesh; each reads only its slice
of the global batch (`Program.data_shard`) and the global batch is assembled from process-local
rows; orbax writes every process's shards; metrics, progress bar and sample come from process 0.

Resuming is automatic: if `workdir/checkpoints` holds a complete checkpoint, the run continues
from it (params, optimizer state, expert bias, rng, step, data iterator) on whatever mesh and
process count this run has, and the per-step losses are bitwise those of an uninterrupted run on
the same layout. A finished run says so and only samples.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tqdm import tqdm

from longcat_jax.data import TokenStore, load_tokenizer, make_train_iterator, prepare_default_corpus
from longcat_jax.inference import generate
from longcat_jax.model import LongcatForCausalLM
from longcat_jax.model.placement import LOCAL
from longcat_jax.parallel import distributed, sharding
from longcat_jax.parallel.placement import MeshPlacement
from longcat_jax.train import config as config_lib
from longcat_jax.train import faults, growth, init_from, metrics as metrics_lib, spike as spike_lib
from longcat_jax.train.checkpoint import Checkpointer, with_shardings
from longcat_jax.train.step import (BATCH_KEYS, TrainState, abstract_train_state, init_train_state, make_optimizer,
                                    make_train_step, state_from_params)


class NonFiniteLoss(RuntimeError):
  """Raised with `nonfinite="stop"` when a step's loss or gradient is not finite."""


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


def data_store(config) -> str:
  """The token store path: `data.store`, or the Python-stdlib corpus built under `data.cache_dir`."""
  if config.data.store:
    return config.data.store
  return prepare_default_corpus(config.data.cache_dir, max_files=config.data.max_files or None)


def make_mesh(config, devices=None) -> Mesh:
  """The mesh of `config.mesh` ("data=2,fsdp=-1,expert=8"; -1 fills) over all global devices,
  with `config.dcn_mesh` ("data=2": that many groups of `data` across slices / hosts)."""
  dcn = sharding.parse_mesh(config.dcn_mesh)
  if set(dcn) - {"data"}:
    raise ValueError(f"dcn_mesh={config.dcn_mesh!r}: only the `data` axis can span the slow network")
  pc = sharding.parallel_config(mesh=sharding.parse_mesh(config.mesh), dcn_data=dcn.get("data", 1))
  return sharding.make_mesh(pc, devices)


def make_rules(config, mesh, table=sharding.LOGICAL_AXIS_RULES) -> tuple:
  """The logical-axis table with `config.rules` edits, the batch fitted to the mesh."""
  rules = sharding.override_rules(table, **sharding.parse_rules(config.rules))
  return sharding.fit_batch_rules(mesh, config.batch_size // config.grad_accum_steps, rules)


@dataclasses.dataclass(frozen=True)
class Program:
  """The sharded training program for one config on one mesh (`build`)."""

  config: Any
  mesh: Mesh
  rules: tuple
  model: LongcatForCausalLM          # its placement: LOCAL on one device, MeshPlacement otherwise
  abstract_state: TrainState         # ShapeDtypeStructs carrying `state_shardings`
  state_shardings: TrainState
  batch_sharding: NamedSharding      # of every [global_batch, seq] batch array
  step: Any                          # jitted (state, batch) -> (state, metrics); state donated
  init: Any                          # jitted rng -> TrainState, created sharded

  def abstract_batch(self) -> dict:
    shape = (self.config.batch_size, self.config.seq_len)
    return {k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == "loss_mask" else jnp.int32,
                                    sharding=self.batch_sharding) for k in BATCH_KEYS}

  def lower(self):
    """`jax.stages.Lowered` of the step on abstract state and batch (the planner's input)."""
    return self.step.lower(self.abstract_state, self.abstract_batch())

  def data_shard(self) -> tuple[int, int]:
    """(shard index, shard count) of the global batch that this process reads."""
    return distributed.process_batch_shard(self.mesh, self.rules)

  def global_batch(self, local: dict) -> dict:
    """This process's rows {name: [B_local, S]} -> global arrays [B, S] laid out by `batch_sharding`."""
    return distributed.global_batch({k: local[k] for k in BATCH_KEYS}, self.mesh, self.rules)

  def place(self, state: TrainState) -> TrainState:
    """A (host or differently sharded) state laid out by `state_shardings`."""
    return jax.device_put(state, self.state_shardings)


def build(config, mesh: Mesh | None = None, *, rules=None) -> Program:
  """Mesh, rules, placed model, state and batch shardings and the jitted step for `config`.

  `mesh` defaults to `make_mesh(config)`; `rules` to the logical-axis table with `config.rules`
  edits (a whole table may be passed instead, e.g. the planner's layout edits).
  """
  config_lib.validate(config)
  mesh = make_mesh(config) if mesh is None else mesh
  rules = make_rules(config, mesh) if rules is None else tuple(rules)
  placement = LOCAL if mesh.size == 1 else MeshPlacement(mesh, rules, config.ep_transport,
                                                            int(config.ep_chunk_tokens))
  model = LongcatForCausalLM(config.model, placement=placement)
  var_sh = sharding.variable_shardings(model, mesh, rules)
  tx, _ = make_optimizer(model, config)
  shapes = abstract_train_state(model, config)
  state_sh = sharding.train_state_shardings(tx, shapes, var_sh, mesh)
  abstract = with_shardings(shapes, state_sh)
  batch_sh = sharding.batch_sharding(mesh, rules, (config.batch_size, config.seq_len))
  step = jax.jit(make_train_step(model, config), in_shardings=(state_sh, batch_sh),
                 out_shardings=(state_sh, NamedSharding(mesh, P())), donate_argnums=(0,))
  local_model = model.clone(placement=LOCAL)  # init values do not depend on the placement
  init = jax.jit(lambda rng: init_train_state(local_model, config, rng), out_shardings=state_sh)
  return Program(config, mesh, rules, model, abstract, state_sh, batch_sh, step, init)


def initial_state(program: Program, rng, log=_log) -> TrainState:
  """Fresh state (created sharded), a released checkpoint's (`init_from="hf:DIR"`,
  `train/init_from.py`), or a grown one when `config.init_from` names a trained run's checkpoints."""
  config = program.config
  if not config.init_from:
    return program.init(jnp.asarray(rng))
  if init_from.is_hf(config.init_from):  # loaded shard by shard onto the mesh, never whole on one host
    shardings = {"params": program.state_shardings.params, "expert_bias": program.state_shardings.expert_bias}
    return program.place(init_from.initial_state_from_hf(program.model.clone(placement=LOCAL), config, rng, log,
                                                         shardings=shardings))
  if not os.path.isdir(config.init_from):  # before orbax: one error, no background thread
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
  model = program.model.clone(placement=LOCAL)
  return program.place(state_from_params(model, config, params, bias, jax.random.split(jnp.asarray(rng))[0]))


def greedy_sample(model, params, expert_bias, prompt: list[int], num_tokens: int) -> list[int]:
  """Greedy continuation of `prompt` (`longcat_jax.inference.generate`)."""
  out = generate(model, {"params": params, "expert_bias": expert_bias}, [prompt], num_tokens,
                 temperature=0.0, eos_token_id=())
  return [int(t) for t in out.tokens[0][:int(out.num_tokens[0])]]


def run(config, workdir: str, *, progress: bool = True, log=_log, mesh: Mesh | None = None) -> dict:
  """Trains `config` in `workdir` (resuming if possible) on `mesh` (default `make_mesh(config)`,
  over every process's devices); returns a summary dict (with the final `state` and the `program`)."""
  if init_from.is_hf(config.init_from):  # the model config is the checkpoint's
    config = init_from.resolve_config(config, workdir, log)
  if config.compilation_cache:
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(config.compilation_cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  program = build(config, mesh)
  os.makedirs(workdir, exist_ok=True)
  c = config.model

  store_path = data_store(config)
  store = TokenStore.open(store_path)
  if store.vocab_size > c.vocab_size:
    raise ValueError(f"data store {store_path} has vocab_size={store.vocab_size} > model.vocab_size={c.vocab_size}")
  shard, shards = program.data_shard()
  it = make_train_iterator(store_path, config.seq_len, config.batch_size, config.seed, shard, shards,
                           num_threads=config.data.num_threads, prefetch=config.data.prefetch)

  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), every=config.checkpoint_every,
                      keep=config.keep_checkpoints, async_save=config.async_checkpoint,
                      on_save_error=config.on_save_error, log=log)
  meta = {"config": config.to_json()}
  if ckpt.latest_step() is not None:
    # The newest checkpoint that reads and verifies (strict_resume: refuse a bad one).
    guard = jax.device_put(spike_lib.init_stats(), program.state_shardings.guard)
    state, data_state, _, _ = ckpt.restore_intact(program.abstract_state, strict=config.strict_resume,
                                                  defaults={"guard": guard})
    it.set_state(data_state)
    log(f"resumed from {ckpt.directory} step {int(state.step)}")
  else:
    try:
      state = initial_state(program, jax.random.PRNGKey(config.seed), log)
    except BaseException:
      ckpt.close()  # else orbax's threads print a second traceback at interpreter exit
      raise
  start = int(state.step)
  mesh_text = ",".join(f"{k}={v}" for k, v in program.mesh.shape.items() if v > 1) or "1 device"
  log(f"mesh {mesh_text} ({program.mesh.size} devices, {jax.process_count()} process"
      f"{'es' if jax.process_count() > 1 else ''}); this process reads batch shard {shard} of {shards}")

  tokenizer = load_tokenizer(store.meta.get("tokenizer", "byte"))
  summary = {"workdir": workdir, "start_step": start, "total_steps": config.total_steps, "state": state,
             "program": program}
  if start >= config.total_steps:
    log(f"already done: step {start} of {config.total_steps} (checkpoint in {ckpt.directory})")
  else:
    preempt = faults.Preemption(log=log)  # SIGTERM / SIGINT: stop after the step in flight, save
    watchdog = faults.Watchdog(config.step_timeout_s) if config.step_timeout_s else None  # hangs
    try:
      summary.update(_train_loop(program, state, it, ckpt, meta, workdir, progress, log, preempt, watchdog))
    finally:
      preempt.close()
      if watchdog:
        watchdog.close()
    state = summary["state"]
  ckpt.close()

  if config.sample_tokens > 0 and not summary.get("preempted"):
    if jax.process_count() > 1:
      log("sample skipped: multi-process run (sample from the checkpoint with python -m longcat_jax.generate)")
    else:
      prompt = tokenizer.encode(config.sample_prompt)
      if getattr(tokenizer, "bos_id", None) is not None:
        prompt = [tokenizer.bos_id] + list(prompt)
      out = greedy_sample(program.model, state.params, state.expert_bias, list(prompt), config.sample_tokens)
      summary["sample"] = config.sample_prompt + tokenizer.decode(out)
      log("sample (greedy):\n" + summary["sample"])
  return summary


def _train_loop(program: Program, state, it, ckpt, meta, workdir, progress, log, preempt, watchdog) -> dict:
  config, c = program.config, program.config.model
  start = int(state.step)
  main_process = jax.process_index() == 0
  writer = metrics_lib.MetricWriter(workdir, resume_step=start) if main_process else metrics_lib.NullWriter()
  tokens_per_step = config.batch_size * config.seq_len
  peak = metrics_lib.device_peak_flops(c.dtype) * program.mesh.size
  bar = tqdm(total=config.total_steps, initial=start, disable=not (progress and main_process), unit="step",
             dynamic_ncols=True, file=sys.stdout)
  first_loss = last_loss = None
  t_start = time.perf_counter()
  step_fn = program.lower().compile()
  compile_s = time.perf_counter() - t_start
  distributed.barrier(f"longcat_compiled_{start}")  # processes start stepping together
  t_prev, skipped = time.perf_counter(), 0
  spikes_in_a_row, preempted = 0, False
  for step in range(start + 1, config.total_steps + 1):
    batch = program.global_batch(next(it))
    sdc_check = config.sdc_every and step % config.sdc_every == 0
    prev = jax.tree.map(jnp.copy, state) if sdc_check else None   # the step donates `state`
    state, m = step_fn(state, batch)
    m = jax.device_get(m)
    if watchdog:
      watchdog.pet(step)
    if sdc_check:  # rerun on the same inputs (each rerun on a copy), compare gradients bitwise
      state, m = faults.recheck_step(lambda s, b: step_fn(jax.tree.map(jnp.copy, s), b), prev, batch,
                                     (state, m), step, log)
      del prev
    now = time.perf_counter()
    dt, t_prev = now - t_prev, now
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
    if m["spike"]:  # spike guard (train/spike.py): the update was dropped inside the step
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
    preempted = preempt.should_stop(step)  # every process agrees on the step
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
  log(f"trained steps {start + 1}..{config.total_steps} in {total_s:.0f}s (incl. compile {compile_s:.0f}s); "
      f"loss {first_loss:.3f} -> {last_loss:.3f}; checkpoint {ckpt.directory}, metrics {writer.path}")
  return {"state": state, "first_loss": first_loss, "last_loss": last_loss, "skipped_steps": skipped,
          "seconds": total_s, "compile_seconds": compile_s}
