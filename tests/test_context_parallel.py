"""Context parallelism: a sequence split over the `context` mesh axis gives the single-device step.

Uses the shared training-step case (tests/parallel_case.py): next-token CE + a balance-style term,
packed documents, a nonzero expert bias; 8 simulated CPU devices.
"""

import jax
import numpy as np
import pytest

import parallel_case
from longcat_jax.parallel import MeshPlacement, sharding


def _check(result, reference):
  loss_err, grad_err = parallel_case.relative_errors(result, reference)
  assert loss_err < 1e-5, f"loss {result['loss']} vs single device {reference['loss']}"
  assert grad_err < 1e-5, f"max relative gradient error {grad_err:.2e}"


def test_context_parallel_step_equals_single_device():
  """Dense MLA (LongCat-Flash layers): 16-token rows split 4 ways over `context`, x2 data. The
  compiled step all-gathers latent-sized arrays ([.., R + rope] per token), never the expanded
  per-head keys/values."""
  model, variables, batch = parallel_case.case()
  cfg = model.config
  pc = sharding.parallel_config(mesh=dict(data=2, fsdp=1, context=4))
  mesh = sharding.make_mesh(pc)
  model = model.clone(placement=MeshPlacement.from_parallel(mesh, pc))
  assert model.placement.length_shards(parallel_case.SEQ, parallel_case.BATCH) == 4
  vs = sharding.variable_shardings(model, mesh)
  bs = sharding.batch_sharding(mesh, shape=(parallel_case.BATCH, parallel_case.SEQ))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  step = jax.jit(parallel_case.make_step(model), in_shardings=(vs["params"], vs["expert_bias"], {k: bs for k in batch}),
                 out_shardings=((replicated, replicated), vs["params"]))
  compiled = step.lower(variables["params"], variables["expert_bias"], batch).compile()
  (loss, aux), grads = compiled(jax.device_put(variables["params"], vs["params"]),
                                jax.device_put(variables["expert_bias"], vs["expert_bias"]),
                                {k: jax.device_put(v, bs) for k, v in batch.items()})
  result = jax.tree.map(np.asarray, dict(loss=loss, aux=aux, grads=grads))
  _check(result, parallel_case.single_device_result())
  gathers = [line.split("all-gather(")[0] for line in compiled.as_text().splitlines() if "all-gather(" in line]
  per_head = f"{cfg.num_heads},{cfg.qk_nope_head_dim + cfg.qk_rope_head_dim}]"
  assert not [g for g in gathers if per_head in g], "expanded per-head keys were all-gathered"
  assert [g for g in gathers if f",{cfg.kv_lora_rank}]" in g], "no all-gather of the latent"


def test_context_parallel_lite_v2_features_equal_single_device(monkeypatch):
  """N-gram embeddings (shifts across chunk borders), YaRN and LongCat Sparse Attention (top_k <
  S, indexer over gathered keys) with the sequence split 8 ways."""
  import longcat_jax
  cfg = longcat_jax.get_config(
      "tiny", kernels="xla",
      ngram_embedding=dict(vocab_size_ratio=3, neighbor_num=3, split_num=4, row_multiple=64),
      sparse_attention=dict(index_heads=2, index_dim=16, top_k=6, init_tokens=1, local_tokens=2),
      rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=8, mscale=1.0,
                        mscale_all_dim=0.5))
  monkeypatch.setattr(parallel_case, "config", lambda: cfg)
  parallel_case.single_device_result.cache_clear()
  try:
    reference = parallel_case.single_device_result()
    pc = sharding.parallel_config(mesh=dict(fsdp=1, context=8))
    result = parallel_case.sharded_result(sharding.make_mesh(pc), pc)
  finally:
    parallel_case.single_device_result.cache_clear()
  assert "indexer" in reference["grads"]["decoder"]["layers"]
  _check(result, reference)

