"""Sharded streaming load and save on 8 simulated devices, host memory, and 2 processes x 4 devices.

As a script this file is one measured process (started by the tests below, so that peak memory is
its own):

    python tests/test_interop_sharded.py --ckpt DIR --mesh fsdp=2,expert=4 --out r.json \
        [--process-id 0 --num-processes 2 --port 12345 --save DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
MESHES = {"fsdp=2,expert=4": dict(fsdp=2, expert=4), "fsdp=2,expert=2,tensor=2": dict(fsdp=2, expert=2, tensor=2)}
# Flash-shaped (narrow hidden, many experts) and big enough that the fixed cost of XLA's compiled
# update programs and allocator slack (~60-80 MiB here) is not the whole bound: embed / lm_head
# are the largest tensors (64 MiB in bf16), 2 x 128 experts; ~230 MiB in all.
BIG = dict(vocab_size=131072, hidden_size=256, n_routed_experts=128, zero_expert_num=64, expert_ffn_hidden_size=256,
           ffn_hidden_size=256, q_lora_rank=64, kv_lora_rank=32, num_nextn_predict_layers=0)


def _status(field: str) -> int:
  """A /proc/self/status memory field in bytes (VmRSS, VmHWM)."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024
  raise KeyError(field)


def _reset_peak() -> None:
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM to the current RSS


def _measured(fn):
  """(result, peak RSS above the RSS before the call) of fn(), less the file-backed pages mapped in
  meanwhile: code of jaxlib / XLA paged in on first use (up to ~40 MiB here), clean and shared,
  not memory the loader holds."""
  base, file_base = _status("VmRSS"), _status("RssFile")
  _reset_peak()
  out = fn()
  return out, _status("VmHWM") - base - max(0, _status("RssFile") - file_base)


def _main():
  p = argparse.ArgumentParser()
  p.add_argument("--ckpt", required=True)
  p.add_argument("--warmup", required=True)
  p.add_argument("--mesh", required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--save")
  p.add_argument("--process-id", type=int)
  p.add_argument("--num-processes", type=int, default=1)
  p.add_argument("--port", type=int)
  a = p.parse_args()
  sys.path.insert(0, os.path.dirname(HERE))
  import jax
  if a.num_processes > 1:
    from longcat_jax.parallel import distributed
    distributed.initialize(f"127.0.0.1:{a.port}", a.num_processes, a.process_id, cpu_collectives="gloo",
                           num_cpu_devices=8 // a.num_processes)
  else:
    jax.config.update("jax_num_cpu_devices", 8)
  import longcat_jax as lj
  from longcat_jax.parallel import sharding
  mesh = sharding.make_mesh(sharding.parallel_config(mesh=sharding.parse_mesh(a.mesh)))
  # Imports, tracing and the first XLA compiles (a one-time ~40 MiB) happen here, chunked path too.
  lj.load_pretrained(a.warmup, mesh=mesh, host_bytes=1 << 16)
  (model, variables), load_peak = _measured(lambda: lj.load_pretrained(a.ckpt, mesh=mesh))
  leaves = jax.tree_util.tree_flatten_with_path(variables)[0]
  held = sum(s.data.nbytes for _, x in leaves for s in x.addressable_shards)
  pieces = {}
  for path, x in leaves:
    for s in x.addressable_shards:
      if s.replica_id == 0:
        box = ",".join(f"{i.start or 0}:{i.stop if i.stop is not None else n}" for i, n in zip(s.index, x.shape))
        pieces[f"{jax.tree_util.keystr(path)}|{box}"] = np.asarray(s.data).astype(np.float32)
  np.savez(a.out + ".npz", **pieces)
  save_peak = None
  if a.save:
    _, save_peak = _measured(lambda: lj.save_pretrained(a.save, model, variables, max_shard_bytes=24 << 20))
  with open(a.out, "w") as f:
    json.dump(dict(load_peak=load_peak, held=held, save_peak=save_peak, devices=len(jax.local_devices())), f)


# ---------------------------------------------------------------------------------------------
# Tests.


def _largest_tensor(path: str) -> int:
  from longcat_jax.interop.safetensors_io import CheckpointFiles
  return max(t.nbytes for t in CheckpointFiles(path).tensors.values())


def _run(args, n=1, timeout=400):
  env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE), JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__)] + [x.format(i=i) for x in args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(n)]
  for i, p in enumerate(procs):
    try:
      log = p.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    assert p.returncode == 0, f"process {i} failed:\n{log[-4000:]}"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


if __name__ != "__main__":
  import jax
  import pytest
  from release_checkpoints import make_release, read_all

  import longcat_jax as lj
  from longcat_jax.parallel import sharding

  @pytest.fixture(scope="module")
  def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    return {k: make_release(root, k, seed=i) for i, k in enumerate(("flash_fp8", "lite"))}

  @pytest.mark.parametrize("kind,mesh_name", [("flash_fp8", "fsdp=2,expert=4"), ("lite", "fsdp=2,expert=2,tensor=2")])
  def test_sharded_load_equals_unsharded_and_saves_back(small, kind, mesh_name, tmp_path):
    path = small[kind]
    mesh = sharding.make_mesh(sharding.parallel_config(mesh=MESHES[mesh_name]))
    _, want = lj.load_pretrained(path)
    # A small host budget: every big leaf is built in many chunks, in place on the devices.
    model, got = lj.load_pretrained(path, mesh=mesh, host_bytes=48 << 10)
    table = sharding.variable_shardings(model, mesh)
    flat_want = jax.tree_util.tree_flatten_with_path(want)[0]
    split = 0
    for (path_, x), y, sh in zip(flat_want, jax.tree.leaves(got), jax.tree.leaves(table)):
      assert y.sharding.is_equivalent_to(sh, y.ndim), jax.tree_util.keystr(path_)
      assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(path_)
      split += len({str(s.index) for s in y.addressable_shards}) > 1
    assert split >= 10
    experts = got["params"]["decoder"]["layers"]["moe"]["w_gate"]
    assert len({str(s.index) for s in experts.addressable_shards}) == 8
    # Export from the shards, tensor by tensor: the same files' tensors, bitwise.
    out = str(tmp_path / "saved")
    lj.save_pretrained(out, model, got, fp8_scales=path if kind == "flash_fp8" else None, max_shard_bytes=50_000)
    a, b = read_all(path), read_all(out)
    assert sorted(a) == sorted(b) and all(a[k] == b[k] for k in a)

  @pytest.fixture(scope="module")
  def big(tmp_path_factory):
    root = tmp_path_factory.mktemp("big")
    warm = make_release(root / "warm", "flash", seed=1, num_nextn_predict_layers=0)
    return make_release(root, "flash", seed=0, files=4, fast=True, **BIG), warm

  def test_host_memory_single_and_two_processes(big, tmp_path):
    """Peak host memory beyond the arrays < 2x the largest stored tensor, for load and for the
    streaming save; 2 processes x 4 devices each peak at about half of one process, and their
    shards form the same global values (and write the same files)."""
    path, warm = big
    largest = _largest_tensor(path)
    mesh = "fsdp=2,expert=4"
    _run(["--ckpt", path, "--warmup", warm, "--mesh", mesh, "--out", str(tmp_path / "one.json"),
          "--save", str(tmp_path / "saved1")])
    one = json.load(open(tmp_path / "one.json"))
    assert one["load_peak"] - one["held"] < 2 * largest, (one, largest)
    assert one["save_peak"] < 2 * largest, (one, largest)
    a = read_all(path)
    assert a == read_all(str(tmp_path / "saved1"))

    port = _free_port()
    _run(["--ckpt", path, "--warmup", warm, "--mesh", mesh, "--out", str(tmp_path / "p{i}.json"),
          "--save", str(tmp_path / "saved2"), "--process-id", "{i}", "--num-processes", "2", "--port", str(port)],
         n=2)
    two = [json.load(open(tmp_path / f"p{i}.json")) for i in range(2)]
    print(f"largest {largest / 2**20:.0f} MiB; one process {one}; two processes {two}")
    for r in two:
      assert r["devices"] == 4
      assert r["held"] == one["held"] // 2, (r, one)                  # each holds half the shards
      # About half the single-process peak: the arrays halve, the transients (< 2x the largest
      # tensor) and XLA's fixed per-process cost do not (measured 0.62-0.65 here).
      assert r["load_peak"] < 0.7 * one["load_peak"], (r, one)
      assert r["load_peak"] - r["held"] < 2 * largest, (r, largest)
    assert a == read_all(str(tmp_path / "saved2"))
    # The two processes' pieces form the single-process load's global values.
    _, ref = lj.load_pretrained(path)
    flat = {jax.tree_util.keystr(k): np.asarray(v, np.float32) for k, v in jax.tree_util.tree_flatten_with_path(ref)[0]}
    covered = {k: np.zeros(v.shape, bool) for k, v in flat.items()}
    for i in range(2):
      for name, piece in np.load(str(tmp_path / f"p{i}.json.npz")).items():
        key, box = name.split("|")
        idx = tuple(slice(*map(int, b.split(":"))) for b in box.split(",")) if box else ()
        np.testing.assert_array_equal(flat[key][idx], piece, err_msg=name)
        covered[key][idx] = True
    assert all(c.all() for c in covered.values())


if __name__ == "__main__":
  _main()
