"""The training job under SIGKILL and SIGTERM, and with its newest checkpoint corrupted: the resumed
per-step losses are bitwise those of one uninterrupted reference run (shared by the tests); a save
killed midway harms nothing."""

import glob
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from longcat_jax.train.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL, EVERY = 30, 5


def _env():
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return env


def _train_cmd(workdir, shared):
  return [sys.executable, os.path.join(ROOT, "experiments", "train.py"),
          "--config", os.path.join(ROOT, "experiments", "configs", "default.py") + ":smoke",
          "--workdir", str(workdir), "--noprogress",
          f"--config.compilation_cache={shared / 'xla_cache'}", f"--config.data.cache_dir={shared / 'corpus'}",
          f"--config.total_steps={TOTAL}", f"--config.checkpoint_every={EVERY}", "--config.sample_tokens=0"]


def _run(cmd, timeout=600, returncode=0):
  out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
  assert out.returncode == returncode, f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
  return out.stdout + out.stderr


def _losses(workdir):
  recs = read_metrics(str(workdir))
  steps = [r["step"] for r in recs]
  assert steps == list(range(1, TOTAL + 1)), f"{workdir}: logged steps {steps}"
  return {r["step"]: (r["loss"], r["nll"], r["grad_norm"], r["ffn_experts_per_token"]) for r in recs}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """(shared dir, per-step losses) of the uninterrupted run; it also fills the compilation cache
  and builds the corpus for the other runs."""
  tmp = tmp_path_factory.mktemp("reference")
  shared = tmp / "shared"
  _run(_train_cmd(tmp / "ref", shared))
  return shared, _losses(tmp / "ref")


def _signal_at_random_step(workdir, shared, sig):
  """Starts the job, sends `sig` once a random step after the first checkpoint is logged; returns
  (step it was sent after, return code, console output)."""
  seed = int.from_bytes(os.urandom(4), "little")
  kill_after = int(np.random.RandomState(seed).randint(EVERY + 1, TOTAL - 2))
  proc = subprocess.Popen(_train_cmd(workdir, shared), env=_env(), cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 600
  while len(read_metrics(str(workdir))) < kill_after:
    assert proc.poll() is None, f"run ended before the kill (rc {proc.returncode}):\n{proc.stdout.read()[-3000:]}"
    assert time.time() < deadline, "timed out waiting for the run to reach the kill step"
    time.sleep(0.005)
  proc.send_signal(sig)
  out = proc.communicate(timeout=600)[0]
  return kill_after, proc.returncode, out


def test_sigkill_then_rerun_resumes_bitwise(tmp_path, reference):
  shared, ref = reference
  workdir = tmp_path / "run"
  kill_after, rc, _ = _signal_at_random_step(workdir, shared, signal.SIGKILL)
  seed = kill_after
  assert rc == -signal.SIGKILL
  from longcat_jax.train.checkpoint import Checkpointer
  ckpt = Checkpointer(str(workdir / "checkpoints"))
  steps = ckpt.all_steps()
  ckpt.close()
  assert steps and max(steps) <= kill_after + 1, f"seed {seed}: complete checkpoints {steps} after a kill at step ~{kill_after}"

  out = _run(_train_cmd(workdir, shared))
  assert f"resumed from {workdir / 'checkpoints'} step {max(steps)}" in out, out
  got = _losses(workdir)
  diff = {s: (ref[s], got[s]) for s in ref if ref[s] != got[s]}
  assert not diff, f"seed {seed}, killed after step {kill_after}, resumed at {max(steps)}: per-step losses differ {diff}"


def _flip_bytes_of_largest_array_file(step_dir):
  path = max(glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True), key=os.path.getsize)
  b = bytearray(open(path, "rb").read())
  for i in range(len(b) // 3, len(b) // 3 + 8):
    b[i] ^= 0xFF
  open(path, "wb").write(b)
  return path


def test_sigterm_then_corrupt_newest_checkpoint_resumes_bitwise(tmp_path, reference):
  shared, ref = reference
  workdir = tmp_path / "run"
  ckpt_dir = workdir / "checkpoints"
  # SIGTERM at a random step: the step in flight finishes, is saved, exit 0 with one line.
  sent_after, rc, out = _signal_at_random_step(workdir, shared, signal.SIGTERM)
  assert rc == 0, out[-3000:]
  last = out.strip().splitlines()[-1]
  assert last.startswith("preempted (SIGTERM): stopped after step "), out[-3000:]
  stopped = int(last.split("stopped after step ")[1].split(";")[0])
  assert sent_after <= stopped <= sent_after + 2, (sent_after, last)
  from longcat_jax.train.checkpoint import Checkpointer
  assert max(Checkpointer(str(ckpt_dir)).all_steps()) == stopped
  assert [r["step"] for r in read_metrics(str(workdir))] == list(range(1, stopped + 1))
  out = _run(_train_cmd(workdir, shared))
  assert f"resumed from {ckpt_dir} step {stopped}" in out, out
  got = _losses(workdir)
  diff = {s: (ref[s], got[s]) for s in ref if ref[s] != got[s]}
  assert not diff, f"SIGTERM after step {sent_after}, stopped at {stopped}: per-step losses differ {diff}"

  # The newest checkpoint (the final step) corrupted: strict_resume refuses with one line, naming it ...
  steps = Checkpointer(str(ckpt_dir)).all_steps()
  newest, previous = steps[-1], steps[-2]
  _flip_bytes_of_largest_array_file(str(ckpt_dir / str(newest)))
  out = _run(_train_cmd(workdir, shared) + ["--config.strict_resume=true"], returncode=1)
  errors = [l for l in out.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and f"{ckpt_dir / str(newest)}/state: array " in errors[0], out[-3000:]
  assert "checksum mismatch" in errors[0] and "strict_resume" in errors[0] and "Traceback" not in out, out[-3000:]
  # ... and without it the run names it, resumes from the previous one, and retrains bitwise.
  out = _run(_train_cmd(workdir, shared))
  assert f"checkpoint unreadable, skipped: {ckpt_dir / str(newest)}/state: array " in out, out
  assert f"restored step {previous}, the newest intact checkpoint" in out, out
  assert f"resumed from {ckpt_dir} step {previous}" in out, out
  got = _losses(workdir)
  diff = {s: (ref[s], got[s]) for s in ref if ref[s] != got[s]}
  assert not diff, f"resumed from step {previous} past a corrupt step {newest}: per-step losses differ {diff}"
  print(out)


_SAVE_THEN_DIE = r"""
import os, signal, sys
import jax.numpy as jnp, numpy as np
from longcat_jax.train.checkpoint import Checkpointer
ckpt = Checkpointer(sys.argv[1], every=1, keep=5)
ckpt.save(1, {"w": jnp.arange(10.0)}, data={"next_index": 1})
ckpt.wait()
big = {"w": jnp.asarray(np.random.RandomState(0).rand(64 << 20).astype(np.float32))}   # 256 MiB
ckpt.save(2, big, data={"next_index": 2})
print("save 2 started", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_save_killed_midway_keeps_last_complete_checkpoint(tmp_path):
  import jax
  from longcat_jax.train.checkpoint import Checkpointer
  d = tmp_path / "ckpt"
  proc = subprocess.run([sys.executable, "-c", _SAVE_THEN_DIE, str(d)], env=_env(), capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == -signal.SIGKILL and "save 2 started" in proc.stdout, proc.stderr[-3000:]
  leftovers = [p for p in os.listdir(d) if p not in ("1",)]
  assert any("tmp" in p for p in leftovers), f"the kill did not land mid-save: {os.listdir(d)}"
  ckpt = Checkpointer(str(d), every=1, keep=5)
  assert ckpt.all_steps() == [1] and ckpt.latest_step() == 1
  state, data, _ = ckpt.restore({"w": jax.ShapeDtypeStruct((10,), np.float32)})
  np.testing.assert_array_equal(state["w"], np.arange(10.0))
  assert data == {"next_index": 1}
  # The half-written step is gone and the step can be saved again.
  assert sorted(os.listdir(d)) == ["1"]
  ckpt.save(2, {"w": np.ones(3, np.float32)}, data={"next_index": 2})
  ckpt.close()
  assert Checkpointer(str(d)).all_steps() == [1, 2]


def test_full_disk_and_missing_init_from_end_with_one_line(tmp_path, reference):
  shared, _ = reference
  # init_from naming a missing directory: one line, exit 1, no second traceback from orbax.
  out = _run(_train_cmd(tmp_path / "grow", shared) + [f"--config.init_from={tmp_path / 'missing'}"], returncode=1)
  assert out.splitlines()[0] == f"error: FileNotFoundError: init_from='{tmp_path / 'missing'}': no such directory", out
  assert len(out.splitlines()) == 2 and "Traceback" in open(tmp_path / "grow" / "train.log").read(), out

  # The checkpoint directory on a 2 MB tmpfs: the first checkpoints fit, a later save fills it.
  ckpt_dir = tmp_path / "run" / "checkpoints"
  ckpt_dir.mkdir(parents=True)
  r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2000k", "tmpfs", str(ckpt_dir)], capture_output=True, text=True)
  if r.returncode:
    pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
  try:
    out = _run(_train_cmd(tmp_path / "run", shared), returncode=1)
    errors = [l for l in out.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "No space left on device" in errors[0], out[-3000:]
    assert "last good checkpoint: step " in errors[0] and "Traceback" not in out, out[-3000:]
    assert len(out.splitlines()) < 10, out
    last_good = int(errors[0].split("last good checkpoint: step ")[1].split(" ")[0])
    from longcat_jax.train.checkpoint import Checkpointer
    assert not [p for p in os.listdir(ckpt_dir) if "tmp" in p], os.listdir(ckpt_dir)
    ckpt = Checkpointer(str(ckpt_dir))
    assert ckpt.latest_step() == last_good >= EVERY
    restored = ckpt.read_meta(last_good)  # readable (full restore + verify: test_faults.py)
    assert "config" in restored
  finally:
    subprocess.run(["umount", "-l", str(ckpt_dir)], check=False)
  print(out)
