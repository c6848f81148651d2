"""Trains a LongCat model: `python experiments/train.py [--config FILE.py[:variant]] [--config.F=V] [--workdir DIR]`.

With no arguments: `experiments/configs/default.py` on the Python standard library's sources, in
./runs/default. Running the same command again resumes from the last checkpoint (or says the run
is done). Metrics: DIR/metrics.jsonl and TensorBoard events in DIR/tensorboard; checkpoints in
DIR/checkpoints (orbax). SIGTERM / SIGINT stop after the step in flight, save and exit 0 (rerun
to resume). A failure prints one line and exits 1; tracebacks, warnings and library logs
(stderr) go to DIR/train.log (DIR/train.process<i>.log for process i > 0). See
longcat_jax/train/trainer.py and longcat_jax/train/faults.py.

The same command runs on one CPU, on one accelerator host and on many hosts:
  --config.mesh="fsdp=2,expert=4"      the device mesh (default fsdp=-1: FSDP over every device)
  --cpu_devices=8                      simulate 8 CPU devices (before JAX starts)
  --coordinator_address=H:P --num_processes=N --process_id=I   one process per host (or the env
                                       variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
                                       JAX_PROCESS_ID; SLURM, Open MPI and TPU pods are detected)
See docs/SCALING.md for launch scripts. On Linux the command re-executes itself once with
GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (huge pages for large host allocations; see
`_hugepage_malloc`; LONGCAT_HUGEPAGE_MALLOC=0 turns it off).
"""

import os
import sys


def _hugepage_malloc() -> None:
  """Re-executes this command once with glibc's `glibc.malloc.hugetlb=1` tunable (Linux, glibc >=
  2.35): large allocations, such as XLA:CPU's per-step scratch, then sit on transparent huge pages;
  on a 2-core CPU box the `small` training step ran ~10% faster with 13x fewer page faults. The
  tunable is read only at process start, hence the exec (same PID, arguments and environment).
  LONGCAT_HUGEPAGE_MALLOC=0 turns it off."""
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  if (not sys.platform.startswith("linux") or "glibc.malloc.hugetlb" in tunables
      or os.environ.get("LONGCAT_HUGEPAGE_MALLOC", "1") == "0"):
    return
  try:
    major, minor = map(int, os.confstr("CS_GNU_LIBC_VERSION").split()[1].split(".")[:2])
  except (ValueError, OSError, IndexError, AttributeError):  # not glibc
    return
  if (major, minor) < (2, 35):
    return
  os.environ["GLIBC_TUNABLES"] = ":".join(filter(None, [tunables, "glibc.malloc.hugetlb=1"]))
  sys.stdout.flush()
  os.execv(sys.executable, sys.orig_argv)


if __name__ == "__main__":
  _hugepage_malloc()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
try:
  import longcat_jax  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
  sys.path.insert(0, ROOT)

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(ROOT, "experiments", "configs", "default.py"),
    "Training config file (get_config() -> ConfigDict); FILE.py:variant passes `variant`.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Run directory: checkpoints, metrics, TensorBoard.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar (else a log line every 10 steps).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", None, "Simulated CPU devices per process (testing layouts).")
_HEARTBEAT = flags.DEFINE_integer("heartbeat_timeout_s", 60,
                                  "Multi-host: seconds without a heartbeat before a process counts as lost.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from absl import logging  # orbax logs every save step at INFO
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  from longcat_jax.parallel import distributed
  from longcat_jax.train import faults, trainer
  process = _PROCESS_ID.value if _PROCESS_ID.value is not None else int(os.environ.get("JAX_PROCESS_ID", "0") or 0)
  log_name = faults.LOG_NAME if process == 0 else f"train.process{process}.log"
  # Any failure: one console line, exit 1; tracebacks and library logs in WORKDIR/train.log.
  with faults.one_line_errors(_WORKDIR.value, log_name):
    distributed.initialize_from(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                                process_id=_PROCESS_ID.value, num_cpu_devices=_CPU_DEVICES.value,
                                heartbeat_timeout_s=_HEARTBEAT.value)
    trainer.run(_CONFIG.value, _WORKDIR.value, progress=_PROGRESS.value)


if __name__ == "__main__":
  app.run(main)
