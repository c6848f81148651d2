"""experiments/plan.py: a context-parallel plan (sequence split over `context`, weights over it too)
compiles on the 8 simulated CPU devices and its figures come from the compiled program."""

import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import longcat_jax  # noqa: E402
from experiments import plan  # noqa: E402
from longcat_jax.parallel import sharding  # noqa: E402


def test_fsdp_over_context_edits_only_weight_rules():
  table = plan.fsdp_over(sharding.LOGICAL_AXIS_RULES, "context")
  assert len(table) == len(sharding.LOGICAL_AXIS_RULES)
  changed = {l for (l, a), (_, b) in zip(table, sharding.LOGICAL_AXIS_RULES) if a != b}
  assert changed == {"embed", "q_lora", "kv_lora", "ngram_vocab"}
  assert dict(table)["batch"] == dict(sharding.LOGICAL_AXIS_RULES)["batch"]
  assert table[[l for l, _ in table].index("embed")][1] == ("fsdp", "context", "expert")


def test_context_parallel_plan_compiles_and_shards_weights_over_context(capsys):
  figures = {}
  rc = plan.main(["--model", "tiny", "--mesh", "fsdp=2,context=4", "--fsdp-context", "--seq", "64",
                  "--batch", "2", "--hbm-gib", "1", "--dtype", "float32"], figures=figures)
  out = capsys.readouterr().out
  assert rc == 0 and figures["fits"]
  assert figures["length_split"] == 4 and "each sequence split 4 ways" in out
  # Parameters from the compiled program's input shardings: split over all 8 devices (fsdp x
  # context), up to the replicated norm scales; without the edit they would be split 2 ways.
  m = longcat_jax.get_config("tiny")
  total = sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(
      jax.eval_shape(lambda: longcat_jax.init_variables(longcat_jax.LongcatForCausalLM(m),
                                                        jax.random.key(0))["params"])))
  assert total / 8 <= figures["params"] < total / 4
  # The sequence's compressed KV is all-gathered (context parallel attention).
  assert [l for l in figures["hlo"].splitlines() if "all-gather(" in l and f",{m.kv_lora_rank}]" in l]


# The layouts that keep LongCat-2.0's plan on 1,024 devices from replicating activations.


def test_sharded_ngram_lookup_equals_take_and_keeps_tokens_split():
  """The n-gram lookup of a mesh placement (table split by rows and columns over all devices)
  gives `take` and its gradient, and the compiled program never all-gathers the [B, S, d] rows."""
  from jax.sharding import NamedSharding
  from longcat_jax.parallel import MeshPlacement
  rng = np.random.RandomState(0)
  rows, d, b, s = 64, 8, 8, 16
  table = jnp.asarray(rng.randn(rows, d), jnp.float32)
  ids = jnp.asarray(rng.randint(0, rows, (b, s)), jnp.int32)
  cot = jnp.asarray(rng.randn(b, s, d), jnp.float32)
  names = ("ngram_vocab", "ngram_dim")
  want_v, want_g = jax.value_and_grad(lambda t, i: jnp.sum(jnp.take(t, i, axis=0) * cot))(table, ids)
  pc = sharding.parallel_config(mesh=dict(fsdp=2, expert=4))
  mesh = sharding.make_mesh(pc)
  placement = MeshPlacement(mesh)
  f = lambda t, i: jnp.sum(placement.lookup(t, i, jnp.float32, names) * cot)
  t_sh = NamedSharding(mesh, sharding.logical_to_spec(("ngram_vocab", "ngram_dim"), table.shape, mesh))
  assert t_sh.spec == jax.sharding.PartitionSpec("fsdp", "expert")  # rows x columns
  b_sh = sharding.batch_sharding(mesh, shape=(b, s))
  step = jax.jit(jax.value_and_grad(f), in_shardings=(t_sh, b_sh))
  compiled = step.lower(table, ids).compile()
  got_v, got_g = compiled(jax.device_put(table, t_sh), jax.device_put(ids, b_sh))
  np.testing.assert_allclose(float(got_v), float(want_v), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(got_g), np.asarray(want_g), rtol=1e-6, atol=1e-6)
  # Collectives move [B, S, d / 4] partial rows: never the table's rows (what GSPMD does with a
  # plain `take` here, and at scale the whole [B, S, d] on every device).
  colls = [l.split("=", 1)[1].split("(")[0] for l in compiled.as_text().splitlines()
           if any(f" {k}(" in l for k in ("all-gather", "all-reduce", "all-to-all", "reduce-scatter"))]
  assert any(f"f32[{b},{s},{d // 4}]" in c for c in colls)
  assert not [c for c in colls if f"f32[{rows}," in c or f"f32[{b},{s},{d}]" in c], colls


def test_context_parallel_query_blocks_equal_whole_selection():
  """The indexer's query blocks under a mesh that splits the sequence 4 ways (block i of every
  chunk per step, padded chunks) select what one pass without a mesh selects."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  from longcat_jax.model import sparse_attention as lsa
  from longcat_jax.parallel import MeshPlacement
  rng = np.random.RandomState(4)
  b, s, hi, di = 2, 40, 3, 8
  q, keys = jnp.asarray(rng.randn(b, s, hi, di), jnp.float32), jnp.asarray(rng.randn(b, s, di), jnp.float32)
  w = jnp.asarray(rng.randn(b, s, hi), jnp.float32)
  pos = jnp.broadcast_to(jnp.arange(s), (b, s))
  seg = jnp.asarray(np.repeat([[1] * 23 + [2] * 17], b, axis=0))
  kw = dict(top_k=6, init_tokens=1, local_tokens=2)
  whole = lsa.select_keys(q, w, keys, pos, pos, seg, seg, block_q=64, **kw)
  pc = sharding.parallel_config(mesh=dict(data=2, fsdp=1, context=4))
  mesh = sharding.make_mesh(pc)
  tok = NamedSharding(mesh, P("data", "context"))
  rep = NamedSharding(mesh, P("data"))
  placement = MeshPlacement(mesh)
  for block_q in (3, 4):  # 10-token chunks, padded to 12: 4 blocks of 3, 3 blocks of 4
    fn = jax.jit(lambda q, w, keys, pos, kpos, seg, kseg: lsa.select_keys(
        q, w, keys, pos, kpos, seg, kseg, block_q=block_q, placement=placement, **kw))
    got = fn(jax.device_put(q, tok), jax.device_put(w, tok), jax.device_put(keys, rep),
             jax.device_put(pos, tok), jax.device_put(pos, rep), jax.device_put(seg, tok),
             jax.device_put(seg, rep))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(whole))
