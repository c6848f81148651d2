"""One small training-step case shared by test_sharding.py and test_multihost.py.

As a script it is one process of the multi-host test (started by test_multihost.py):

    python tests/parallel_case.py --process-id 0 --num-processes 2 --port 12345 --out r0.npz

joins a gloo process group on 127.0.0.1 with 4 CPU devices per process, runs the sharded step on
the global 8-device mesh with this process's half of the batch, and writes loss, expert load and
gradients (gathered to host) to `--out`.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import numpy as np

BATCH, SEQ = 8, 16
# XLA:CPU backend optimisation off: halves compile time of these tiny programs, same numerics.
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}
MESH_MULTIHOST = dict(data=2, expert=2, tensor=2)


def config():
  import longcat_jax
  return longcat_jax.get_config("tiny", kernels="xla")


def case():
  """(model, variables with a nonzero expert bias, batch of numpy [BATCH, SEQ] arrays)."""
  import jax
  import longcat_jax
  cfg = config()
  model = longcat_jax.LongcatForCausalLM(cfg)
  variables = longcat_jax.init_variables(model, jax.random.key(0))
  # Bias large enough to change which experts are selected (zero experts are on in `tiny`).
  variables["expert_bias"] = jax.tree.map(
      lambda b: 0.05 * jax.random.normal(jax.random.key(1), b.shape, b.dtype), variables["expert_bias"])
  rng = np.random.default_rng(0)
  ids = rng.integers(3, cfg.vocab_size, (BATCH, SEQ + 1)).astype(np.int32)
  seg = np.ones((BATCH, SEQ), np.int32)
  seg[:, SEQ // 2 + 3:] = 2  # two packed documents per row
  pos = np.concatenate([np.arange(SEQ // 2 + 3), np.arange(SEQ - SEQ // 2 - 3)]).astype(np.int32)
  batch = dict(input_ids=ids[:, :-1], targets=ids[:, 1:], segment_ids=seg,
               positions=np.broadcast_to(pos, (BATCH, SEQ)).copy())
  return model, variables, batch


def make_step(model):
  """(params, expert_bias, batch) -> ((loss, aux), grads): next-token CE (float32) plus a
  balance-style term from the differentiable global routing statistics."""
  import jax
  import jax.numpy as jnp
  cfg = model.config

  def loss_fn(params, expert_bias, batch):
    logits, out = model.apply({"params": params, "expert_bias": expert_bias}, batch["input_ids"],
                              batch["positions"], batch["segment_ids"],
                              mutable=["expert_load", "intermediates"])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    ce = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1).mean()
    moe = out["intermediates"]["decoder"]["layers"]["moe"]
    load = out["expert_load"]["decoder"]["layers"]["moe"]["router"]         # [L, N+Z]
    prob = moe["router_prob_mean"][0]                                       # [L, N+Z]
    balance = (prob * load / load.sum(-1, keepdims=True)).sum() * (cfg.num_ffn_experts + cfg.zero_experts)
    aux = dict(expert_load=out["expert_load"], ce=ce,
               ffn_per_token=moe["ffn_experts_per_token"][0].astype(jnp.float32).mean())
    return ce + 0.01 * balance, aux

  return jax.value_and_grad(loss_fn, has_aux=True)


@functools.lru_cache(maxsize=None)
def single_device_result():
  """The reference: the same step, jitted on one device, no mesh. Cached per process."""
  import jax
  model, variables, batch = case()
  dev = jax.devices()[0]
  put = lambda t: jax.device_put(t, dev)
  args = (put(variables["params"]), put(variables["expert_bias"]), put(batch))
  (loss, aux), grads = jax.jit(make_step(model)).lower(*args).compile(COMPILER_OPTIONS)(*args)
  return jax.tree.map(np.asarray, dict(loss=loss, aux=aux, grads=grads))


def sharded_result(mesh, parallel, global_batch=None):
  """The step with the model on a `MeshPlacement` and explicit in/out shardings; results gathered
  to host."""
  import jax
  from longcat_jax.parallel import MeshPlacement, distributed, sharding
  model, variables, batch = case()
  model = model.clone(placement=MeshPlacement.from_parallel(mesh, parallel))
  vs = sharding.variable_shardings(model, mesh)
  bs = sharding.batch_sharding(mesh, shape=(BATCH, SEQ))
  batch_sh = {k: bs for k in batch}
  if global_batch is None:
    global_batch = {k: jax.device_put(v, bs) for k, v in batch.items()}
  params = jax.device_put(variables["params"], vs["params"])
  bias = jax.device_put(variables["expert_bias"], vs["expert_bias"])
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  step = jax.jit(make_step(model), in_shardings=(vs["params"], vs["expert_bias"], batch_sh),
                 out_shardings=((replicated, replicated), vs["params"]))
  (loss, aux), grads = step.lower(params, bias, global_batch).compile(COMPILER_OPTIONS)(
      params, bias, global_batch)
  return distributed.to_host(dict(loss=loss, aux=aux, grads=grads))


def relative_errors(result, reference):
  """Max over leaves of ||a - b|| / ||b|| for loss and gradients."""
  import jax
  rel = lambda a, b: float(np.linalg.norm(np.asarray(a, np.float64) - b) / max(np.linalg.norm(b), 1e-30))
  grads = jax.tree.leaves(jax.tree.map(rel, result["grads"], reference["grads"]))
  return rel(result["loss"], reference["loss"]), max(grads)


def _main():
  p = argparse.ArgumentParser()
  p.add_argument("--process-id", type=int, required=True)
  p.add_argument("--num-processes", type=int, required=True)
  p.add_argument("--port", type=int, required=True)
  p.add_argument("--out", required=True)
  a = p.parse_args()
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from longcat_jax.parallel import distributed
  distributed.initialize(f"127.0.0.1:{a.port}", a.num_processes, a.process_id,
                         cpu_collectives="gloo", num_cpu_devices=4)
  import jax
  jax.config.update("jax_default_matmul_precision", "highest")
  from longcat_jax.parallel import sharding
  pc = sharding.parallel_config(mesh=dict(MESH_MULTIHOST, fsdp=1))
  mesh = sharding.make_mesh(pc)
  _, _, batch = case()
  rows = distributed.process_rows(BATCH)
  local = {k: v[rows] for k, v in batch.items()}  # this process's rows only
  result = sharded_result(mesh, pc, distributed.global_batch(local, mesh))
  flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(result)[0]}
  np.savez(a.out, **flat)
  print(f"process {jax.process_index()}/{jax.process_count()}: {len(jax.local_devices())} local of "
        f"{jax.device_count()} devices, loss {float(result['loss']):.6f}", flush=True)


if __name__ == "__main__":
  _main()
