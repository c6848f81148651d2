"""Trains a LongCat model: `python experiments/train.py [--config FILE.py[:variant]] [--config.F=V] [--workdir DIR]`.

With no arguments: `experiments/configs/default.py` on the Python standard library's sources, in
./runs/default. Running the same command again resumes from the last checkpoint (or says the run
is done). Metrics: DIR/metrics.jsonl and TensorBoard events in DIR/tensorboard; checkpoints in
DIR/checkpoints (orbax). SIGTERM / SIGINT stop after the step in flight, save and exit 0 (rerun
to resume). A failure prints one line and exits 1; tracebacks, warnings and library logs
(stderr) go to DIR/train.log. See longcat_jax/train/trainer.py and longcat_jax/train/faults.py.
"""

import os
import sys

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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from absl import logging  # orbax logs every save step at INFO
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  from longcat_jax.train import faults, trainer
  # [issue 19] any failure: one console line, exit 1; tracebacks and library logs in WORKDIR/train.log
  with faults.one_line_errors(_WORKDIR.value):
    trainer.run(_CONFIG.value, _WORKDIR.value, progress=_PROGRESS.value)


if __name__ == "__main__":
  app.run(main)
