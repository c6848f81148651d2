"""Two local processes x 4 CPU devices (jax.distributed on 127.0.0.1, gloo collectives) run the
sharded training step of parallel_case.py; both must match the single-process, 1-device result."""

import os
import socket
import subprocess
import sys

import numpy as np

import parallel_case

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_single_process(tmp_path):
  port, n = _free_port(), 2
  env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE), JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "parallel_case.py"), "--process-id", str(i),
                             "--num-processes", str(n), "--port", str(port), "--out", str(tmp_path / f"r{i}.npz")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(n)]
  ref = parallel_case.single_device_result()  # computed while the workers compile
  logs = []
  for p in procs:
    try:
      logs.append(p.communicate(timeout=300)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  for i, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == 0, f"process {i} failed:\n{log[-4000:]}"
    assert f"process {i}/2: 4 local of 8 devices" in log, log[-2000:]

  import jax
  flat_ref = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(ref)[0]}
  for i in range(n):
    got = dict(np.load(tmp_path / f"r{i}.npz"))
    assert set(got) == set(flat_ref)
    for key, want in flat_ref.items():
      if key.startswith("['grads']"):
        err = np.linalg.norm(got[key] - want) / max(np.linalg.norm(want), 1e-30)
        assert err < 1e-5, f"process {i}: gradient {key} relative error {err:.2e}"
      elif "expert_load" in key:
        np.testing.assert_array_equal(got[key], want, err_msg=f"process {i}: {key}")
      else:
        np.testing.assert_allclose(got[key], want, rtol=1e-5, err_msg=f"process {i}: {key}")
