"""Prefill and decode throughput over the compressed MLA cache, against the memory-bandwidth bound.

    python experiments/bench_decode.py                          # `small` preset, float32, CPU sizes
    python experiments/bench_decode.py --batches 1,8,32 --contexts 256,2048,8064 --cache 8192
    python experiments/bench_decode.py --config flash --dtype bfloat16 ...   # on an accelerator

For each batch size B and filled context S (all inside one preallocated cache of --cache slots):
  prefill tok/s   B*S prompt tokens through `Engine.prefill` (expanded attention, writes the cache)
  decode tok/s    B tokens per `Engine.decode` step (absorbed MLA over the cache, one compile per B)
  step ms         median time of one decode step; "flat" compares it with the smallest S
  bound ms        bytes one step must read (weights it touches + the filled cache) / measured
                  memory bandwidth (`--bandwidth-gbs` overrides the measured copy bandwidth)
`--vs-transformers`: greedy generation end to end (prefill + every decode step, `lj.generate`)
beside transformers' `generate` (greedy, `do_sample=False`, its own KV cache) on the same weights
(written with `save_pretrained`, loaded by `LongcatFlashForCausalLM`), --prompt-tokens random
prompt tokens, --new-tokens new tokens (no EOS stop), for each batch of --batches. The reference
runs in its own process, repeats interleaved in a seeded shuffle with --gap idle seconds before
each (experiments/side_by_side.py, as bench_train.py); reports median seconds, spread, tokens per
second, the ratio (withheld on a loaded machine unless --force), each repeat's ratio, CPU seconds,
and how many generated tokens agree.

Weights touched per step: all non-expert weights except the embedding (B rows), plus the distinct
FFN experts the B tokens route to (expected count for uniform routing over the FFN experts with
target_ffn_experts of them per token). Every number is the median of --repeats timed runs after a
compile + warm-up run. Random weights (throughput does not depend on them).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import longcat_jax as lj
from longcat_jax.config import dtype_of
from longcat_jax.inference import Engine, Sampling, cache_bytes_per_token

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import side_by_side  # noqa: E402  (experiments/, beside this script)


def median_seconds(fn, repeats: int) -> float:
  jax.block_until_ready(fn())  # compile + warm-up
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def copy_bandwidth(repeats: int, mib: int = 256) -> float:
  """Measured device memory bandwidth in bytes/s: read + write of a `mib` MiB array."""
  x = jnp.ones((mib * 2**20 // 4,), jnp.float32)
  f = jax.jit(lambda x: x * 1.0001)
  return 2 * x.nbytes / median_seconds(lambda: f(x), repeats)


def step_bytes(config, batch: int, context: int) -> float:
  """Bytes one decode step of `batch` tokens must read at `context` cached tokens per row."""
  pc = lj.count_params(config)
  wbytes = np.dtype(dtype_of(config.param_dtype)).itemsize
  n, k_e = config.num_ffn_experts, config.target_ffn_experts
  distinct = n * (1 - (1 - k_e / n) ** batch) if n else 0.0  # expected experts touched per layer
  weights = (pc.non_expert - pc.embedding + batch * config.hidden_size
             + distinct * pc.per_expert * config.num_layers) * wbytes
  return weights + batch * context * cache_bytes_per_token(config)


def versus_transformers(config, args) -> None:
  """Greedy `lj.generate` beside transformers' `generate`, same weights, repeats interleaved."""
  gate = side_by_side.LoadGate(args.force)
  model = lj.LongcatForCausalLM(config)
  variables = lj.init_variables(model, jax.random.key(0))
  d = tempfile.mkdtemp()
  lj.save_pretrained(d, model, variables)
  threads = os.cpu_count() or 1
  ref = side_by_side.Reference(d, threads, same_malloc=args.same_malloc)
  last = {}

  def ours(prompt, n):
    out = lj.generate(model, variables, prompt, n, temperature=0.0, eos_token_id=())
    last["longcat_jax"] = [list(map(int, r)) for r in out.tokens]

  rng = np.random.RandomState(0)
  print(f"{config.name} ({args.dtype}), greedy, prompt {args.prompt_tokens} tokens + {args.new_tokens} new; "
        f"torch threads {threads}")
  print(f"{'B':>4} {'side':>13} {'seconds':>8} {'(min-max)':>13} {'new tok/s':>10} {'ratio':>6} {'CPU s':>6}  "
        "tokens agreeing")
  for b in [int(x) for x in args.batches.split(",")]:
    prompt = rng.randint(3, config.vocab_size, (b, args.prompt_tokens)).astype(np.int32)
    np.save(os.path.join(d, "prompt.npy"), prompt)
    ours(prompt, args.new_tokens)                 # compile + warm-up
    ref(f"generate {args.new_tokens}")
    bench = side_by_side.Bench(args.repeats, args.gap)
    bench.ours("longcat_jax", lambda: ours(prompt, args.new_tokens))
    bench.reference("transformers", ref, f"generate {args.new_tokens}", keep=lambda r: last.update(transformers=r["tokens"]))
    bench.run()
    agree = [next((i for i, (x, y) in enumerate(zip(a, t)) if x != y), len(a))   # leading tokens equal
             for a, t in zip(last["longcat_jax"], last["transformers"])]
    for side in ("transformers", "longcat_jax"):
      v, med = bench.wall[side], bench.median(side)
      ratio = "   n/a" if gate.withheld else f"{bench.median('transformers') / med:5.2f}x"
      print(f"{b:>4} {side:>13} {med:>8.2f} {f'({min(v):.2f}-{max(v):.2f})':>13} "
            f"{b * args.new_tokens / med:>10.1f} {ratio} {np.median(bench.cpu[side]):6.1f}  "
            + (f"first {min(agree)}-{max(agree)} of {args.new_tokens} per row" if side == "longcat_jax" else ""))
    if not gate.withheld:
      per = bench.per_repeat("transformers", "longcat_jax")
      print(f"{'':>4} ratio per repeat: " + ", ".join(f"{x:.2f}x" for x in per) + f" (min {min(per):.2f}x)")
  ref.close()
  shutil.rmtree(d, ignore_errors=True)
  print(f"(median of {args.repeats} interleaved repeats; ratio = transformers' time / this row's)")
  print(gate.footer())


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="small")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--batches", default="1,8")
  p.add_argument("--contexts", default="128,1024,3968")
  p.add_argument("--cache", type=int, default=4096, help="cache slots per row (fixed: one decode compile per batch)")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--bandwidth-gbs", type=float, default=None)
  p.add_argument("--skip-prefill", action="store_true")
  p.add_argument("--vs-transformers", action="store_true", help="greedy generate beside transformers' generate")
  p.add_argument("--prompt-tokens", type=int, default=512)
  p.add_argument("--new-tokens", type=int, default=256)
  p.add_argument("--gap", type=float, default=1.0, help="idle seconds before each timed generate")
  p.add_argument("--force", action="store_true", help="print ratios even on a loaded machine")
  p.add_argument("--same-malloc", action="store_true",
                 help="the reference under longcat_jax's host-allocator settings too (side_by_side.py)")
  args = p.parse_args()

  config = lj.get_config(args.config, dtype=args.dtype, param_dtype=args.dtype)
  config.max_position_embeddings = max(config.max_position_embeddings, args.cache)
  if args.vs_transformers:
    return versus_transformers(config, args)
  model = lj.LongcatForCausalLM(config)
  variables = lj.init_variables(model, jax.random.key(0))
  engine = Engine(model)
  greedy = Sampling(0.0)
  batches = [int(b) for b in args.batches.split(",")]
  contexts = [int(s) for s in args.contexts.split(",")]
  if max(contexts) >= args.cache:
    raise SystemExit(f"--contexts must stay below --cache={args.cache}")
  bw = args.bandwidth_gbs * 1e9 if args.bandwidth_gbs else copy_bandwidth(args.repeats)
  print(f"{config.name} ({args.dtype}) on {jax.devices()[0].platform}: {lj.count_params(config).summary()}")
  print(f"cache: {cache_bytes_per_token(config)} bytes/token, {args.cache} slots/row; memory bandwidth "
        f"{bw / 1e9:.1f} GB/s ({'given' if args.bandwidth_gbs else 'measured copy'})")
  print(f"{'B':>4} {'S':>6} {'prefill tok/s':>14} {'decode tok/s':>13} {'step ms':>9} {'flat':>6} "
        f"{'bound ms':>9} {'step/bound':>10}")
  rng = np.random.RandomState(0)
  key = jax.random.key(0)
  for b in batches:
    runs = []
    for s in contexts:
      tokens = jnp.asarray(rng.randint(3, config.vocab_size, (b, s)), jnp.int32)
      lengths = jnp.full((b,), s, jnp.int32)
      prefill = lambda: engine.prefill(variables, tokens, lengths, greedy, key, cache_size=args.cache)
      prefill_tps = float("nan") if args.skip_prefill else b * s / median_seconds(prefill, args.repeats)
      cache, nxt, _, context = prefill()
      # The decode step donates its cache; carrying it through keeps every timed call in place.
      runs.append(dict(s=s, prefill_tps=prefill_tps, cache=cache, step_in=nxt[:, None], lengths=lengths,
                       context=context, times=[]))
    for r in runs:  # compile + warm-up
      r["cache"], out, _ = engine.decode(variables, r["cache"], r["step_in"], r["lengths"], r["context"], greedy, key)
      jax.block_until_ready(out)
    for _ in range(args.repeats):  # contexts interleaved, so load drift hits them alike
      for r in runs:
        t = time.perf_counter()
        r["cache"], out, _ = engine.decode(variables, r["cache"], r["step_in"], r["lengths"], r["context"], greedy,
                                           key)
        jax.block_until_ready(out)
        r["times"].append(time.perf_counter() - t)
    base = statistics.median(runs[0]["times"])
    for r in runs:
      t = statistics.median(r["times"])
      bound = step_bytes(config, b, r["s"]) / bw
      print(f"{b:>4} {r['s']:>6} {r['prefill_tps']:>14.0f} {b / t:>13.1f} {t * 1e3:>9.2f} {t / base:>6.2f} "
            f"{bound * 1e3:>9.3f} {t / bound:>10.1f}")


if __name__ == "__main__":
  main()
