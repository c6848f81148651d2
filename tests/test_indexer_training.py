"""The sparse indexer trains as DeepSeek-V3.2's (arXiv 2512.02556, section 2.1): KL from the main
attention's head-summed distribution to softmax(index scores); a dense warm-up stage in which only
the indexer learns, then the sparse stage over the selected keys (`train/step.py`)."""

import flax
import jax
import jax.numpy as jnp
import numpy as np

import longcat_jax as lj
from longcat_jax import train
from longcat_jax.model import sparse_attention as lsa


def test_indexer_kl_matches_numpy_definition():
  rng = np.random.RandomState(0)
  scores = rng.randn(2, 5, 7).astype(np.float32)
  probs = rng.rand(2, 5, 7).astype(np.float32)
  keep = rng.rand(2, 5, 7) > 0.4
  keep[1, 2] = False                                   # a query with no key: not counted
  got = float(lsa.indexer_kl(jnp.asarray(scores), jnp.asarray(probs), jnp.asarray(keep)))
  kls = []
  for b in range(2):
    for s in range(5):
      k = keep[b, s]
      if not k.any():
        continue
      p = probs[b, s][k] / probs[b, s][k].sum()
      q = np.exp(scores[b, s][k] - scores[b, s][k].max())
      q /= q.sum()
      kls.append(np.sum(p * (np.log(p) - np.log(q))))
  np.testing.assert_allclose(got, np.mean(kls), rtol=1e-5)
  g = jax.grad(lambda sc: lsa.indexer_kl(sc, jnp.asarray(probs), jnp.asarray(keep)))(jnp.asarray(scores))
  assert float(jnp.abs(jnp.where(keep, 0.0, g)).max()) == 0.0   # no gradient to dropped keys


def _batch(rng, b, s, vocab):
  ids = rng.randint(3, vocab, (b, s + 1)).astype(np.int32)
  return dict(input_ids=ids[:, :-1], targets=ids[:, 1:], segment_ids=np.ones((b, s), np.int32),
              positions=np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)).copy(),
              loss_mask=np.ones((b, s), np.float32))


def test_dense_warmup_trains_only_the_indexer_and_recall_rises():
  """On a small model, the indexer's top-k recall of the attention's heaviest keys rises from chance
  to high during the dense warm-up, in which no other weight moves; the sparse stage then trains
  everything (the LM loss through the sparse attention, the KL into the indexer)."""
  warm, sparse_steps, s, top_k = 400, 5, 48, 6
  c = train.get_train_config("tiny", total_steps=warm + sparse_steps, batch_size=4, seq_len=s)
  c.model.update(vocab_size=64, hidden_size=32, num_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                 qk_rope_head_dim=8, v_head_dim=8, ffn_size=64, num_ffn_experts=4, zero_experts=2, top_k=2,
                 expert_ffn_size=16, target_ffn_experts=1.0, moe_block_size=8, kernels="xla", num_layers=1,
                 sparse_attention=dict(index_heads=4, index_dim=16, top_k=top_k))
  c.optimizer.update(lr=2e-2, warmup_steps=1, schedule="constant")
  c.loss.indexer_kl_weight = 1.0
  c.loss.indexer_dense_warmup_steps = warm
  model = lj.LongcatForCausalLM(c.model)
  state = train.init_train_state(model, c, jax.random.PRNGKey(0))
  # Peaked attention (larger query/key weights), so its top-k keys are well defined from step 0.
  flat = flax.traverse_util.flatten_dict(state.params)
  flat = {k: v * 8 if "attn_0" in k and k[-1] in ("q_a", "q_b", "kv_a", "kv_b") else v for k, v in flat.items()}
  state = state.replace(params=flax.traverse_util.unflatten_dict(flat))
  step = jax.jit(train.make_train_step(model, c))
  rng = np.random.RandomState(1)
  start, recall = state, []
  for i in range(warm):
    state, m = step(state, _batch(rng, 4, s, 64))
    recall.append(float(m["indexer_recall"]))
  chance = np.mean([top_k / (t + 1) for t in range(top_k, s)])
  print(f"indexer recall: first {recall[0]:.3f} (chance {chance:.3f}), last 10 steps {np.mean(recall[-10:]):.3f}")
  assert recall[0] < chance + 0.1
  assert np.mean(recall[-10:]) > 0.7   # measured 0.805 (chance 0.287)
  moved = lambda a, b: jax.tree.map(lambda x, y: float(jnp.abs(x - y).max()), a, b)
  d = flax.traverse_util.flatten_dict(moved(start.params, state.params))
  assert all(v > 0 for k, v in d.items() if "indexer" in k)
  assert all(v == 0 for k, v in d.items() if "indexer" not in k), [k for k, v in d.items() if v and "indexer" not in k]
  warm_state = state
  for i in range(sparse_steps):
    state, m = step(state, _batch(rng, 4, s, 64))
  d = flax.traverse_util.flatten_dict(moved(warm_state.params, state.params))
  assert d[("lm_head",)] > 0 and d[("decoder", "layers", "attn_0", "q_b")] > 0 and d[("decoder", "layers", "indexer", "wk")] > 0
  assert np.isfinite(float(m["indexer_kl"])) and float(m["indexer_recall"]) > 0.5
