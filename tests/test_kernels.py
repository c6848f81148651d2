"""pallas_kernels: every Pallas kernel in interpret mode against its pure-jnp reference, the XLA
paths against the reference, the dispatch registry, and the whole tiny model with
kernels="interpret" against kernels="xla".

Shapes are tiny and deliberately odd (token counts and sequence lengths that are not multiples of
the block, empty expert groups, several packed segments, cache lengths of 1). Each case jits its
forward and gradient together: interpret mode is slow to compile, not to run.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels.grouped_matmul import grouped_matmul_op, grouped_matmul_reference
from pallas_kernels.mla_attention import flash_attention_xla, mla_attention_op, mla_attention_reference
from pallas_kernels import registry
from pallas_kernels.registry import Op
from pallas_kernels.topk_route import topk_route_op
from jaxpr_walk import equations, largest_intermediate

F32_TOL, BF16_TOL = 1e-5, 2e-2
# The Pallas mode the kernel tests run: "interpret" everywhere (CPU CI); on a GPU machine
# `LONGCAT_TEST_KERNELS=pallas pytest tests/test_kernels.py` runs the same checks on the compiled
# Triton kernels.
KERNELS = os.environ.get("LONGCAT_TEST_KERNELS", "interpret")


def tile(n: int) -> int:
  """A test's (deliberately small) tile, raised to the 16 compiled Triton kernels need."""
  return n if KERNELS == "interpret" else max(n, 16)


def assert_close(actual, expected, tol, what=""):
  """max |actual - expected| <= tol * max(|expected|, 1e-3 floor): relative to the array's scale."""
  a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
  scale = max(float(np.abs(e).max(initial=0.0)), 1e-3)
  err = float(np.abs(a - e).max(initial=0.0))
  assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol} x scale {scale:.3g}"


def assert_tree_close(actual, expected, tol, what=""):
  for i, (a, e) in enumerate(zip(jax.tree.leaves(actual), jax.tree.leaves(expected))):
    assert_close(a, e, tol, f"{what}[{i}]")


def normal(seed, shape, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


# ---------------------------------------------------------------------------------------------
# Registry.


def _toy_op(log):
  op = Op("toy")

  def make(name, raises=False):
    def fn(x, interpret=None):
      log.append((name, interpret))
      if raises:
        raise NotImplementedError(f"{name} declines")
      return name
    return fn

  op.register("dense", kind="xla")(make("dense"))
  op.register("gpu_kernel", kind="pallas", platforms=("gpu",))(make("gpu_kernel"))
  op.register("tpu_kernel", kind="pallas", platforms=("tpu",))(make("tpu_kernel"))
  op.register("chunked", kind="xla")(make("chunked", raises=True))
  op.register("vendor", kind="library", platforms=("gpu",))(make("vendor"))  # registered last, ranks first
  return op


def test_registry_order_and_modes():
  op = _toy_op([])
  assert [i.name for i in op.impls] == ["vendor", "gpu_kernel", "tpu_kernel", "dense", "chunked"]
  names = lambda mode, platform: [(i.name, interp) for i, interp in op.candidates(mode, platform)]
  assert names(None, "cpu") == [("dense", False), ("chunked", False)]
  assert names("auto", "gpu") == [("vendor", False), ("gpu_kernel", False), ("dense", False), ("chunked", False)]
  assert names(None, "tpu") == [("tpu_kernel", False), ("dense", False), ("chunked", False)]
  assert names("pallas", "gpu") == [("gpu_kernel", False)]
  assert names("pallas", "cpu") == []
  assert names("interpret", "cpu") == [("gpu_kernel", True), ("tpu_kernel", True)]
  assert names("xla", "gpu") == [("dense", False), ("chunked", False)]


def test_registry_fallthrough_and_errors(monkeypatch):
  monkeypatch.setattr(registry, "current_platform", lambda: "cpu")  # also when run on a GPU machine
  log = []
  op = _toy_op(log)
  op.impls.insert(3, op.impls.pop(4))  # chunked (always declines) before dense
  assert op(1, implementation="xla") == "dense"
  assert log == [("chunked", None), ("dense", None)]
  assert op(1, implementation="interpret") == "gpu_kernel"
  with pytest.raises(NotImplementedError, match="tried"):
    op(1, implementation="pallas")  # nothing compiled for CPU
  with pytest.raises(ValueError, match="must be one of"):
    op(1, implementation="triton")
  with pytest.raises(ValueError, match="already registered"):
    op.register("dense", kind="xla")(lambda x: x)
  with pytest.raises(ValueError, match="kind must be"):
    op.register("other", kind="cuda")
  with pytest.raises(KeyError, match="registered"):
    op.get("nope")


def test_registered_ops():
  # The routing kernel measured slower than lax.top_k on an H200: auto skips it, pallas runs it.
  assert [i.name for i, _ in topk_route_op.candidates("auto", "gpu")] == ["xla"]
  assert [i.name for i, _ in topk_route_op.candidates("pallas", "gpu")] == ["triton"]
  # cuDNN (a library call) before the Triton kernel under auto; never in the pallas/interpret modes.
  assert [i.name for i, _ in mla_attention_op.candidates("auto", "gpu")] == ["cudnn", "triton", "xla_chunked", "xla"]
  assert [i.name for i, _ in mla_attention_op.candidates("pallas", "gpu")] == ["triton"]
  assert [i.name for i, _ in mla_attention_op.candidates("auto", "cpu")] == ["xla_chunked", "xla"]
  order = lambda op: [i.name for i in op.impls]
  assert order(topk_route_op) == ["triton", "xla"]
  assert order(grouped_matmul_op) == ["triton", "megablox", "xla"]
  assert order(mla_attention_op) == ["cudnn", "triton", "splash", "xla_chunked", "xla"]
  assert order(pk.mla_decode.mla_decode_op) == ["triton", "mosaic", "xla"]
  assert all(i.platforms == ("gpu",) for op in (topk_route_op, mla_attention_op) for i in op.impls
             if i.name == "triton")
  assert grouped_matmul_op.get("megablox").platforms == ("tpu",)


# ---------------------------------------------------------------------------------------------
# topk_route.


def _route_loss_and_grad(impl, k, n_ffn, bias):
  def loss(logits):
    w, idx, counts = pk.topk_route(logits, bias, k, n_ffn, 6.0, implementation=impl)
    return jnp.sum(w * jnp.arange(1.0, k + 1)), (w, idx, counts)
  return jax.jit(jax.value_and_grad(loss, has_aux=True))


@pytest.mark.parametrize("tokens,k", [(37, 3), (5, 12)])  # 37: not a multiple of block_t=16; k = all experts
def test_topk_route_interpret(tokens, k):
  n_ffn, experts = 8, 12
  logits = normal(0, (tokens, experts)) * 2.0
  bias = normal(1, (experts,)) * 0.05  # large enough to change some selections
  (_, (w, idx, counts)), g = _route_loss_and_grad(KERNELS, k, n_ffn, bias)(logits)
  (_, (w_r, idx_r, counts_r)), g_r = _route_loss_and_grad("xla", k, n_ffn, bias)(logits)
  np.testing.assert_array_equal(idx, idx_r)
  np.testing.assert_array_equal(counts, counts_r)
  assert idx.dtype == counts.dtype == jnp.int32 and counts.shape == (n_ffn,)
  assert_close(w, w_r, F32_TOL, "weights")
  assert_close(g, g_r, F32_TOL, "dlogits")


def test_topk_route_ties_and_bias_only_selects():
  logits = jnp.zeros((3, 12)).at[1, 5].set(1.0)  # exact ties everywhere else
  bias = jnp.zeros(12).at[7].set(0.5).at[2].set(0.5)
  w, idx, counts = pk.topk_route(logits, bias, 4, 8, 6.0, implementation=KERNELS)
  w_r, idx_r, counts_r = pk.topk_route(logits, bias, 4, 8, 6.0, implementation="xla")
  np.testing.assert_array_equal(idx, idx_r)
  np.testing.assert_array_equal(counts, counts_r)
  assert_close(w, w_r, F32_TOL, "weights")
  # Weights are unbiased probabilities times the scale: row 0 is uniform.
  np.testing.assert_allclose(w[0], np.full(4, 6.0 / 12), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# grouped_matmul.


def _gmm_value_and_grads(fn, group_sizes, dy):
  def loss(lhs, rhs):
    out = fn(lhs, rhs, group_sizes)
    return jnp.sum(out.astype(jnp.float32) * dy), out
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


GROUPS = {  # M = 45 rows, 6 groups; rows past the sum are zero-expert slots
    "mixed": [0, 7, 0, 13, 9, 4],      # empty first/middle groups, 12 tail rows from mid-tile
    "all_empty": [0, 0, 0, 0, 0, 0],
}


@pytest.mark.parametrize("case", list(GROUPS))
def test_grouped_matmul_interpret_f32(case):
  gs = jnp.array(GROUPS[case], jnp.int32)
  m, k, n = 45, 24, 20
  lhs, rhs, dy = normal(0, (m, k)), normal(1, (gs.shape[0], k, n)), normal(2, (m, n))
  kernel = lambda a, b, g: pk.grouped_matmul(a, b, g, implementation=KERNELS, block_m=tile(8))
  (_, out), grads = _gmm_value_and_grads(kernel, gs, dy)(lhs, rhs)
  (_, out_r), grads_r = _gmm_value_and_grads(grouped_matmul_reference, gs, dy)(lhs, rhs)
  assert_close(out, out_r, F32_TOL, "out")
  assert not np.asarray(out[int(gs.sum()):]).any(), "rows past sum(group_sizes) must be zero"
  assert_tree_close(grads, grads_r, F32_TOL, "grads")


def test_grouped_matmul_interpret_bf16():
  gs = jnp.array([5, 0, 17, 2], jnp.int32)
  m, k, n = 30, 32, 16
  lhs, rhs, dy = normal(0, (m, k), jnp.bfloat16), normal(1, (4, k, n), jnp.bfloat16), normal(2, (m, n))
  kernel = lambda a, b, g: pk.grouped_matmul(a, b, g, implementation=KERNELS, block_m=16)
  (_, out), grads = _gmm_value_and_grads(kernel, gs, dy)(lhs, rhs)
  (_, out_r), grads_r = _gmm_value_and_grads(grouped_matmul_reference, gs, dy)(lhs, rhs)
  assert out.dtype == jnp.bfloat16
  assert_close(out, out_r, BF16_TOL, "out")
  assert_tree_close(grads, grads_r, BF16_TOL, "grads")


def test_grouped_matmul_megablox_interpret():
  """The TPU wrapper (megablox gmm/tgmm + our VJP and zeroed tail), run in interpret mode."""
  gs = jnp.array([40, 0, 70, 53], jnp.int32)  # 163 of 200 rows: the tail starts mid-tile
  m, k, n = 200, 128, 128
  lhs, rhs, dy = normal(0, (m, k)), normal(1, (4, k, n)), normal(2, (m, n))
  mb = grouped_matmul_op.get("megablox").fn
  kernel = lambda a, b, g: mb(a, b, g, block_m=32, interpret=True)
  (_, out), grads = _gmm_value_and_grads(kernel, gs, dy)(lhs, rhs)
  (_, out_r), grads_r = _gmm_value_and_grads(grouped_matmul_reference, gs, dy)(lhs, rhs)
  assert_close(out, out_r, F32_TOL, "out")
  assert not np.asarray(out[163:]).any()
  assert_tree_close(grads, grads_r, F32_TOL, "grads")
  with pytest.raises(NotImplementedError):
    mb(lhs[:, :100], rhs[:, :100], gs)


def test_grouped_matmul_xla_path():
  gs = jnp.array([0, 7, 0, 13, 9, 3], jnp.int32)
  lhs, rhs, dy = normal(0, (45, 24)), normal(1, (6, 24, 20)), normal(2, (45, 20))
  xla = lambda a, b, g: pk.grouped_matmul(a, b, g, implementation="xla", block_m=8)
  (_, out), grads = _gmm_value_and_grads(xla, gs, dy)(lhs, rhs)
  (_, out_r), grads_r = _gmm_value_and_grads(grouped_matmul_reference, gs, dy)(lhs, rhs)
  assert_close(out, out_r, F32_TOL, "out")
  assert_tree_close(grads, grads_r, F32_TOL, "grads")


# ---------------------------------------------------------------------------------------------
# mla_attention. Dqk = 24 (16 + 8 chunks, like 128 + 64) != Dv = 16; S = 37 is no block multiple.


B, S, H, DQK, DV = 2, 37, 2, 24, 16
SEGMENTS = jnp.stack([jnp.repeat(jnp.arange(3), jnp.array([10, 20, 7]), total_repeat_length=S),
                      jnp.zeros(S, jnp.int32)])  # row 0: three packed documents; row 1: one


def _attention_case(dtype):
  q, k, v = normal(0, (B, S, H, DQK), dtype), normal(1, (B, S, H, DQK), dtype), normal(2, (B, S, H, DV), dtype)
  return q, k, v, normal(3, (B, S, H, DV))


def _attention_value_and_grads(fn, dout, **kw):
  def loss(q, k, v):
    out = fn(q, k, v, **kw)
    return jnp.sum(out.astype(jnp.float32) * dout), out
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def _check_attention(fn, dtype, tol, **kw):
  q, k, v, dout = _attention_case(dtype)
  (_, out), grads = _attention_value_and_grads(fn, dout, **kw)(q, k, v)
  (_, out_r), grads_r = _attention_value_and_grads(mla_attention_reference, dout, **kw)(q, k, v)
  assert out.shape == (B, S, H, DV) and out.dtype == dtype
  assert_close(out, out_r, tol, "out")
  assert_tree_close(grads, grads_r, tol, "dq, dk, dv")


_pallas_attention = lambda q, k, v, **kw: pk.mla_attention(q, k, v, implementation=KERNELS, **kw)


@pytest.mark.parametrize("causal,segments,blocks", [(True, True, (16, 8)), (False, False, (8, 16))])
def test_mla_attention_interpret_f32(causal, segments, blocks):
  _check_attention(_pallas_attention, jnp.float32, F32_TOL, causal=causal, sm_scale=0.3,
                   segment_ids=SEGMENTS if segments else None, block_q=tile(blocks[0]), block_k=tile(blocks[1]))


def test_mla_attention_interpret_bf16():
  _check_attention(_pallas_attention, jnp.bfloat16, BF16_TOL, causal=True, sm_scale=0.3,
                   segment_ids=SEGMENTS, block_q=16, block_k=16)


@pytest.mark.parametrize("causal,segments", [(True, True), (False, True)])
def test_mla_attention_chunked_xla(causal, segments):
  _check_attention(flash_attention_xla, jnp.float32, F32_TOL, causal=causal, sm_scale=0.3,
                   segment_ids=SEGMENTS if segments else None, block_q=8, block_k=16)


def test_mla_attention_auto_long_sequence_is_chunked():
  """auto/xla on S > 1024 takes the chunked path: same answer, no [S, S] intermediate."""
  s = 1100
  q, k, v = normal(0, (1, s, 1, 8)), normal(1, (1, s, 1, 8)), normal(2, (1, s, 1, 4))
  seg = jnp.repeat(jnp.arange(2), jnp.array([600, 500]), total_repeat_length=s)[None]
  fn = lambda q, k, v, seg: pk.mla_attention(q, k, v, segment_ids=seg, sm_scale=0.3, block_q=128,
                                             block_k=128)
  grad_fn = jax.grad(lambda *a: jnp.sum(fn(*a) ** 2), argnums=(0, 1, 2))
  assert largest_intermediate(grad_fn, q, k, v, seg) < s * s // 4
  short = [x[:, :64] for x in (q, k, v, seg)]
  assert largest_intermediate(fn, *short) >= 64 * 64  # S <= 1024 keeps the dense reference
  out = jax.jit(fn)(q, k, v, seg)
  assert_close(out, mla_attention_reference(q, k, v, segment_ids=seg, sm_scale=0.3), F32_TOL, "out")


# ---------------------------------------------------------------------------------------------
# mla_decode_attention.


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, F32_TOL), (jnp.bfloat16, BF16_TOL)])
def test_mla_decode_interpret(dtype, tol):
  b, h, r, dr, length = 3, 4, 16, 8, 45
  args = [normal(i, shape, dtype) for i, shape in enumerate([(b, h, r), (b, h, dr), (b, length, r), (b, length, dr)])]
  lengths = jnp.array([1, 45, 17], jnp.int32)  # a split sees nothing for length 1
  run = lambda impl, **kw: jax.jit(lambda *a: pk.mla_decode_attention(
      *a, lengths, sm_scale=0.2, implementation=impl, **kw))(*args)
  out = run(KERNELS, block_k=tile(8), num_splits=3)
  assert out.shape == (b, h, r) and out.dtype == dtype
  assert_close(out, run("xla"), tol, "out")


# ---------------------------------------------------------------------------------------------
# The whole tiny model: kernels="interpret" == kernels="xla".


def test_tiny_model_interpret_matches_xla():
  import longcat_jax

  ids = jax.random.randint(jax.random.key(1), (2, 16), 0, 320)
  models = {k: longcat_jax.LongcatForCausalLM(longcat_jax.get_config("tiny", kernels=k))
            for k in (KERNELS, "xla")}
  variables = jax.jit(models["xla"].init)(jax.random.key(0), ids)  # parameters do not depend on kernels

  def logits_and_grads(model):
    def loss(params):
      logits, _ = model.apply({**variables, "params": params}, ids,
                              mutable=["expert_load", "intermediates"])
      logp = jax.nn.log_softmax(logits.astype(jnp.float32))
      return -jnp.mean(jnp.take_along_axis(logp, jnp.roll(ids, -1, 1)[..., None], -1)), logits

    traced = jax.jit(jax.value_and_grad(loss, has_aux=True)).trace(variables["params"])
    kernels = {e.params["name"] for e in equations(traced.jaxpr.jaxpr)
               if e.primitive.name == "pallas_call"}
    (_, logits), grads = traced.lower().compile()(variables["params"])
    return logits, grads, kernels

  logits, grads, kernels = logits_and_grads(models[KERNELS])
  logits_r, grads_r, no_kernels = logits_and_grads(models["xla"])
  assert kernels >= {"topk_route", "grouped_matmul", "grouped_matmul_tgmm", "mla_attention_fwd",
                     "mla_attention_dkv", "mla_attention_dq"}, kernels
  assert not no_kernels
  assert_close(logits, logits_r, F32_TOL, "logits")
  assert_tree_close(grads, grads_r, F32_TOL, "grads")


def test_sharded_step_interpret_matches_xla():
  """The same sharded loss + gradient step on 8 simulated devices (fsdp=2 x expert=4: each
  device holds 2 of the 8 FFN experts, tokens dispatched by the expert-parallel shard_map), with
  kernels="interpret" and kernels="xla": same loss, logits, expert load and gradients."""
  import longcat_jax
  from longcat_jax.parallel import MeshPlacement, sharding

  b, s = 8, 8  # one row per device: tokens are split over fsdp x expert
  pc = sharding.parallel_config(mesh=dict(fsdp=2, expert=4))
  mesh = sharding.make_mesh(pc)
  rng = np.random.default_rng(0)
  ids = rng.integers(3, 320, (b, s + 1)).astype(np.int32)
  seg = np.repeat(np.array([[1] * 5 + [2] * 3]), b, 0).astype(np.int32)  # two packed documents
  pos = np.repeat(np.array([[0, 1, 2, 3, 4, 0, 1, 2]]), b, 0).astype(np.int32)
  batch = dict(input_ids=ids[:, :-1], targets=ids[:, 1:], segment_ids=seg, positions=pos)
  models = {k: longcat_jax.LongcatForCausalLM(longcat_jax.get_config("tiny", kernels=k),
                                              placement=MeshPlacement.from_parallel(mesh, pc))
            for k in ("interpret", "xla")}
  variables = longcat_jax.init_variables(models["xla"], jax.random.key(0))  # same for both kernels
  variables["expert_bias"] = jax.tree.map(  # large enough to change some selections
      lambda x: 0.05 * jax.random.normal(jax.random.key(1), x.shape, x.dtype), variables["expert_bias"])

  def run(kernels):
    model = models[kernels]

    def loss_fn(params, expert_bias, batch):
      logits, out = model.apply({"params": params, "expert_bias": expert_bias}, batch["input_ids"],
                                batch["positions"], batch["segment_ids"],
                                mutable=["expert_load", "intermediates"])
      logp = jax.nn.log_softmax(logits.astype(jnp.float32))
      ce = -jnp.take_along_axis(logp, batch["targets"][..., None], -1).mean()
      prob = out["intermediates"]["decoder"]["layers"]["moe"]["router_prob_mean"][0]  # [L, N+Z]
      load = out["expert_load"]["decoder"]["layers"]["moe"]["router"]
      # A balance-style term, so the router's probabilities get gradients too.
      loss = ce + 0.01 * (prob * load / load.sum(-1, keepdims=True)).sum()
      return loss, (logits, load)

    vs = sharding.variable_shardings(model, mesh)
    bs = sharding.batch_sharding(mesh, shape=(b, s))
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    args = (jax.device_put(variables["params"], vs["params"]),
            jax.device_put(variables["expert_bias"], vs["expert_bias"]),
            {k: jax.device_put(v, bs) for k, v in batch.items()})
    step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True),
                   in_shardings=(vs["params"], vs["expert_bias"], {k: bs for k in batch}),
                   out_shardings=((rep, (bs, rep)), vs["params"]))
    traced = step.trace(*args)
    (loss, (logits, load)), grads = traced.lower().compile(
        {"xla_backend_optimization_level": 0})(*args)
    eqns = list(equations(traced.jaxpr.jaxpr))
    shard_maps = [e for e in eqns if e.primitive.name == "shard_map"]
    kernels_used = {e.params["name"] for e in eqns if e.primitive.name == "pallas_call"}
    # Which Pallas kernels run inside the shard_maps (routing, per-device expert FFN).
    in_shard_map = {e.params["name"] for sm in shard_maps for e in equations(sm.params["jaxpr"])
                    if e.primitive.name == "pallas_call"}
    type_checked = {sm.params["check_vma"] for sm in shard_maps}
    return loss, logits, load, grads, kernels_used, in_shard_map, type_checked

  loss, logits, load, grads, kernels, in_sm, _ = run("interpret")
  loss_r, logits_r, load_r, grads_r, kernels_r, _, checked_r = run("xla")
  assert kernels >= {"topk_route", "grouped_matmul", "grouped_matmul_tgmm", "mla_attention_fwd",
                     "mla_attention_dkv", "mla_attention_dq"}, kernels
  assert in_sm >= {"topk_route", "grouped_matmul", "grouped_matmul_tgmm"}, in_sm
  assert not kernels_r
  assert True in checked_r  # the XLA expert FFN runs in a type-checked (check_vma) shard_map
  # The program is sharded: expert weights and their gradients are split over `expert` (and fsdp).
  w_gate = grads["decoder"]["layers"]["moe"]["w_gate"]  # [L, N, H, I]
  assert w_gate.sharding.spec[1] == "expert", w_gate.sharding.spec
  assert {s.data.shape for s in w_gate.addressable_shards} == {(2, 2, 32, 32)}
  np.testing.assert_array_equal(load, load_r)
  assert_close(loss, loss_r, F32_TOL, "loss")
  assert_close(logits, logits_r, F32_TOL, "logits")
  assert_tree_close(grads, grads_r, F32_TOL, "grads")
