"""Faults injected for real: flipped bytes and deleted files in checkpoints, a full and a read-only
disk (a small tmpfs), a SIGTERM'd and a SIGKILLed process of a 2-process run, a loss spike and a
perturbed gradient. (SIGTERM of the training job and the bitwise resumes: test_train_resume.py.)"""

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from longcat_jax.train import checksum
from longcat_jax.train.checkpoint import Checkpointer, CorruptCheckpoint, SaveError

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


# ----------------------------------------------------------------------------- checksums

def test_checksum_is_exact_layout_independent_and_sees_every_bit():
  rng = np.random.default_rng(0)
  arrays = {"f32": rng.standard_normal((8, 12)).astype(np.float32),
            "bf16": jnp.asarray(rng.standard_normal((16, 4)), jnp.bfloat16),
            "i32": rng.integers(-2**31, 2**31 - 1, (8, 3), dtype=np.int32),
            "u8": rng.integers(0, 255, (8,), dtype=np.uint8), "bool": rng.random((8, 2)) > 0.5,
            "scalar": np.float32(3.5)}
  one = checksum.tree_checksums(jax.tree.map(jnp.asarray, arrays))
  mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("a", "b"))
  spec = lambda x: P() if np.ndim(x) == 0 else P("a", *(["b"] if np.ndim(x) > 1 and np.shape(x)[1] % 4 == 0 else []))
  sharded = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, spec(x))), arrays)
  assert not sharded["f32"].is_fully_replicated
  assert checksum.tree_checksums(sharded) == one  # integer sums: the same on any layout

  f32 = arrays["f32"]
  for flat_index, bit in ((0, 0), (37, 31), (95, 17)):  # any single flipped bit changes it
    bad = f32.copy().view(np.uint32)
    bad.reshape(-1)[flat_index] ^= np.uint32(1 << bit)
    assert checksum.tree_checksums({"f32": jnp.asarray(bad.view(np.float32))})["f32"] != one["f32"]
  swapped = f32.copy()
  swapped[[0, 1]] = swapped[[1, 0]]  # same values, different places
  assert checksum.tree_checksums({"f32": jnp.asarray(swapped)})["f32"] != one["f32"]


# ----------------------------------------------------------------------------- corrupt checkpoints

def _state(step):
  return {"w": jnp.arange(50_000, dtype=jnp.float32) * step, "b": jnp.full((3, 4), step, jnp.bfloat16)}


def _flip_bytes(path):
  b = bytearray(open(path, "rb").read())
  for i in (len(b) // 3, len(b) // 2):
    b[i] ^= 0xA5
  open(path, "wb").write(b)


def _biggest_file(step_dir):
  return max(glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True), key=os.path.getsize)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's abandoned reads
def test_restore_names_bad_checkpoints_and_uses_the_newest_intact(tmp_path):
  d = str(tmp_path / "ckpt")
  ckpt = Checkpointer(d, every=1, keep=5, async_save=False)
  for step in (1, 2, 3):
    ckpt.save(step, _state(step), data={"next": step})
  ckpt.close()
  abstract = jax.eval_shape(lambda: _state(1))
  _flip_bytes(_biggest_file(os.path.join(d, "3")))          # silently wrong bytes (zstd has no checksum)
  os.remove(_biggest_file(os.path.join(d, "2")))            # a missing data file
  os.makedirs(os.path.join(d, "4.orbax-checkpoint-tmp", "state"))  # a save that never finished

  logs = []
  with pytest.raises(CorruptCheckpoint, match=r"3/state: array w checksum mismatch.*strict_resume"):
    Checkpointer(d, every=1, log=logs.append).restore_intact(abstract, strict=True)
  assert any("4.orbax-checkpoint-tmp: an unfinished save" in l for l in logs), logs
  logs = []
  ckpt = Checkpointer(d, every=1, keep=5, log=logs.append)
  state, data, meta, step = ckpt.restore_intact(abstract)
  assert step == 1 and data == {"next": 1} and "integrity" not in meta
  np.testing.assert_array_equal(state["w"], np.asarray(_state(1)["w"]))
  text = "\n".join(logs)
  assert f"{d}/3/state: array w checksum mismatch" in text, text
  assert f"{d}/2: " in text and "Error reading" in text and "trying step 1" in text, text
  assert f"restored step 1, the newest intact checkpoint in {d}" in text, text
  # The bad ones are set aside (never listed again), so the resumed run can save those steps.
  assert sorted(os.listdir(d)) == ["1", "2.corrupt", "3.corrupt"] and ckpt.all_steps() == [1]
  ckpt.save(2, _state(2), data={"next": 2})
  ckpt.close()
  assert Checkpointer(d).restore_intact(abstract)[3] == 2
  print("\n".join(logs))


# ----------------------------------------------------------------------------- save failures

@pytest.fixture
def small_disk():
  """A 1.5 MB tmpfs (needs root); skips where it cannot be mounted."""
  mnt = tempfile.mkdtemp(prefix="small_disk_")
  r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1500k", "tmpfs", mnt], capture_output=True, text=True)
  if r.returncode:
    os.rmdir(mnt)
    pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
  try:
    yield mnt
  finally:
    subprocess.run(["umount", "-l", mnt], check=False)
    os.rmdir(mnt)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's abandoned writes
def test_save_failures_no_space_and_read_only(small_disk):
  d = os.path.join(small_disk, "ckpt")
  small = {"w": jnp.ones((1000,), jnp.float32)}
  big = {"w": jnp.asarray(np.random.default_rng(0).random(400_000, dtype=np.float32))}  # 1.6 MB > disk
  logs = []
  ckpt = Checkpointer(d, every=1, keep=5, on_save_error="retry", log=logs.append)  # async
  ckpt.save(1, small, data={"next": 1})
  ckpt.wait()
  ckpt.save(2, big, data={"next": 2})
  ckpt.wait()  # the failure of the background write surfaces here
  assert len(logs) == 1 and "checkpoint save of step 2" in logs[0] and "No space left on device" in logs[0], logs
  assert f"last good checkpoint: step 1 ({d}/1)" in logs[0] and "training continues" in logs[0], logs
  assert sorted(os.listdir(d)) == ["1"]  # no temp dir left that a restore could take for a checkpoint
  ckpt.save(3, small, data={"next": 3})  # retry at the next interval: there is room again
  ckpt.wait()
  assert ckpt.all_steps() == [1, 3]

  subprocess.run(["mount", "-o", "remount,ro", small_disk], check=True)
  ckpt.on_save_error = "stop"
  with pytest.raises(SaveError, match=r"step 4 .* failed: Read-only file system.*last good checkpoint: step 3"):
    ckpt.save(4, small, data={"next": 4})
  subprocess.run(["mount", "-o", "remount,rw", small_disk], check=True)
  ckpt.close()
  state, data, _, step = Checkpointer(d).restore_intact(jax.eval_shape(lambda: small))
  assert step == 3 and data == {"next": 3}
  np.testing.assert_array_equal(state["w"], np.ones(1000, np.float32))
  print("\n".join(logs))


# ----------------------------------------------------------------------------- 2 processes

def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _two_processes(workdir, heartbeat, *extra):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "fault_case.py"), "--process-id", str(i),
                             "--num-processes", "2", "--port", str(port), "--workdir", str(workdir),
                             "--heartbeat", str(heartbeat), *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  return procs


def _wait_for_line(proc, text, deadline):
  lines = []
  while time.time() < deadline:
    line = proc.stdout.readline()
    if not line:
      break
    lines.append(line)
    if line.startswith(text):
      return lines
  raise AssertionError(f"no {text!r} line:\n{''.join(lines)[-3000:]}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_two_processes_one_signalled(tmp_path, sig):
  heartbeat = 5
  procs = _two_processes(tmp_path, heartbeat)
  try:
    _wait_for_line(procs[0], "step 20", time.time() + 120)
    _wait_for_line(procs[1], "step 20", time.time() + 120)
    procs[1].send_signal(sig)
    t0 = time.time()
    outs = [p.communicate(timeout=heartbeat + 60)[0] for p in procs]
    waited = time.time() - t0
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  tails = [[l for l in o.strip().splitlines() if not l.startswith("done at")][-2:] for o in outs]
  if sig == signal.SIGTERM:  # both stop at the same step, save it, exit 0
    assert [p.returncode for p in procs] == [0, 0], outs
    stops = [t[-1] for t in tails]
    assert all(s.startswith("preempted (") and "all 2 processes agreed" in s for s in stops), stops
    assert stops[0].split("step ")[1].split(" ")[0] == stops[1].split("step ")[1].split(" ")[0], stops
    step = int(stops[0].split("stopped after step ")[1].split(" ")[0])
    assert max(Checkpointer(str(tmp_path / "checkpoints")).all_steps()) == step
  else:  # the survivor names the dead process within the heartbeat timeout, exits 1
    assert procs[1].returncode == -signal.SIGKILL and procs[0].returncode == 1, outs[0][-3000:]
    assert waited < heartbeat + 10, f"took {waited:.1f}s with a {heartbeat}s heartbeat timeout"
    err = [l for l in outs[0].splitlines() if l.startswith("error:")]
    assert len(err) == 1 and "lost process 1" in err[0], outs[0][-3000:]
    assert "Traceback" not in outs[0] and "details: " in outs[0]
  # The rerun resumes from the last checkpoint with nothing lost (w == 2 * step throughout).
  last = max(Checkpointer(str(tmp_path / "checkpoints")).all_steps())
  procs = _two_processes(tmp_path, heartbeat, "--steps", str(last + 3))
  outs = [p.communicate(timeout=120)[0] for p in procs]
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, out[-3000:]
    assert f"resumed from step {last}: w {2.0 * last}, data {{'step': {last}}}" in out, out[-3000:]
    assert f"done at step {last + 3}: w {2.0 * (last + 3)}" in out, out[-3000:]
  print(f"{sig.name}: {waited:.1f}s\n" + "\n".join(" | ".join(t) for t in tails))


# ----------------------------------------------------------------------------- spike guard, SDC check

def test_spike_statistics_match_the_formula():
  from longcat_jax.config import ConfigDict
  from longcat_jax.train import spike
  cfg = ConfigDict(dict(loss_sigmas=3.0, grad_norm_sigmas=0.0, warmup_steps=3, ema=0.5, max_in_a_row=2))
  xs = [5.0, 4.0, 4.5, 4.2]
  stats, mean, var = spike.init_stats(), 0.0, 0.0
  for n, x in enumerate(xs):  # reference: exponentially weighted mean/variance, uniform start
    alpha = max(1 - cfg.ema, 1 / (n + 1))
    delta = x - mean
    mean, var = mean + alpha * delta, (1 - alpha) * (var + alpha * delta ** 2)
    stats = spike.update_stats(stats, jnp.float32(x), jnp.float32(1.0), jnp.bool_(True), cfg)
  np.testing.assert_allclose([float(stats["loss_mean"]), float(stats["loss_var"])], [mean, var], rtol=1e-6)
  limit = mean + 3.0 * max(np.sqrt(var), 0.01 * mean)
  for x, want in ((limit * 0.999, False), (limit * 1.001, True)):
    got, lim = spike.is_spike(stats, jnp.float32(x), jnp.float32(1.0), cfg)
    assert bool(got) == want and np.isclose(float(lim["loss"]), limit) and np.isinf(float(lim["grad_norm"]))
  unchanged = spike.update_stats(stats, jnp.float32(100.0), jnp.float32(1.0), jnp.bool_(False), cfg)
  assert all(float(unchanged[k]) == float(stats[k]) for k in stats)


def _smoke_config():
  import importlib.util
  spec = importlib.util.spec_from_file_location("default_config", os.path.join(ROOT, "experiments", "configs",
                                                                                "default.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config("smoke")


class _SpikyIterator:
  """The training iterator with the targets of some batches (1-based) set to an id the byte
  tokenizer never produces: a loss spike."""

  def __init__(self, inner, spikes, token):
    self.inner, self.spikes, self.token, self.n = inner, spikes, token, 0

  def __next__(self):
    batch = next(self.inner)
    self.n += 1
    if self.n in self.spikes:
      batch = dict(batch, targets=np.full_like(np.asarray(batch["targets"]), self.token))
    return batch

  def get_state(self):
    return self.inner.get_state()

  def set_state(self, state):
    self.inner.set_state(state)


def _flip_one_bit(state):
  """`state` with the lowest mantissa bit of its first parameter element flipped (a memory SDC)."""
  leaves, treedef = jax.tree.flatten(state.params)
  x = np.asarray(leaves[0]).copy()
  x.reshape(-1).view(np.uint32)[0] ^= np.uint32(1)
  leaves[0] = jax.device_put(x, leaves[0].sharding)
  return state.replace(params=jax.tree.unflatten(treedef, leaves))


def test_spike_guard_and_sdc_check_in_the_training_loop(tmp_path, monkeypatch):
  import longcat_jax.data as data_lib
  from longcat_jax.train import faults, trainer
  cfg = _smoke_config()
  cfg.total_steps, cfg.checkpoint_every, cfg.sample_tokens = 10, 100, 0
  cfg.data.cache_dir = str(tmp_path / "corpus")
  cfg.sdc_every = 5
  cfg.spike.update(loss_sigmas=3.0, grad_norm_sigmas=3.0, warmup_steps=4, max_in_a_row=2)
  one_device = trainer.make_mesh
  monkeypatch.setattr(trainer, "make_mesh", lambda config, devices=None: one_device(config, jax.devices()[:1]))
  real_iterator = data_lib.make_train_iterator
  monkeypatch.setattr(trainer, "make_train_iterator",
                      lambda *a, **k: _SpikyIterator(real_iterator(*a, **k), {8, 9}, cfg.model.vocab_size - 1))
  # Silent data corruption in the SDC check's rerun of step 5: one weight bit flipped in memory,
  # so that run computes different gradients from the same inputs.
  real_recheck = faults.recheck_step

  def recheck(step_fn, state, batch, result, step, log):
    calls = []

    def flaky(s, b):
      calls.append(step)
      return step_fn(_flip_one_bit(s) if step == 5 and len(calls) == 1 else s, b)

    return real_recheck(flaky, state, batch, result, step, log)

  monkeypatch.setattr(faults, "recheck_step", recheck)
  logs = []
  with pytest.raises(faults.RunStopped, match=r"step 9: 2 loss spikes in a row"):
    trainer.run(cfg, str(tmp_path / "run"), progress=False, log=logs.append)
  text = "\n".join(logs)
  assert "step 5: SDC check failed: two runs of the step on the same inputs gave different gradients" in text, text
  assert "step 5: redone; the third run agrees with the first, kept" in text, text
  assert text.count("SDC check failed") == 1, text
  assert "step 8: loss spike, update skipped (1 in a row)" in text, text
  assert "step 9: loss spike, update skipped (2 in a row)" in text, text
  assert not any(f"step {s}: loss spike" in text for s in range(1, 8)), text
  print(text)


def test_older_checkpoint_without_a_new_state_field_restores_with_its_default(tmp_path):
  import flax

  @flax.struct.dataclass
  class Old:
    step: jax.Array
    w: jax.Array

  @flax.struct.dataclass
  class New:
    step: jax.Array
    w: jax.Array
    guard: dict = None

  d = str(tmp_path / "ckpt")
  ckpt = Checkpointer(d, every=1, async_save=False)
  ckpt.save(3, Old(step=jnp.int32(3), w=jnp.arange(4.0)), data={"next": 3})
  ckpt.close()
  logs = []
  target = jax.eval_shape(lambda: New(step=jnp.int32(0), w=jnp.zeros(4), guard={"count": jnp.float32(0)}))
  state, data, _, step = Checkpointer(d, log=logs.append).restore_intact(
      target, defaults={"guard": {"count": jnp.float32(0)}})
  assert step == 3 and int(state.step) == 3 and float(state.guard["count"]) == 0.0 and data == {"next": 3}
  np.testing.assert_array_equal(state.w, np.arange(4.0))
  assert any("no ['guard'] in this (older) checkpoint" in l for l in logs), logs
  with pytest.raises(CorruptCheckpoint, match=r"has no \['guard'\] \(and no default"):
    Checkpointer(d).restore(target)


def test_watchdog_fires_once_when_steps_stop():
  from longcat_jax.train import faults
  lines = []
  dog = faults.Watchdog(0.4, on_timeout=lines.append)
  time.sleep(0.6)
  assert not lines  # not armed before the first step (compilation)
  for step in (1, 2, 3):
    dog.pet(step)
    time.sleep(0.1)
  assert not lines
  time.sleep(1.5)  # "hung" after step 3
  dog.close()
  assert len(lines) == 1 and "no step finished in 0.4s after step 3" in lines[0], lines
