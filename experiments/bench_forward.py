"""Forward tokens/s: longcat_jax beside transformers' LongcatFlashForCausalLM, same weights and batch.

    python experiments/bench_forward.py                  # `small` preset, batch 4 x 512, float32, CPU
    python experiments/bench_forward.py --preset tiny --batch 2 --seq 256 --repeats 3

The forward to the logits on both sides: ours `jax.jit(model.apply)`, theirs `model(input_ids)`
under `torch.no_grad()` on the weights ours wrote with `save_pretrained` (routing identical; the
largest logit difference is printed). Structure as in bench_train.py (experiments/side_by_side.py):
the reference in its own process, the two rows interleaved repeat by repeat in a seeded shuffle,
`--gap` idle seconds before each call; medians, the spread, each repeat's ratio, CPU seconds and
page faults per call, and the load average; no ratio on a loaded machine unless `--force`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import side_by_side  # noqa: E402  (experiments/, beside this script)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default="small")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=512)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--threads", type=int, default=0, help="threads for both sides (0: all cores)")
  p.add_argument("--gap", type=float, default=1.0, help="idle seconds before each timed call")
  p.add_argument("--force", action="store_true", help="print ratios even on a loaded machine")
  p.add_argument("--same-malloc", action="store_true",
                 help="the reference under longcat_jax's host-allocator settings too (side_by_side.py)")
  args = p.parse_args(argv)
  gate = side_by_side.LoadGate(args.force)
  side_by_side.set_threads(args.threads)
  args.threads = args.threads or os.cpu_count()

  import jax
  import numpy as np

  import longcat_jax as lj
  from longcat_jax import train
  from longcat_jax.train import metrics

  c = train.get_train_config(args.preset, batch_size=args.batch, seq_len=args.seq).model
  c.dtype = c.param_dtype = "float32"
  model = lj.LongcatForCausalLM(c)
  variables = lj.init_variables(model, jax.random.key(0))
  ids = np.random.RandomState(0).randint(3, c.vocab_size, (args.batch, args.seq)).astype(np.int32)
  d = tempfile.mkdtemp()
  lj.save_pretrained(d, model, variables)
  np.save(os.path.join(d, "ids.npy"), ids)
  ref = side_by_side.Reference(d, args.threads, same_malloc=args.same_malloc)

  fwd = jax.jit(model.apply)
  t = time.perf_counter()
  logits = np.asarray(fwd(variables, ids))
  compile_s = time.perf_counter() - t
  ref("logits")
  diff = float(np.abs(logits - np.load(os.path.join(d, "ref_logits.npy"))).max())
  del logits
  ref("fwd")  # warm-up

  bench = side_by_side.Bench(args.repeats, args.gap)
  bench.ours("ours", lambda: jax.block_until_ready(fwd(variables, ids)))
  bench.reference("ref", ref, "fwd")
  bench.run()
  peak_jax = metrics.device_peak_flops("float32")
  peak_torch = ref("peak")["flops"]
  ref.close()
  shutil.rmtree(d, ignore_errors=True)

  flops = metrics.forward_flops_per_token(c, args.seq, c.target_ffn_experts)
  print(f"config {args.preset}: hidden {c.hidden_size}, {c.num_layers} layers, {c.num_ffn_experts} FFN + "
        f"{c.zero_experts} zero experts, top-{c.top_k}, vocab {c.vocab_size}; batch {args.batch} x {args.seq}, "
        f"float32, {args.threads} threads, {jax.devices()[0].platform}")
  print(f"model FLOPs per forward token {flops / 1e6:.1f} M (at {c.target_ffn_experts} FFN experts per token); "
        f"float32 matmul peak (best of several probes): jax {peak_jax / 1e9:.0f}, torch {peak_torch / 1e9:.0f} "
        f"GFLOP/s; MFU against the larger")
  print(f"compile {compile_s:.1f}s; max |logit difference| {diff:.2e}")
  rows = [("transformers forward", "ref", "ref"), ("longcat_jax forward", "ours", "ref")]
  print(bench.table(rows, args.batch * args.seq, gate.withheld, flops, max(peak_jax, peak_torch)))
  if not gate.withheld:
    per = bench.per_repeat("ref", "ours")
    print("ratio per repeat: " + ", ".join(f"{x:.2f}x" for x in per) + f" (min {min(per):.2f}x)")
    floor = flops * args.batch * args.seq / max(peak_jax, peak_torch)   # as bench_train.py's ceiling
    print(f"ceiling: the model FLOPs alone at the best matmul rate either library reaches take {floor:.2f}s, "
          f"so an implementation built on these matmuls cannot run the forward faster than {bench.median('ref') / floor:.2f}x the reference's")
  print(gate.footer())


if __name__ == "__main__":
  main()
