"""Experiment 8: the sparse indexer learns (DeepSeek-V3.2's recipe; `train/step.py`, `loss.indexer_*`).

Claims:
  recall   the indexer's top-k recall of the main attention's highest-weight keys rises from chance
           (top_k / visible keys) to high during the dense warm-up (only the indexer trains, KL to
           the head-summed attention of the layer's first block);
  loss     after switching to sparse attention (top_k of the visible keys, KL over the selected keys,
           everything training), the sparse model's loss approaches the dense model's trained for the
           same steps; a sparse model with an untrained (random) indexer stays further away.

Runs (same data, same seeds): a dense pretraining of `pre` steps (sparse_attention present but
forced dense, i.e. the same weights), then from that state
  dense     `sparse` more dense steps;
  sparse    `warmup` indexer-only dense steps (kl weight 1), then `sparse` sparse steps (indexer KL on);
  random    `sparse` sparse steps with the indexer never trained (kl weight 0).
Data: synthetic copy sequences (a random prefix, then the prefix again), so attention has to find
specific earlier keys; eval loss on held-out copy batches (second halves only).

    python experiments/exp_8_indexer.py                  # small (CPU, a few minutes)
    python experiments/exp_8_indexer.py --scale smoke

Writes results/exp8_indexer.json.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

SCALES = {
    "small": dict(pre=150, warmup=60, sparse=100, batch=8, seq=64, top_k=8, lr=3e-3),
    "smoke": dict(pre=2, warmup=2, sparse=2, batch=2, seq=32, top_k=4, lr=3e-3),
}


def copy_batch(rng, batch, seq, vocab):
  """[B, S] rows: a random prefix of S/2 tokens, then the same prefix (the loss counts the copy)."""
  half = rng.randint(3, vocab, (batch, seq // 2 + 1)).astype(np.int32)
  ids = np.concatenate([half, half], axis=1)[:, :seq + 1]
  mask = np.zeros((batch, seq), np.float32)
  mask[:, seq // 2:] = 1.0
  return dict(input_ids=ids[:, :-1], targets=ids[:, 1:], segment_ids=np.ones((batch, seq), np.int32),
              positions=np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(), loss_mask=mask)


def build(s, kl_weight, warmup):
  import jax
  import longcat_jax as lj
  from longcat_jax import train
  c = train.get_train_config("tiny", total_steps=s["pre"] + s["warmup"] + s["sparse"], batch_size=s["batch"],
                             seq_len=s["seq"])
  c.model.update(vocab_size=64, kernels="xla", latent_norm_eps=1e-5,
                 sparse_attention=dict(index_heads=4, index_dim=16, top_k=s["top_k"]))
  c.optimizer.update(lr=s["lr"], warmup_steps=10, schedule="constant")
  c.loss.indexer_kl_weight = kl_weight
  c.loss.indexer_dense_warmup_steps = warmup
  model = lj.LongcatForCausalLM(c.model)
  return c, model, jax.jit(train.make_train_step(model, c))


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--scale", default="small", choices=sorted(SCALES))
  args = p.parse_args()
  s = SCALES[args.scale]
  import jax
  import jax.numpy as jnp
  from longcat_jax import train
  from longcat_jax.train import losses
  t0 = time.time()
  rng = np.random.RandomState(0)
  eval_batches = [copy_batch(np.random.RandomState(100 + i), 16, s["seq"], 64) for i in range(4)]

  def eval_loss(model, state):
    tot = n = 0.0
    for b in eval_batches:
      h = model.apply({"params": state.params, "expert_bias": state.expert_bias}, jnp.asarray(b["input_ids"]),
                      return_hidden=True)
      nll, cnt = losses.next_token_nll(h, state.params["lm_head"], jnp.asarray(b["targets"]),
                                       jnp.asarray(b["loss_mask"]))
      tot, n = tot + float(nll), n + float(cnt)
    return tot / n

  # Dense pretraining: the sparse model forced dense (whole run = warm-up with kl weight 0 would
  # freeze the model, so use the dense twin of the same parameters).
  c, model, _ = build(s, 0.0, 0)
  dense_model = train.step.dense_attention_model(model)
  state = train.init_train_state(model, c, jax.random.PRNGKey(0))
  dense_step = jax.jit(train.make_train_step(dense_model, c))
  data = [copy_batch(rng, s["batch"], s["seq"], 64) for _ in range(s["pre"] + s["warmup"] + s["sparse"])]
  for i in range(s["pre"]):
    state, _ = dense_step(state, data[i])
  pre_state = state
  out = dict(scale=args.scale, settings=s, pre_eval_loss=eval_loss(dense_model, pre_state))

  # dense: continue dense.
  st = pre_state
  for i in range(s["sparse"]):
    st, _ = dense_step(st, data[s["pre"] + s["warmup"] + i])
  out["dense_eval_loss"] = eval_loss(dense_model, st)

  # sparse: indexer warm-up (step counter restarted so the warm-up stage covers these steps), then sparse.
  c2, model2, step2 = build(s, 1.0, s["warmup"])
  st = pre_state.replace(step=jnp.zeros((), jnp.int32))
  recall, kl = [], []
  for i in range(s["warmup"] + s["sparse"]):
    st, m = step2(st, data[s["pre"] + i])
    recall.append(float(m["indexer_recall"]))
    kl.append(float(m["indexer_kl"]))
  out.update(recall=recall, kl=kl, sparse_eval_loss=eval_loss(model2, st),
             chance_recall=float(np.mean([min(1.0, s["top_k"] / (t + 1)) for t in range(s["top_k"], s["seq"])])))

  # random: sparse with the indexer never trained.
  c3, model3, step3 = build(s, 0.0, 0)
  st = pre_state
  for i in range(s["sparse"]):
    st, _ = step3(st, data[s["pre"] + s["warmup"] + i])
  out["random_indexer_eval_loss"] = eval_loss(model3, st)
  out["wall_s"] = time.time() - t0
  w = s["warmup"]
  print(f"recall: first step {recall[0]:.3f} (chance {out['chance_recall']:.3f}), end of warm-up "
        f"{np.mean(recall[max(0, w - 5):w]):.3f}, end {np.mean(recall[-5:]):.3f}; KL {kl[0]:.3f} -> {kl[w - 1]:.3f}")
  print(f"eval loss after pretraining {out['pre_eval_loss']:.4f}; after {s['sparse']} more steps: dense "
        f"{out['dense_eval_loss']:.4f}, sparse (trained indexer) {out['sparse_eval_loss']:.4f}, sparse (random "
        f"indexer) {out['random_indexer_eval_loss']:.4f}; wall {out['wall_s']:.0f}s")
  if args.scale != "smoke":
    from experiments import common
    common.save_json("exp8_indexer", out)


if __name__ == "__main__":
  main()
