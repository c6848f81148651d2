"""experiments/plan.py: a context-parallel plan (sequence split over `context`, weights over it too)
compiles on the 8 simulated CPU devices and its figures come from the compiled program."""

import math
import os
import sys

import jax
import jax.numpy as jnp

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
