"""The XLA-CPU fast paths (issue #4's training throughput) against their definitions: the
query-blocked attention against the dense reference, forward and gradients, float32 and bfloat16.

Shapes are tiny and odd (sequence lengths that are not multiples of the query block, several packed
segments, non-causal), so each block boundary case is hit.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels.mla_attention import mla_attention_op, mla_attention_reference, query_blocked_attention
from jaxpr_walk import largest_intermediate

F32_TOL = 1e-5


def _normal(seed, shape, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def _max_rel_err(actual, expected) -> float:
  """max |actual - expected| / max |expected| over every leaf (float64)."""
  errs = []
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    assert a.shape == e.shape
    errs.append(float(np.abs(a - e).max()) / max(float(np.abs(e).max()), 1e-3))
  return max(errs)


def _value_and_grads(fn, q, k, v, dout, **kw):
  loss = lambda q, k, v: jnp.sum(fn(q, k, v, **kw).astype(jnp.float32) * dout)
  out = jax.jit(lambda q, k, v: fn(q, k, v, **kw))(q, k, v)
  return out, jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


def _segments(b, s):
  """Row 0: three packed documents; other rows: one."""
  seg = np.ones((b, s), np.int32)
  seg[0, s // 3:] = 2
  seg[0, (2 * s) // 3:] = 3
  return jnp.asarray(seg)


@pytest.mark.parametrize("s,block_q,causal,segments", [(45, 16, True, True), (45, 16, False, True),
                                                       (40, 8, True, False), (33, 64, True, True)])
def test_query_blocked_attention_f32(s, block_q, causal, segments):
  b, h = 2, 3
  q, k, v, dout = _normal(0, (b, s, h, 24)), _normal(1, (b, s, h, 24)), _normal(2, (b, s, h, 16)), _normal(3, (b, s, h, 16))
  kw = dict(segment_ids=_segments(b, s) if segments else None, causal=causal, sm_scale=0.3)
  out, grads = _value_and_grads(functools.partial(query_blocked_attention, block_q=block_q), q, k, v, dout, **kw)
  out_r, grads_r = _value_and_grads(mla_attention_reference, q, k, v, dout, **kw)
  assert out.shape == (b, s, h, 16) and out.dtype == jnp.float32
  assert _max_rel_err(out, out_r) <= F32_TOL
  assert _max_rel_err(grads, grads_r) <= F32_TOL


@pytest.mark.parametrize("s,block_q,causal,segments", [(45, 8, True, True), (40, 16, False, False),
                                                       (33, 64, True, True)])
def test_mqa_attention_f32_against_expanded_reference(s, block_q, causal, segments):
  """Heads folded into the query rows (MLA's absorbed form) equals per-head attention with the
  shared keys and values copied to every head: outputs and gradients, packed segments, odd lengths."""
  b, h = 2, 3
  q, k, v = _normal(0, (b, s, h, 24)), _normal(1, (b, s, 24)), _normal(2, (b, s, 16))
  dout = _normal(3, (b, s, h, 16))
  kw = dict(segment_ids=_segments(b, s) if segments else None, causal=causal, sm_scale=0.3)
  per_head = lambda x: jnp.broadcast_to(x[:, :, None], (b, s, h, x.shape[-1]))
  expanded = lambda q, k, v, **kw: mla_attention_reference(q, per_head(k), per_head(v), **kw)
  out, grads = _value_and_grads(functools.partial(pk.mqa_attention, block_q=block_q), q, k, v, dout, **kw)
  out_r, grads_r = _value_and_grads(expanded, q, k, v, dout, **kw)
  assert out.shape == (b, s, h, 16) and out.dtype == jnp.float32
  assert _max_rel_err(out, out_r) <= F32_TOL
  assert _max_rel_err(grads, grads_r) <= F32_TOL


def test_query_blocked_attention_bf16_no_worse_than_dense():
  """bf16 inputs: errors against the float32 computation on the same (rounded) inputs stay
  within 2x those of the dense reference run in bf16."""
  b, s, h = 2, 40, 2
  q, k, v = (_normal(i, (b, s, h, d), jnp.bfloat16) for i, d in ((0, 24), (1, 24), (2, 16)))
  dout = _normal(3, (b, s, h, 16))
  kw = dict(segment_ids=_segments(b, s), causal=True, sm_scale=0.3)
  truth = _value_and_grads(mla_attention_reference, *(x.astype(jnp.float32) for x in (q, k, v)), dout, **kw)
  ours = _value_and_grads(functools.partial(query_blocked_attention, block_q=16), q, k, v, dout, **kw)
  dense = _value_and_grads(mla_attention_reference, q, k, v, dout, **kw)
  assert ours[0].dtype == jnp.bfloat16
  for i, what in enumerate(("out", "grads")):
    assert _max_rel_err(ours[i], truth[i]) <= 2 * _max_rel_err(dense[i], truth[i]) + 1e-3, what


def test_auto_attention_on_cpu_is_query_blocked():
  """On CPU, auto at S <= 1024 takes the query-blocked path (no [B, H, S, S] value anywhere)."""
  b, s, h = 1, 256, 2
  q, k, v = _normal(0, (b, s, h, 8)), _normal(1, (b, s, h, 8)), _normal(2, (b, s, h, 8))
  fn = lambda q, k, v: jnp.sum(pk.mla_attention(q, k, v, block_q=512, block_k=512))
  largest = largest_intermediate(jax.grad(fn, argnums=(0, 1, 2)), q, k, v)
  assert largest < b * h * s * s, largest
  np.testing.assert_allclose(pk.mla_attention(q, k, v), mla_attention_reference(q, k, v), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("t", [1, 2, 9])   # 1 and 2: the few-rows (decode) path; 9: the grouped matmul
def test_dropless_experts_against_per_token_reference(t):
  """Both paths of `dropless_experts` against the definition, per token in float64: the sum over
  its slots of routing weight x SwiGLU expert, plus the zero-expert weight x the input."""
  from longcat_jax.model.experts import dropless_experts
  n, zero, k, h, f = 16, 4, 3, 8, 12
  rng = np.random.default_rng(t)
  x = rng.standard_normal((t, h)).astype(np.float32)
  idx = np.stack([rng.choice(n + zero, k, replace=False) for _ in range(t)]).astype(np.int32)
  w = rng.random((t, k)).astype(np.float32)
  wg, wu = (rng.standard_normal((n, h, f)).astype(np.float32) for _ in range(2))
  wd = rng.standard_normal((n, f, h)).astype(np.float32)
  counts = np.bincount(idx[idx < n], minlength=n).astype(np.int32)
  got = dropless_experts(x, w, idx, counts, wg, wu, wd, num_ffn_experts=n, block_m=4)
  silu = lambda a: a / (1 + np.exp(-a))
  want = np.zeros((t, h))
  for i in range(t):
    for j in range(k):
      e = idx[i, j]
      xi = x[i].astype(np.float64)
      want[i] += w[i, j] * (xi if e >= n else (silu(xi @ wg[e]) * (xi @ wu[e])) @ wd[e])
  np.testing.assert_allclose(np.asarray(got), want, rtol=F32_TOL, atol=F32_TOL * np.abs(want).max())


_FAULTS_PER_CALL = """
import resource, jax, jax.numpy as jnp
import longcat_jax  # applies (or, with LONGCAT_JAX_MALLOC=system, skips) the host-allocator settings
x = jnp.ones((4, 8, 512, 512))          # 32 MiB: above glibc's largest mmap threshold
f = jax.jit(lambda x: jnp.exp(x) + 1.0)
faults = []
for _ in range(32):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  jax.block_until_ready(f(x))           # a fresh 32 MiB output each call, the last one freed
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(*faults)
"""


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="glibc's malloc (Linux)")
def test_freed_host_memory_is_reused_without_page_faults():
  """platforms.keep_freed_host_memory: a call's 32 MiB output lands in pages freed by an earlier
  call, so it touches no fresh memory (8,192 page faults, one per 4 KiB page, on every call with
  the system allocator). The heap grows for the first few calls and again now and then (small
  allocations split a freed 32 MiB chunk; how often varies run to run): 20-28 of 32 calls were
  fault-free in 6 runs, so the test asks for 8."""
  import os
  import subprocess
  import sys

  def faults(**env):
    out = subprocess.run([sys.executable, "-c", _FAULTS_PER_CALL], capture_output=True, text=True, check=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu", **env})
    return [int(f) for f in out.stdout.split()]

  kept = faults()
  assert sum(f < 100 for f in kept) >= 8, f"page faults per call: {kept}"
  system = faults(LONGCAT_JAX_MALLOC="system")  # the same program, glibc's defaults: fresh pages each call
  assert all(f > 4000 for f in system), f"page faults per call: {system}"
