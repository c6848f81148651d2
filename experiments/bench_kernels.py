"""Times each pallas_kernels op against its XLA paths at LongCat-Flash shapes.

    python experiments/bench_kernels.py            # Flash shapes; meant for a GPU / TPU
    python experiments/bench_kernels.py --small    # CPU-sized shapes
    python experiments/bench_kernels.py --ops attention,decode --repeats 10

Shapes (Flash, spec sections 2-3): routing T=16384 tokens x 768 experts (512 FFN + 256 zero),
top-12; grouped matmul 512 experts, hidden 6144 -> 2048, 64 rows per expert (32768 rows);
attention B=1, S=4096, H=64, Dqk=192, Dv=128, causal; absorbed decode B=64, H=64, kv_lora 512,
rope 64, cache 4096 with random lengths. "max err" is against the op's first row (the XLA path
everything is checked against). Every row is the median of --repeats timed runs after a
compile + warm-up run, `jax.block_until_ready` around each. "fwd+bwd" times the gradient of
sum(out * cotangent) with respect to the float inputs. FLOP/s counts useful FLOPs only (causal
attention: half the square; the backward as 2.5x the forward for attention, 2x for matmuls).

On CPU the Pallas kernels only run in interpret mode, which is for correctness, not speed, so the
CPU run times the XLA paths alone (including ragged_dot, to show why the CPU path is blocked).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk
from pallas_kernels.grouped_matmul import grouped_matmul_blocked
from pallas_kernels.mla_attention import flash_attention_xla, mla_attention_reference
from pallas_kernels.registry import current_platform

SHAPES = {
    "full": dict(route_t=16384, experts=768, ffn_experts=512, top_k=12,
                 gmm_groups=512, gmm_rows_per_group=64, gmm_k=6144, gmm_n=2048,
                 attn_b=1, attn_s=4096, attn_h=64, dec_b=64, dec_h=64, dec_l=4096),
    "small": dict(route_t=1024, experts=768, ffn_experts=512, top_k=12,
                  gmm_groups=16, gmm_rows_per_group=128, gmm_k=512, gmm_n=256,
                  attn_b=1, attn_s=2048, attn_h=2, dec_b=4, dec_h=16, dec_l=1024),
}
DQK, DV, KV_LORA, ROPE = 192, 128, 512, 64


def median_seconds(fn, *args, repeats: int) -> float:
  f = jax.jit(fn)
  jax.block_until_ready(f(*args))  # compile + warm-up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def grad_of(fn, argnums):
  """fwd+bwd: gradient of sum(out * ct) w.r.t. the float inputs (a fixed random cotangent)."""
  def loss(*args):
    out = fn(*args)
    out = out[0] if isinstance(out, tuple) else out
    ct = jax.random.normal(jax.random.key(7), out.shape, jnp.float32)
    return jnp.sum(out.astype(jnp.float32) * ct)
  return jax.grad(loss, argnums=argnums)


class Table:
  def __init__(self):
    self.rows, self.base = [], {}

  def add(self, op, pass_, impl, seconds, flops=None, error=None):
    key = (op, pass_)
    self.base.setdefault(key, seconds)  # the first row of an (op, pass) is the baseline
    rate = f"{flops / seconds / 1e9:.1f}" if flops else "-"
    err = f"{error:.1e}" if error is not None else "-"
    self.rows.append(f"{op:<15} {pass_:<8} {impl:<28} {seconds * 1e3:10.2f} {rate:>10} "
                     f"{self.base[key] / seconds:7.2f}x {err:>9}")
    print(self.rows[-1], flush=True)

  def failed(self, op, pass_, impl, error: Exception):
    first = str(error).strip().splitlines()[0][:90]
    self.rows.append(f"{op:<15} {pass_:<8} {impl:<28} FAILED: {first}")
    print(self.rows[-1], flush=True)

  @staticmethod
  def header():
    print(f"{'op':<15} {'pass':<8} {'implementation':<28} {'median ms':>10} {'GFLOP/s':>10} "
          f"{'vs 1st':>8} {'max err':>9}")


def max_err(a, b) -> float:
  return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))


def bench_route(s, table, dtype, kernels, repeats):
  t, e, n, k = s["route_t"], s["experts"], s["ffn_experts"], s["top_k"]
  logits = jax.random.normal(jax.random.key(0), (t, e), jnp.float32)
  bias = jax.random.normal(jax.random.key(1), (e,), jnp.float32) * 1e-3
  run = lambda impl: (lambda x: pk.topk_route(x, bias, k, n, 6.0, implementation=impl))
  ref = jax.jit(run("xla"))(logits)
  for name, impl in [("xla (lax.top_k)", "xla")] + ([("pallas", "pallas")] if kernels else []):
    out = jax.jit(run(impl))(logits)
    table.add("topk_route", "fwd", name, median_seconds(run(impl), logits, repeats=repeats),
              error=max_err(out[0], ref[0]))
    table.add("topk_route", "fwd+bwd", name, median_seconds(grad_of(run(impl), 0), logits, repeats=repeats))


def bench_gmm(s, table, dtype, kernels, repeats):
  g, k, n = s["gmm_groups"], s["gmm_k"], s["gmm_n"]
  rng = np.random.default_rng(0)
  # Uneven loads around the mean, as a router produces; a few empty experts.
  sizes = rng.poisson(s["gmm_rows_per_group"], g).astype(np.int32)
  sizes[rng.choice(g, max(1, g // 32), replace=False)] = 0
  m = int(sizes.sum())
  gs = jnp.asarray(sizes)
  lhs = jax.random.normal(jax.random.key(0), (m, k), dtype)
  rhs = (jax.random.normal(jax.random.key(1), (g, k, n), jnp.float32) * k ** -0.5).astype(dtype)
  flops = 2 * m * k * n
  # First row = the baseline every other row is compared with: the blocked scan (dense matmuls per
  # row block) everywhere. ragged_dot is what the "xla" implementation calls off-CPU; where the
  # backend has no grouped-GEMM lowering XLA expands it densely (seen on an H200, JAX 0.11.2: a
  # [rows, groups*K] x [groups*K, N] product, 188 GiB at Flash shapes), so a failure is a row too.
  impls = [("xla blocked scan", lambda a, b, c: grouped_matmul_blocked(a, b, c, 64)),
           ("xla ragged_dot", lambda a, b, c: jax.lax.ragged_dot(a, b, c))]
  if kernels:
    impls.append(("pallas", lambda a, b, c: pk.grouped_matmul(a, b, c, implementation="pallas")))
  ref = jax.jit(impls[0][1])(lhs, rhs, gs)
  for name, fn in impls:
    try:
      err = max_err(jax.jit(fn)(lhs, rhs, gs), ref)
    except jax.errors.JaxRuntimeError as e:
      table.failed("grouped_matmul", "fwd", name, e)
      continue
    table.add("grouped_matmul", "fwd", name, median_seconds(fn, lhs, rhs, gs, repeats=repeats), flops, err)
    table.add("grouped_matmul", "fwd+bwd", name,
              median_seconds(grad_of(fn, (0, 1)), lhs, rhs, gs, repeats=repeats), 3 * flops)


def bench_attention(s, table, dtype, kernels, repeats):
  b, sq, h = s["attn_b"], s["attn_s"], s["attn_h"]
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (b, sq, h, DQK), dtype)
  k = jax.random.normal(keys[1], (b, sq, h, DQK), dtype)
  v = jax.random.normal(keys[2], (b, sq, h, DV), dtype)
  flops = 2 * b * h * sq * sq * (DQK + DV) // 2  # causal: half the square
  kw = dict(causal=True, sm_scale=DQK ** -0.5)
  impls = [("xla dense (reference)", lambda q, k, v: mla_attention_reference(q, k, v, **kw)),
           ("xla chunked (512x512)", lambda q, k, v: flash_attention_xla(q, k, v, **kw))]
  if current_platform() == "gpu":  # cuDNN's fused attention; it wants Dv == Dqk, so also V padded
    cudnn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, scale=DQK ** -0.5,
                                                         implementation="cudnn")
    pad_v = lambda v: jnp.pad(v, [(0, 0)] * 3 + [(0, DQK - DV)])
    impls.append(("cudnn (dot_product_attention)", cudnn))
    impls.append(("cudnn, V zero-padded to Dqk", lambda q, k, v: cudnn(q, k, pad_v(v))[..., :DV]))
    impls.append(("auto (registry's choice)", lambda q, k, v: pk.mla_attention(q, k, v, **kw)))
  if kernels:
    impls.append(("pallas (512x512)", lambda q, k, v: pk.mla_attention(q, k, v, implementation="pallas", **kw)))
    impls.append(("pallas (128x64)", lambda q, k, v: pk.mla_attention(
        q, k, v, implementation="pallas", block_q=128, block_k=64, **kw)))
  ref = jax.jit(impls[0][1])(q, k, v)
  for name, fn in impls:
    try:
      err = max_err(jax.jit(fn)(q, k, v), ref)
    except Exception as e:  # noqa: BLE001 - cuDNN refuses some shapes: a row, not a crash
      table.failed("mla_attention", "fwd", name, e)
      continue
    table.add("mla_attention", "fwd", name, median_seconds(fn, q, k, v, repeats=repeats), flops, err)
    table.add("mla_attention", "fwd+bwd", name,
              median_seconds(grad_of(fn, (0, 1, 2)), q, k, v, repeats=repeats), 3.5 * flops)


def bench_decode(s, table, dtype, kernels, repeats):
  b, h, length = s["dec_b"], s["dec_h"], s["dec_l"]
  keys = jax.random.split(jax.random.key(0), 5)
  ql = jax.random.normal(keys[0], (b, h, KV_LORA), dtype)
  qr = jax.random.normal(keys[1], (b, h, ROPE), dtype)
  cl = jax.random.normal(keys[2], (b, length, KV_LORA), dtype)
  cr = jax.random.normal(keys[3], (b, length, ROPE), dtype)
  lengths = jax.random.randint(keys[4], (b,), 1, length + 1)
  flops = 2 * h * int(lengths.sum()) * (2 * KV_LORA + ROPE)
  run = lambda impl: (lambda *a: pk.mla_decode_attention(*a, lengths, sm_scale=0.1, implementation=impl))
  ref = jax.jit(run("xla"))(ql, qr, cl, cr)
  for name, impl in [("xla (reference)", "xla")] + ([("pallas split-K", "pallas")] if kernels else []):
    err = max_err(jax.jit(run(impl))(ql, qr, cl, cr), ref)
    table.add("mla_decode", "fwd", name, median_seconds(run(impl), ql, qr, cl, cr, repeats=repeats), flops, err)


BENCHES = {"route": bench_route, "gmm": bench_gmm, "attention": bench_attention, "decode": bench_decode}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--small", action="store_true", help="CPU-sized shapes")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--ops", default=",".join(BENCHES), help=f"comma list of {list(BENCHES)}")
  parser.add_argument("--dtype", default=None, help="bfloat16 (accelerators) / float32 (CPU) by default")
  args = parser.parse_args()

  platform = current_platform()
  kernels = platform != "cpu"
  dtype = jnp.dtype(args.dtype or ("float32" if platform == "cpu" else "bfloat16"))
  shapes = SHAPES["small" if args.small else "full"]
  print(f"platform {platform} ({jax.devices()[0].device_kind}), dtype {dtype.name}, "
        f"{'small' if args.small else 'Flash'} shapes, median of {args.repeats}")
  if not kernels:
    print("CPU: Pallas kernels run only in interpret mode (a correctness tool, not a speed one); "
          "timing the XLA paths only. Kernel timings need a GPU or TPU.")
    if not args.small:
      print("warning: Flash shapes on CPU take minutes per op; --small is the CPU-sized run.")
  Table.header()
  table = Table()
  for name in args.ops.split(","):
    BENCHES[name](shapes, table, dtype, kernels, args.repeats)


if __name__ == "__main__":
  main()
