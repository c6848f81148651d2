"""The harness of the side-by-side benches (`bench_forward.py`, `bench_train.py`, `bench_decode.py
--vs-transformers`): transformers in its own process, calls interleaved repeat by repeat.

    ref = Reference(checkpoint_dir, threads, train=True, hyper=dict(lr=..., clip=...))
    bench = Bench(repeats=5, gap=1.0)
    bench.ours("ours_step", lambda: ...)        # timed here: wall, CPU seconds, page faults
    bench.reference("ref_step", ref, "step")    # timed inside the reference process
    bench.run()                                 # each repeat in a fresh seeded shuffle
    bench.table(rows, tokens, withheld=gate.withheld)

Why a process of its own: on the 2-core VM these benches were written on, whichever library ran
right after the other in one process was up to ~1.3 s slower (either way round, with a 4 s pause
too): the two heaps and thread pools sit under each other's timings. Why the gap: both libraries'
thread pools spin for a while after work. Why the shuffle: no row always follows the same one.
Why the load gate: a loaded machine measures contention (a forward ratio read 3.18x under load
where the idle figure was 1.39x), so ratios are withheld when the 1-minute load average at the
start exceeds half the cores, unless --force.

The reference process (`python side_by_side.py --worker DIR --threads N [--train --hyper JSON]`)
loads DIR with `LongcatFlashForCausalLM.from_pretrained` in float32 and answers one JSON line per
command line: `fwd`, `fwd_bwd`, `step` (fwd_bwd + clip_grad_norm_ + torch.optim.AdamW.step),
`logits` (saves DIR/ref_logits.npy), `generate N` (greedy on DIR/prompt.npy), `peak` (best of ten
1024^3 float32 matmuls).

Host memory: importing longcat_jax makes glibc keep freed memory for reuse
(`longcat_jax.platforms.keep_freed_host_memory`: no fresh pages, so no page faults, per call);
transformers runs with the system allocator as its users run it. `--same-malloc` on a bench gives
the reference process the same settings, to separate the allocator's share of a ratio from the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np


def cpu_seconds() -> float:
  """User + system CPU time of this process, all threads."""
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def page_faults() -> int:
  """Minor page faults of this process so far (fresh memory touched for the first time)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def set_threads(threads: int) -> None:
  """XLA's CPU thread count (0: all cores), before JAX starts its CPU client; the reference gets the same."""
  if threads == 1:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
  elif threads > 1:
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" intra_op_parallelism_threads={threads}"


class LoadGate:
  """The load average at the start, and whether ratios must be withheld (above half the cores)."""

  def __init__(self, force: bool):
    self.start = os.getloadavg()
    self.cores = os.cpu_count() or 1
    self.withheld = self.start[0] > 0.5 * self.cores and not force

  def footer(self) -> str:
    fmt = lambda xs: ", ".join(f"{x:.2f}" for x in xs)
    line = f"load average at start (1, 5, 15 min): {fmt(self.start)}; at end: {fmt(os.getloadavg())}"
    if self.withheld:
      line = (f"ratios withheld: load average {self.start[0]:.2f} at the start > {0.5 * self.cores:.1f} "
              f"(half the cores); rerun on an idle machine or pass --force\n" + line)
    return line


class Reference:
  """transformers' LongcatFlashForCausalLM in its own process, driven one command at a time."""

  def __init__(self, checkpoint_dir: str, threads: int, train: bool = False, hyper: dict | None = None,
               same_malloc: bool = False):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", checkpoint_dir, "--threads", str(threads)]
    if same_malloc:  # the reference under longcat_jax's allocator settings too (platforms.keep_freed_host_memory)
      cmd += ["--same-malloc"]
    if train:
      cmd += ["--train", "--hyper", json.dumps(hyper or {})]
    self.dir = checkpoint_dir
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

  def __call__(self, command: str) -> dict:
    self.proc.stdin.write(command + "\n")
    self.proc.stdin.flush()
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"the transformers reference process exited (code {self.proc.wait()}) on {command!r}")
    return json.loads(line)

  def close(self):
    self.proc.stdin.close()
    self.proc.wait()


class Bench:
  """Rows timed repeat by repeat, in a fresh seeded shuffle each repeat, `gap` idle seconds before
  each call. Per row: wall seconds, CPU seconds and minor page faults of each call."""

  def __init__(self, repeats: int, gap: float, seed: int = 0):
    self.repeats, self.gap, self.seed = repeats, gap, seed
    self.calls = []
    self.wall, self.cpu, self.faults = {}, {}, {}

  def _row(self, key, call):
    self.calls.append((key, call))
    self.wall[key], self.cpu[key], self.faults[key] = [], [], []

  def ours(self, key: str, fn) -> None:
    def call():
      c, f, t = cpu_seconds(), page_faults(), time.perf_counter()
      fn()
      self._record(key, time.perf_counter() - t, cpu_seconds() - c, page_faults() - f)
    self._row(key, call)

  def reference(self, key: str, ref: Reference, command: str, keep=None) -> None:
    """`keep(answer)`, if given, sees each answer (the generated tokens, the loss)."""
    def call():
      r = ref(command)
      self._record(key, r["wall"], r["cpu"], r["faults"])
      if keep:
        keep(r)
    self._row(key, call)

  def _record(self, key, wall, cpu, faults):
    self.wall[key].append(wall)
    self.cpu[key].append(cpu)
    self.faults[key].append(faults)

  def run(self) -> None:
    shuffle = np.random.RandomState(self.seed)
    for _ in range(self.repeats):
      for i in shuffle.permutation(len(self.calls)):
        time.sleep(self.gap)
        self.calls[i][1]()

  def median(self, key: str) -> float:
    return float(np.median(self.wall[key]))

  def per_repeat(self, ref_key: str, key: str) -> list[float]:
    """The reference's time over ours, repeat by repeat (each repeat's pair ran side by side)."""
    return [r / o for r, o in zip(self.wall[ref_key], self.wall[key])]

  def table(self, rows, tokens: int, withheld: bool, flops_per_token: float | None = None,
            peak: float | None = None) -> str:
    """rows: (label, key, reference key). Median, spread, tokens/s, [MFU], ratio, CPU s, faults."""
    mfu = flops_per_token is not None and peak
    out = [f"{'':28s} {'median s':>9s} {'min-max s':>13s} {'tokens/s':>9s} " + ("   MFU " if mfu else "")
           + f"{'vs ref':>7s} {'CPU s':>7s} {'faults':>8s}"]
    for label, key, ref_key in rows:
      med = self.median(key)
      tps = tokens / med
      ratio = "    n/a" if withheld else f"{self.median(ref_key) / med:6.2f}x"
      out.append(f"{label:28s} {med:9.3f} {min(self.wall[key]):6.2f}-{max(self.wall[key]):<6.2f} {tps:9.0f} "
                 + (f"{tps * flops_per_token / peak:6.1%} " if mfu else "")
                 + f"{ratio} {np.median(self.cpu[key]):7.2f} {np.median(self.faults[key]):8.0f}")
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------
# The reference process.


def _worker(d: str, threads: int, train: bool, hyper: dict) -> None:
  import torch
  from transformers import LongcatFlashForCausalLM

  torch.set_num_threads(threads)
  ref = LongcatFlashForCausalLM.from_pretrained(d, torch_dtype=torch.float32)
  ref = ref.train() if train else ref.eval()
  load_ids = lambda name: torch.as_tensor(np.load(os.path.join(d, name)), dtype=torch.long)
  ids = load_ids("ids.npy") if os.path.exists(os.path.join(d, "ids.npy")) else None
  opt = None
  if train:
    h = hyper
    opt = torch.optim.AdamW(ref.parameters(), lr=h["lr"], betas=(h["b1"], h["b2"]), eps=h["eps"],
                            weight_decay=h["weight_decay"])

  def fwd():
    with torch.no_grad():
      ref(input_ids=ids)

  def fwd_bwd():
    ref.zero_grad(set_to_none=True)
    out = ref(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.loss.item()

  def step():
    loss = fwd_bwd()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), hyper["clip"])
    opt.step()
    return loss

  def generate(n):
    prompt = load_ids("prompt.npy")
    with torch.no_grad():
      out = ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, pad_token_id=0)
    return out[:, prompt.shape[1]:].tolist()

  for line in sys.stdin:
    command, *arg = line.split()
    if command == "peak":
      a = torch.ones(1024, 1024)
      times = []
      for _ in range(10):
        t = time.perf_counter()
        a @ a
        times.append(time.perf_counter() - t)
      print(json.dumps(dict(flops=2 * 1024 ** 3 / min(times))), flush=True)
      continue
    if command == "logits":
      with torch.no_grad():
        np.save(os.path.join(d, "ref_logits.npy"), ref(input_ids=ids).logits.numpy())
      print(json.dumps({}), flush=True)
      continue
    fn = dict(fwd=fwd, fwd_bwd=fwd_bwd, step=step, generate=lambda: generate(int(arg[0])))[command]
    c, f, t = cpu_seconds(), page_faults(), time.perf_counter()
    result = fn()
    out = dict(wall=time.perf_counter() - t, cpu=cpu_seconds() - c, faults=page_faults() - f)
    out.update(dict(loss=result) if isinstance(result, float) else dict(tokens=result) if result else {})
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
  p = argparse.ArgumentParser(description="the transformers side of the side-by-side benches")
  p.add_argument("--worker", required=True)
  p.add_argument("--threads", type=int, required=True)
  p.add_argument("--train", action="store_true")
  p.add_argument("--hyper", default="{}")
  p.add_argument("--same-malloc", action="store_true")
  a = p.parse_args()
  if a.same_malloc:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from longcat_jax.platforms import keep_freed_host_memory
    assert keep_freed_host_memory(), "--same-malloc: the allocator settings did not apply"
  _worker(a.worker, a.threads, a.train, json.loads(a.hyper))
