"""One process of the 2-process fault tests in test_faults.py (jax.distributed on 127.0.0.1, gloo):

    python tests/fault_case.py --process-id 0 --num-processes 2 --port 12345 --workdir DIR

A loop of tiny sharded steps (a global sum over both processes' devices, as a training step's
gradient all-reduce) that checkpoints every 5 steps, stops on the agreed preemption step
(`faults.Preemption`), and runs under `faults.one_line_errors` like experiments/train.py. It
prints "step N" lines; the test SIGTERMs or SIGKILLs one process.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _main():
  p = argparse.ArgumentParser()
  p.add_argument("--process-id", type=int, required=True)
  p.add_argument("--num-processes", type=int, required=True)
  p.add_argument("--port", type=int, required=True)
  p.add_argument("--workdir", required=True)
  p.add_argument("--heartbeat", type=int, default=5)
  p.add_argument("--steps", type=int, default=100000)
  a = p.parse_args()
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from longcat_jax.parallel import distributed
  distributed.initialize(f"127.0.0.1:{a.port}", a.num_processes, a.process_id, cpu_collectives="gloo",
                         num_cpu_devices=1, heartbeat_timeout_seconds=a.heartbeat,
                         shutdown_timeout_seconds=a.heartbeat)
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  from longcat_jax.train import faults
  from longcat_jax.train.checkpoint import Checkpointer

  workdir = os.path.join(a.workdir, f"p{a.process_id}")
  with faults.one_line_errors(workdir):
    mesh = Mesh(np.array(jax.devices()), ("data",))
    rep = NamedSharding(mesh, P())
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), np.ones((1,), np.float32), (2,))
    step_fn = jax.jit(lambda w, x: w + x.sum(), out_shardings=rep)
    w = jax.device_put(jnp.zeros((4,), jnp.float32), rep)
    ckpt = Checkpointer(os.path.join(a.workdir, "checkpoints"), every=5, keep=2)
    start = 0
    if ckpt.latest_step() is not None:  # a rerun resumes (each step adds 2: w == 2 * step)
      restored, data, _, start = ckpt.restore_intact({"w": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=rep)})
      w = restored["w"]
      print(f"resumed from step {start}: w {float(w[0])}, data {data}", flush=True)
    with faults.Preemption() as preempt:
      for step in range(start + 1, a.steps + 1):
        w = step_fn(w, x)
        float(w[0])  # the host waits for the collective, as the trainer's metrics fetch does
        stop = preempt.should_stop(step)
        ckpt.save(step, {"w": w}, data={"step": step}, force=stop)
        if stop:
          ckpt.wait()
          print(preempt.message(step, ckpt.step_dir(step)), flush=True)
          break
        print(f"step {step}", flush=True)
        time.sleep(0.02)
    ckpt.close()
    print(f"done at step {step}: w {float(w[0])}", flush=True)


if __name__ == "__main__":
  _main()
