"""Forward tokens/s: longcat_jax vs the transformers reference, same config and inputs, one run.

    python experiments/bench_forward.py                  # hidden 512, 4 layers, 32+16 experts, top-6, 4x512
    python experiments/bench_forward.py --batch 2 --seq 256 --repeats 3

Both run float32 on the CPU with the same weights (the reference is converted through
`save_pretrained` / `load_pretrained`). Prints the median of `--repeats` timed runs each.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import jax
import numpy as np
import torch

import longcat_jax as lj


def bench_config(args):
  from transformers import LongcatFlashConfig
  return LongcatFlashConfig(
      vocab_size=args.vocab, hidden_size=512, num_layers=4, num_attention_heads=8, ffn_hidden_size=1024,
      q_lora_rank=256, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, head_dim=32, v_head_dim=64,
      moe_topk=6, n_routed_experts=32, zero_expert_num=16, expert_ffn_hidden_size=256)


def median_time(fn, repeats):
  fn()  # warm-up / compile
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=512)
  p.add_argument("--vocab", type=int, default=32768)
  p.add_argument("--repeats", type=int, default=5)
  args = p.parse_args()

  from transformers import LongcatFlashForCausalLM
  torch.manual_seed(0)
  ref = LongcatFlashForCausalLM(bench_config(args)).float().eval()
  with tempfile.TemporaryDirectory() as d:
    ref.save_pretrained(d)
    model, variables = lj.load_pretrained(d)
  ids = np.random.RandomState(0).randint(0, args.vocab, (args.batch, args.seq))
  tokens = args.batch * args.seq

  fwd = jax.jit(model.apply)
  ours = median_time(lambda: fwd(variables, ids).block_until_ready(), args.repeats)
  tids = torch.as_tensor(ids)

  def ref_fwd():
    with torch.no_grad():
      ref(tids)

  theirs = median_time(ref_fwd, args.repeats)
  with torch.no_grad():
    diff = np.abs(np.asarray(fwd(variables, ids)) - ref(tids).logits.numpy()).max()
  print(f"config: hidden 512, 4 layers, 32 FFN + 16 zero experts, top-6, vocab {args.vocab}; "
        f"batch {args.batch} x {args.seq}; float32 on {jax.devices()[0].platform}, torch threads {torch.get_num_threads()}")
  print(f"longcat_jax   forward: {tokens / ours:10.1f} tokens/s  (median {ours * 1e3:.1f} ms)")
  print(f"transformers  forward: {tokens / theirs:10.1f} tokens/s  (median {theirs * 1e3:.1f} ms)")
  print(f"ratio (ours / reference): {theirs / ours:.2f}x   max |logit diff| {diff:.2e}")


if __name__ == "__main__":
  main()
