"""TPU kernels and TPU plans, tested on a CPU host, two ways.

1. Correctness in Pallas's TPU interpret mode (`pltpu.InterpretParams(detect_races=True)`: TPU
   memory spaces, DMAs and semaphores simulated, a happens-before race detector on) against the
   references, forward and gradients, on the odd shapes of test_kernels.py.
2. Compilation by the real TPU compiler (libtpu's compile-only devices, nothing runs) for two TPU
   generations, v5p and v6e: every TPU kernel, and the tiny model's sharded training step with
   them through `experiments/plan.py --target tpu:...` (which also checks the TPU report).

`LONGCAT_TEST_KERNELS=interpret_tpu pytest tests/test_tpu.py` also runs the whole tiny model
and the sharded loss + gradient step with the TPU kernels interpreted (kernels="interpret:tpu")
against kernels="xla" (slow: ~1 CPU-minute more).
"""

from __future__ import annotations

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpreter

import pallas_kernels as pk
from pallas_kernels.grouped_matmul import grouped_matmul_op, grouped_matmul_reference
from pallas_kernels.mla_attention import mla_attention_op, mla_attention_reference
from pallas_kernels.mla_decode import mla_decode_op
from pallas_kernels.registry import current_platform
from pallas_kernels.sparse_attention import sparse_attention_op, sparse_attention_reference
from jaxpr_walk import equations
from test_kernels import (B, BF16_TOL, DQK, DV, F32_TOL, H, S, SEGMENTS, assert_close,
                          assert_tree_close, normal)

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu not installed (pip install -e '.[tpu]')")
WHOLE_MODEL = os.environ.get("LONGCAT_TEST_KERNELS") == "interpret_tpu"
RACES = pltpu.InterpretParams(detect_races=True)
GENERATIONS = ["v5p:2x2x1", "v6e:2x2"]


@pytest.fixture
def race_detector(monkeypatch):
  """Every interpreted TPU kernel call creates a race-detection state; keep them all (the
  interpreter replaces its global one per call) so a test can check none found a race."""
  states = []
  base = tpu_interpreter.RaceDetectionState

  class Recorded(base):
    def __init__(self, *a, **kw):
      super().__init__(*a, **kw)
      states.append(self)

  monkeypatch.setattr(tpu_interpreter, "RaceDetectionState", Recorded)
  yield states
  assert states, "no TPU kernel ran under the race detector"
  assert not any(s.races_found for s in states), "the TPU interpreter's race detector found a race"


def value_and_grads(fn, dout, argnums):
  def loss(*args):
    out = fn(*args)
    return jnp.sum(out.astype(jnp.float32) * dout), out
  return jax.jit(jax.value_and_grad(loss, argnums=argnums, has_aux=True))


# ---------------------------------------------------------------------------------------------
# Registry: the TPU kernels are tried first on TPU, and a "MODE:tpu" implementation targets it.


def test_tpu_kernels_registered_first_on_tpu():
  names = lambda op, mode: [i.name for i, _ in op.candidates(mode, "tpu")]
  assert names(mla_attention_op, "auto") == ["splash", "xla_chunked", "xla"]
  assert names(pk.mla_decode.mla_decode_op, "auto") == ["mosaic", "xla"]
  assert names(sparse_attention_op, "auto") == ["mosaic", "xla"]
  assert names(grouped_matmul_op, "auto") == ["megablox", "xla"]
  # "interpret:tpu": auto's choice on TPU with the kernels interpreted, whatever JAX runs on.
  assert [(i.name, interp) for i, interp in mla_attention_op.candidates("interpret:tpu")] == [
      ("splash", True), ("xla_chunked", False), ("xla", False)]
  assert [i.name for i, _ in mla_attention_op.candidates("pallas:tpu")] == ["splash"]
  assert [i.name for i, _ in mla_attention_op.candidates("auto:cpu")] == ["xla_chunked", "xla"]
  for bad in ("xla:tpu", "auto:tpuv5", "splash"):
    with pytest.raises(ValueError, match="implementation"):
      mla_attention_op.candidates(bad)


def test_target_platform_is_visible_while_dispatching():
  """XLA paths that differ by platform (ragged_dot on TPU) follow the "MODE:PLATFORM" target."""
  seen = []
  op = pk.Op("probe")
  op.register("xla", kind="xla")(lambda: seen.append(current_platform()))
  op(implementation="auto:tpu")
  op(implementation="xla")
  assert seen == ["tpu", current_platform()] and current_platform() != "tpu"


def test_config_accepts_kernel_targets():
  from longcat_jax import config
  config.validate(config.get_config("tiny", kernels="interpret:tpu"))
  for bad in ("xla:tpu", "auto:npu"):
    with pytest.raises(ValueError, match="kernels"):
      config.validate(config.get_config("tiny", kernels=bad))


# ---------------------------------------------------------------------------------------------
# Interpret mode, race detector on.


@pytest.mark.parametrize("dtype,tol,causal,segments", [
    (jnp.float32, F32_TOL, True, True), (jnp.float32, F32_TOL, False, False),
    (jnp.bfloat16, BF16_TOL, True, True)])
def test_splash_mla_attention_interpret(race_detector, dtype, tol, causal, segments):
  """Dqk = 24 != Dv = 16, S = 37 (padded to one 128 block), three packed documents in row 0."""
  q, k, v = normal(0, (B, S, H, DQK), dtype), normal(1, (B, S, H, DQK), dtype), normal(2, (B, S, H, DV), dtype)
  dout = normal(3, (B, S, H, DV))
  kw = dict(causal=causal, sm_scale=0.3, segment_ids=SEGMENTS if segments else None)
  splash = mla_attention_op.get("splash").fn
  (_, out), grads = value_and_grads(lambda q, k, v: splash(q, k, v, interpret=RACES, **kw), dout, (0, 1, 2))(q, k, v)
  (_, ref), grads_r = value_and_grads(lambda q, k, v: mla_attention_reference(q, k, v, **kw), dout, (0, 1, 2))(q, k, v)
  assert out.shape == (B, S, H, DV) and out.dtype == dtype
  assert_close(out, ref, tol, "out")
  assert_tree_close(grads, grads_r, tol, "dq, dk, dv")


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, F32_TOL), (jnp.bfloat16, BF16_TOL)])
def test_mla_decode_tpu_interpret(race_detector, dtype, tol):
  b, h, r, dr, length = 3, 4, 16, 8, 45
  args = [normal(i, s, dtype) for i, s in enumerate([(b, h, r), (b, h, dr), (b, length, r), (b, length, dr)])]
  lengths = jnp.array([1, 45, 17], jnp.int32)  # length 1: two of the three splits see nothing
  kernel = mla_decode_op.get("mosaic").fn
  out = jax.jit(lambda *a: kernel(*a, lengths, sm_scale=0.2, block_k=8, num_splits=3, interpret=RACES))(*args)
  ref = pk.mla_decode_reference(*args, lengths, sm_scale=0.2)
  assert out.shape == (b, h, r) and out.dtype == dtype
  assert_close(out, ref, tol, "out")


@pytest.mark.parametrize("dtype,tol,block_k", [(jnp.float32, F32_TOL, 8), (jnp.bfloat16, BF16_TOL, 64)])
def test_sparse_attention_tpu_interpret(race_detector, dtype, tol, block_k):
  """K = 11 selected of T = 23 keys (empty slots, a query with none at all), Dk 24 != Dv 16."""
  b, s, h, t, dk, dv, kk = 2, 5, 4, 23, 24, 16, 11
  q, k, v = normal(0, (b, s, h, dk), dtype), normal(1, (b, t, dk), dtype), normal(2, (b, t, dv), dtype)
  indices = jax.random.randint(jax.random.key(5), (b, s, kk), -1, t).at[0, 0].set(-1)
  dout = normal(3, (b, s, h, dv))
  kernel = sparse_attention_op.get("mosaic").fn
  f = lambda q, k, v: kernel(q, k, v, indices, sm_scale=0.3, block_k=block_k, interpret=RACES)
  (_, out), grads = value_and_grads(f, dout, (0, 1, 2))(q, k, v)
  (_, ref), grads_r = value_and_grads(lambda q, k, v: sparse_attention_reference(q, k, v, indices, sm_scale=0.3),
                                      dout, (0, 1, 2))(q, k, v)
  assert not np.asarray(out[0, 0], np.float32).any(), "a query with no selected key returns zeros"
  assert_close(out, ref, tol, "out")
  assert_tree_close(grads, grads_r, tol, "dq, dk, dv")


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, F32_TOL), (jnp.bfloat16, BF16_TOL)])
def test_megablox_interpret_races(race_detector, dtype, tol):
  """megablox gmm / tgmm (forward, dlhs, drhs) in the TPU interpreter; 163 of 200 rows used."""
  gs = jnp.array([40, 0, 70, 53], jnp.int32)
  lhs, rhs, dy = normal(0, (200, 128), dtype), normal(1, (4, 128, 128), dtype), normal(2, (200, 128))
  mb = grouped_matmul_op.get("megablox").fn
  (_, out), grads = value_and_grads(lambda a, b: mb(a, b, gs, block_m=32, interpret=RACES), dy, (0, 1))(lhs, rhs)
  (_, ref), grads_r = value_and_grads(lambda a, b: grouped_matmul_reference(a, b, gs), dy, (0, 1))(lhs, rhs)
  assert_close(out, ref, tol, "out")
  assert not np.asarray(out[163:], np.float32).any()
  assert_tree_close(grads, grads_r, tol, "dlhs, drhs")


# ---------------------------------------------------------------------------------------------
# The TPU compiler (libtpu), two generations.


def _kernel_names(hlo: str) -> set[str]:
  """Names of the Mosaic kernels in compiled TPU HLO (the custom calls' instruction names)."""
  import re
  return {re.sub(r"[.\d]+$", "", m) for m in
          re.findall(r"%([\w.\-]+) = [^\n]*custom_call_target=\"tpu_custom_call\"", hlo)}


@needs_libtpu
@pytest.mark.parametrize("topology", GENERATIONS)
def test_every_tpu_kernel_compiles(topology):
  """One program holding every kernel, forward and backward, compiled by XLA:TPU + Mosaic for
  one chip of each generation at LongCat's head dims (192 / 128, latent 512 + rope 64)."""
  from longcat_jax.parallel import tpu_target
  target = tpu_target.Target.parse(topology)
  mesh = tpu_target.make_mesh(target, {"data": -1})
  one_chip = jax.sharding.Mesh(np.asarray(mesh.devices).reshape(-1)[:1], ("x",))
  rep = jax.sharding.NamedSharding(one_chip, jax.sharding.PartitionSpec())
  sds = lambda shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype, sharding=rep)
  impl = "pallas:tpu"

  def everything(q, k, v, seg, ql, qr, cl, cr, lengths, sq, sk, sv, idx, lhs, rhs, gs):
    attn = lambda q, k, v: pk.mla_attention(q, k, v, segment_ids=seg, implementation=impl)
    sparse = lambda q, k, v: pk.sparse_attention.sparse_attention(q, k, v, idx, sm_scale=0.1, implementation=impl)
    gmm = lambda a, b: pk.grouped_matmul(a, b, gs, implementation=impl)
    total = lambda f: lambda *a: jnp.sum(f(*a).astype(jnp.float32))
    return (jax.value_and_grad(total(attn), argnums=(0, 1, 2))(q, k, v),
            pk.mla_decode_attention(ql, qr, cl, cr, lengths, sm_scale=0.1, implementation=impl),
            jax.value_and_grad(total(sparse), argnums=(0, 1, 2))(sq, sk, sv),
            jax.value_and_grad(total(gmm), argnums=(0, 1))(lhs, rhs))

  args = (sds((1, 256, 2, 192)), sds((1, 256, 2, 192)), sds((1, 256, 2, 128)), sds((1, 256), jnp.int32),
          sds((2, 16, 512)), sds((2, 16, 64)), sds((2, 1024, 512)), sds((2, 1024, 64)), sds((2,), jnp.int32),
          sds((1, 4, 16, 576)), sds((1, 512, 576)), sds((1, 512, 512)), sds((1, 4, 256), jnp.int32),
          sds((512, 256)), sds((4, 256, 128)), sds((4,), jnp.int32))
  with jax.default_matmul_precision("default"):  # conftest's "highest" asks Mosaic for fp32 bf16 dots
    compiled = jax.jit(everything).lower(*args).compile()
  names = _kernel_names(compiled.as_text())
  for kernel in ("splash_mha_fwd_segmented", "splash_mha_dq_segmented", "splash_mha_dkv_segmented",
                 "mla_decode_tpu", "sparse_attention_tpu", "_gmm", "tgmm"):  # megablox: gmm, tgmm
    assert any(kernel in n for n in names), (kernel, names)
  assert compiled.memory_analysis().temp_size_in_bytes > 0


@needs_libtpu
@pytest.mark.parametrize("topology,mesh,sparse", [("v5p:2x2x2", "fsdp=2,expert=4", True),
                                                  ("v6e:2x4", "fsdp=2,expert=2,tensor=2", False)])
def test_plan_compiles_sharded_step_for_tpu(topology, mesh, sparse):
  """`plan.py --target tpu:...` on the tiny model widened so megablox takes the experts (K and
  the per-device N multiples of 128, also with the FFN split over tensor=2): the trainer's sharded step compiled by the TPU compiler with the TPU
  kernels inside (megablox, and splash attention, or with LongCat-2.0's indexer-selected sparse
  attention on, the sparse kernel in its place), and the TPU report."""
  from experiments import plan
  from longcat_jax.parallel import tpu_target
  figures = {}
  argv = ["--model", "tiny", "--target", f"tpu:{topology}", "--mesh", mesh, "--seq", "128", "--batch", "8",
          "--set", "hidden_size=128", "--set", "expert_ffn_size=256", "--set", "num_layers=1"]
  if sparse:
    argv += ["--set", "sparse_attention={'index_heads': 2, 'index_dim': 16, 'top_k': 32, 'init_tokens': 4, "
             "'local_tokens': 16}"]
  with jax.default_matmul_precision("default"):  # as the trainer runs (conftest sets "highest")
    assert plan.main(argv, figures=figures) == 0  # fits
  tpu_plan = figures["tpu_plan"]
  assert tpu_plan.target.chip.name == topology.split(":")[0]
  names = _kernel_names(figures["hlo"])
  attention = ("sparse_attention_tpu",) if sparse else ("splash_mha_fwd", "splash_mha_dq", "splash_mha_dkv")
  for kernel in attention + ("gmm", "tgmm"):
    assert any(kernel in n for n in names), (kernel, names)
  assert 0 < tpu_plan.memory["total"] < tpu_plan.target.chip.hbm_bytes
  assert tpu_plan.flops > 0 and tpu_plan.bytes_accessed > 0 and tpu_plan.roofline_seconds > 0
  assert 0 < tpu_plan.mfu <= 1
  kinds = {c.kind for c in tpu_plan.collectives}
  assert "all-gather" in kinds, kinds  # fsdp weights
  assert any(c.category == "moe/dispatch" for c in tpu_plan.collectives)
  report = tpu_target.format_plan(tpu_plan)
  assert "ROOFLINE ESTIMATE" in report and "ScMoE overlap" in report


# ---------------------------------------------------------------------------------------------
# Plan parsing (no compile).


def test_topology_names():
  from longcat_jax.parallel import tpu_target
  parse = tpu_target.Target.parse
  assert parse("v5p-256").shape == (4, 4, 8) and parse("v5p-256").num_devices == 128  # 256 cores
  assert parse("v5p-2048").shape == (8, 8, 16)
  assert parse("v6e-256").shape == (16, 16) and parse("v5e-8").shape == (2, 4)
  assert parse("v5p:4x4x4,slices=2").num_devices == 128
  for bad in ("v5p-24", "v7x-8", "v5p:4x4", "v5p-256,slice=2"):
    with pytest.raises(ValueError, match="TPU target"):
      parse(bad)


def test_collectives_overlap_from_schedule():
  """A hand-written scheduled module: an async all-gather with a dense-MLP fusion between start
  and done overlaps it; a synchronous all-to-all overlaps nothing."""
  from longcat_jax.parallel import tpu_target
  hlo = """HloModule m, is_scheduled=true

ENTRY %main (p: bf16[8,128]) -> bf16[64,128] {
  %p = bf16[8,128]{1,0} parameter(0)
  %ag-start = (bf16[8,128]{1,0}, bf16[64,128]{1,0}) all-gather-start(%p), dimensions={0}, metadata={op_name="jit(step)/layers/moe/shard_map/all_gather"}
  %fusion.1 = bf16[8,128]{1,0} fusion(%p), kind=kLoop, calls=%f, metadata={op_name="jit(step)/layers/mlp_0/dot_general"}
  %gte = bf16[8,128]{1,0} get-tuple-element(%ag-start), index=0
  %ag-done = bf16[64,128]{1,0} all-gather-done(%ag-start), metadata={op_name="jit(step)/layers/moe/shard_map/all_gather"}
  %a2a = bf16[8,128]{1,0} all-to-all(%fusion.1), dimensions={0}, metadata={op_name="jit(step)/layers/moe/shard_map/all_to_all"}
  ROOT %out = bf16[64,128]{1,0} add(%ag-done, %ag-done), metadata={op_name="jit(step)/layers/mlp_1/add"}
}
"""
  cols = {c.kind: c for c in tpu_target.collectives(hlo)}
  assert set(cols) == {"all-gather", "all-to-all"}
  assert cols["all-gather"].asynchronous and cols["all-gather"].overlapped == {"mlp_0": 1}
  assert cols["all-gather"].bytes == 64 * 128 * 2 + 8 * 128 * 2  # the start's tuple result
  assert not cols["all-to-all"].asynchronous and not cols["all-to-all"].overlapped
  assert cols["all-to-all"].category == "moe/dispatch"


# ---------------------------------------------------------------------------------------------
# The whole tiny model with the TPU kernels interpreted (LONGCAT_TEST_KERNELS=interpret_tpu).


@pytest.mark.skipif(not WHOLE_MODEL, reason="set LONGCAT_TEST_KERNELS=interpret_tpu")
def test_tiny_model_tpu_kernels_interpret_matches_xla():
  import longcat_jax
  ids = jax.random.randint(jax.random.key(1), (2, 40), 0, 320)
  seg = jnp.repeat(jnp.array([[1] * 25 + [2] * 15]), 2, 0)
  pos = jnp.repeat(jnp.concatenate([jnp.arange(25), jnp.arange(15)])[None], 2, 0)
  models = {k: longcat_jax.LongcatForCausalLM(longcat_jax.get_config("tiny", kernels=k))
            for k in ("interpret:tpu", "xla")}
  variables = jax.jit(models["xla"].init)(jax.random.key(0), ids)

  def run(model):
    def loss(params):
      logits, _ = model.apply({**variables, "params": params}, ids, pos, seg,
                              mutable=["expert_load", "intermediates"])
      logp = jax.nn.log_softmax(logits.astype(jnp.float32))
      return -jnp.mean(jnp.take_along_axis(logp, jnp.roll(ids, -1, 1)[..., None], -1)), logits
    traced = jax.jit(jax.value_and_grad(loss, has_aux=True)).trace(variables["params"])
    names = {e.params["name"] for e in equations(traced.jaxpr.jaxpr) if e.primitive.name == "pallas_call"}
    (_, logits), grads = traced.lower().compile()(variables["params"])
    return logits, grads, names

  logits, grads, names = run(models["interpret:tpu"])
  logits_r, grads_r, none = run(models["xla"])
  assert {n for n in names if n.startswith("splash_mha_")} and not none, names
  assert_close(logits, logits_r, F32_TOL, "logits")
  assert_tree_close(grads, grads_r, F32_TOL, "grads")


@pytest.mark.skipif(not WHOLE_MODEL, reason="set LONGCAT_TEST_KERNELS=interpret_tpu")
def test_sharded_step_tpu_kernels_interpret_matches_xla():
  """The sharded loss + gradient on 2 simulated devices (expert=2: tokens dispatched by the
  expert-parallel shard_map), kernels "interpret:tpu" (each device runs splash on its own rows,
  tpu_common.on_each_device) against "xla": same loss, logits and gradients. Two devices, not
  8: the TPU interpreter blocks a host thread per simulated device until all of them reach the
  kernel, and with 8 devices on a 2-core CI machine XLA:CPU's collectives time out waiting."""
  import longcat_jax
  from longcat_jax.parallel import sharding
  b, s = 2, 8
  pc = sharding.parallel_config(mesh=dict(expert=2))
  mesh = sharding.make_mesh(pc, devices=jax.devices()[:2])
  rng = np.random.default_rng(0)
  ids = rng.integers(3, 320, (b, s + 1)).astype(np.int32)
  seg = np.repeat(np.array([[1] * 5 + [2] * 3]), b, 0).astype(np.int32)
  pos = np.repeat(np.array([[0, 1, 2, 3, 4, 0, 1, 2]]), b, 0).astype(np.int32)
  models = {k: longcat_jax.LongcatForCausalLM(longcat_jax.get_config("tiny", kernels=k))
            for k in ("interpret:tpu", "xla")}
  variables = longcat_jax.init_variables(models["xla"], jax.random.key(0))

  def run(kernels):
    model = models[kernels]

    def loss_fn(params, inputs, targets):
      logits, _ = model.apply({**variables, "params": params}, inputs, pos, seg,
                              mutable=["expert_load", "intermediates"])
      logp = jax.nn.log_softmax(logits.astype(jnp.float32))
      return -jnp.take_along_axis(logp, targets[..., None], -1).mean(), logits

    vs = sharding.variable_shardings(model, mesh)
    bs = sharding.batch_sharding(mesh, shape=(b, s))
    params = jax.device_put(variables["params"], vs["params"])
    with sharding.mesh_context(mesh, parallel=pc):
      step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True), in_shardings=(vs["params"], bs, bs))
      traced = step.trace(params, ids[:, :-1], ids[:, 1:])
      (loss, logits), grads = traced.lower().compile()(params, ids[:, :-1], ids[:, 1:])
    shard_maps = [e for e in equations(traced.jaxpr.jaxpr) if e.primitive.name == "shard_map"]
    in_sm = {e.params["name"] for sm in shard_maps for e in equations(sm.params["jaxpr"])
             if e.primitive.name == "pallas_call"}
    return loss, logits, grads, in_sm

  loss, logits, grads, in_sm = run("interpret:tpu")
  loss_r, logits_r, grads_r, none = run("xla")
  assert any(n.startswith("splash_mha_fwd") for n in in_sm) and not none, in_sm
  assert_close(loss, loss_r, F32_TOL, "loss")
  assert_close(logits, logits_r, F32_TOL, "logits")
  assert_tree_close(grads, grads_r, F32_TOL, "grads")
