"""One training path from one device to a multi-host mesh (longcat_jax/train/trainer.py).

The trainer itself (`trainer.run`, and `experiments/train.py` as a subprocess) on the `smoke`
model: on 8 simulated CPU devices in several layouts its per-step losses equal the 1-device run's,
the state's per-device bytes (read from the arrays' shards) are what the layout promises; two
processes x 4 devices (jax.distributed on 127.0.0.1, gloo) train the same losses, resume bitwise
after SIGKILL, and their checkpoint restores in one process on 8 devices and on 1 device.
"""

import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from longcat_jax.train import trainer
from longcat_jax.train.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "experiments", "configs", "default.py") + ":smoke"
STEPS, BATCH = 20, 8


def smoke_config(shared, **fields):
  from experiments.configs import default
  c = default.get_config("smoke")
  c.total_steps, c.batch_size, c.sample_tokens = STEPS, BATCH, 0
  c.data.cache_dir = str(shared / "corpus")
  c.compilation_cache = str(shared / "xla_cache")
  c.async_checkpoint = False
  for k, v in fields.items():
    c[k] = v
  return c


def losses_of(workdir):
  return np.array([r["loss"] for r in read_metrics(str(workdir))])


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
  return tmp_path_factory.mktemp("shared")


@pytest.fixture(scope="module")
def one_device(shared, tmp_path_factory):
  """The reference: the trainer on one device."""
  config = smoke_config(shared)
  workdir = tmp_path_factory.mktemp("one_device")
  trainer.run(config, str(workdir), progress=False, log=lambda m: None,
              mesh=trainer.make_mesh(config, devices=jax.devices()[:1]))
  return losses_of(workdir)


def _state_bytes(tree):
  """(bytes of the whole arrays, bytes this process's first device holds) over a state subtree."""
  total = per_device = 0
  for x in jax.tree.leaves(tree):
    total += x.nbytes
    per_device += x.addressable_shards[0].data.nbytes
  return total, per_device


@pytest.mark.parametrize("mesh,split", [("fsdp=2,expert=4", 8), ("data=8", 1), ("fsdp=4,context=2", 4)])
def test_layouts_train_the_one_device_losses(mesh, split, one_device, shared, tmp_path):
  config = smoke_config(shared, mesh=mesh)
  summary = trainer.run(config, str(tmp_path), progress=False, log=lambda m: None)
  program, state = summary["program"], summary["state"]
  assert program.mesh.size == 8 and dict(program.mesh.shape) == {**dict(data=1, fsdp=1, expert=1, tensor=1,
                                                                        context=1), **trainer.sharding.parse_mesh(mesh)}
  got = losses_of(tmp_path)
  assert len(got) == STEPS
  np.testing.assert_allclose(got, one_device, rtol=1e-5, err_msg=f"mesh {mesh}")
  if mesh == "fsdp=4,context=2":
    assert program.model.placement.length_shards(config.seq_len, BATCH) == 2  # context parallel inside
  # Per-device bytes read from the arrays: the weights and Adam moments are split `split` ways,
  # except small leaves the table replicates on purpose (norm scales, router bias, counters).
  for name in ("params", "opt_state"):
    total, per_device = _state_bytes(getattr(state, name))
    replicated = sum(x.nbytes for x in jax.tree.leaves(getattr(state, name))
                     if x.addressable_shards[0].data.nbytes == x.nbytes)
    assert per_device == pytest.approx((total - replicated) / split + replicated), name
    assert replicated < (0.05 if split > 1 else 1.01) * total, (name, replicated, total)


# ----------------------------------------------------------------------------------------------
# Two processes.


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env():
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return env


def _two_processes(workdir, shared, total, *extra):
  port = _free_port()
  cmd = lambda i: [sys.executable, os.path.join(ROOT, "experiments", "train.py"), "--config", CONFIG,
                   "--workdir", str(workdir), "--noprogress", "--cpu_devices=4", "--num_processes=2",
                   f"--process_id={i}", f"--coordinator_address=127.0.0.1:{port}",
                   "--config.mesh=fsdp=2,expert=4", f"--config.total_steps={total}", f"--config.batch_size={BATCH}",
                   "--config.checkpoint_every=4", "--config.sample_tokens=0", "--config.async_checkpoint=False",
                   f"--config.data.cache_dir={shared / 'corpus'}", f"--config.compilation_cache={shared / 'xla_cache'}", *extra]
  return [subprocess.Popen(cmd(i), env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
          for i in range(2)]


def _wait(procs, timeout=600):
  logs = []
  for p in procs:
    try:
      logs.append(p.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  for i, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == 0, f"process {i} failed:\n{log[-4000:]}"
  return logs


def _signal_at(procs, run, step, sig, deadline, targets=None):
  """Waits until `run` has logged `step` steps, then sends `sig` to `targets` (default: all)."""
  while len(read_metrics(str(run))) < step:
    assert all(p.poll() is None for p in procs), "a process ended before the signal:\n" + procs[0].communicate()[0][-3000:]
    assert time.time() < deadline, f"timed out waiting for step {step}"
    time.sleep(0.05)
  for p in targets or procs:
    p.send_signal(sig)


def test_two_processes_train_resume_after_sigkill_and_restore_anywhere(shared, tmp_path):
  total = 24  # long enough that both signals land before the run ends
  # 1 process, 8 devices, same layout: the losses the two processes must train.
  one_process = tmp_path / "one_process"
  config = smoke_config(shared, mesh="fsdp=2,expert=4", total_steps=total, checkpoint_every=4)
  trainer.run(config, str(one_process), progress=False, log=lambda m: None)

  ref = tmp_path / "two_processes"
  logs = _wait(_two_processes(ref, shared, total))
  assert "this process reads batch shard 0 of 2" in logs[0] and "mesh fsdp=2,expert=4 (8 devices, 2 processes)" in logs[0]
  assert "mesh" not in logs[1]  # process 0 logs; the other only reports errors
  want = losses_of(ref)
  assert len(want) == total
  np.testing.assert_allclose(want, losses_of(one_process), rtol=1e-5)

  # SIGKILL both processes at a random step after the first checkpoint, then the same command;
  # SIGTERM that run (what SLURM sends a job before a kill) some steps later: both agree on a step,
  # save it and exit 0; the same command again finishes. The losses are bitwise the uninterrupted
  # run's, no step missing.
  run = tmp_path / "killed"
  kill_after = int(np.random.default_rng(int.from_bytes(os.urandom(4), "little")).integers(5, total // 2))
  deadline = time.time() + 900
  procs = _two_processes(run, shared, total)
  _signal_at(procs, run, kill_after, signal.SIGKILL, deadline)
  for p in procs:
    p.wait()
  procs = _two_processes(run, shared, total)
  _signal_at(procs, run, kill_after + 4, signal.SIGTERM, deadline)
  logs = _wait(procs)
  assert "resumed from" in logs[0], logs[0][-2000:]
  assert "preempted (SIGTERM)" in logs[0] and "all 2 processes agreed on the step" in logs[0], logs[0][-2000:]
  logs = _wait(_two_processes(run, shared, total))
  assert "resumed from" in logs[0], logs[0][-2000:]
  np.testing.assert_array_equal(losses_of(run), want)

  # One process SIGKILLed: the other stops with one message naming the lost process, not a hang.
  run = tmp_path / "dead_peer"
  procs = _two_processes(run, shared, total, "--heartbeat_timeout_s=10")
  _signal_at(procs, run, 3, signal.SIGKILL, deadline, targets=procs[1:])
  t0 = time.time()
  out = procs[0].communicate(timeout=180)[0]
  assert procs[0].returncode != 0 and time.time() - t0 < 60, (time.time() - t0, out[-2000:])
  assert "lost process 1" in out or "process 1" in out, out[-2000:]
  assert out.count("Traceback") == 0, out[-2000:]

  # Its next-to-last checkpoint restored in one process, on 8 devices and on 1 device: the next loss.
  run = tmp_path / "killed"
  step = sorted(int(d) for d in os.listdir(run / "checkpoints") if d.isdigit())[-2]
  for name, devices in (("eight", jax.devices()), ("one", jax.devices()[:1])):
    work = tmp_path / f"restore_{name}"
    (work / "checkpoints").mkdir(parents=True)
    shutil.copytree(run / "checkpoints" / str(step), work / "checkpoints" / str(step))
    config = smoke_config(shared, mesh="fsdp=-1", total_steps=total, checkpoint_every=1000)
    config.total_steps = total
    summary = trainer.run(config.copy_and_resolve_references(), str(work), progress=False, log=lambda m: None,
                          mesh=trainer.make_mesh(config, devices=devices))
    assert summary["start_step"] == step
    got = losses_of(work)
    np.testing.assert_allclose(got[0], want[step], rtol=1e-5, err_msg=f"restored on {name} device(s)")
