"""Shared harness of the paper experiments (`experiments/exp_*.py`) and the notebooks.

    store = common.corpus()                                  # byte-level Python-stdlib corpus
    stats = common.token_stats_fn(model)(variables, batch)   # per-token loss, FFN experts, type
    common.save_json("exp1", numbers); common.save_figure(fig, "exp1")

Training goes through the trainer (`longcat_jax.train`); see `train_run` below. Every experiment
has a `--scale` (`small` = the CPU setting quoted in RESULTS.md; larger ones change only the config)
and a `--smoke` flag (a few steps, used by tests/test_experiments.py).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.environ.get("LONGCAT_RESULTS_DIR", os.path.join(ROOT, "experiments", "results"))
DATA_DIR = os.environ.get("LONGCAT_DATA_DIR", os.path.join(ROOT, "data_cache"))


# ----------------------------------------------------------------------------------------------
# Data.


def corpus(max_files: int | None = None) -> str:
  """Path of the byte-tokenized Python-stdlib token store (built once under DATA_DIR)."""
  from longcat_jax.data import prepare_default_corpus
  return prepare_default_corpus(DATA_DIR, max_files=max_files)


def eval_batches(store_path: str, seq_len: int, batch_size: int, num_batches: int, seed: int = 12345):
  """A fixed held-out-style list of batches (a different shuffle seed from training)."""
  from longcat_jax.data import make_train_iterator
  it = make_train_iterator(store_path, seq_len, batch_size, seed, 0, 1, num_threads=0, prefetch=0)
  return [next(it) for _ in range(num_batches)]


# Byte-token classes of the *input* token at each position (ByteTokenizer: id = 3 + byte).
TOKEN_TYPES = ("word start", "word continuation", "digit", "space", "newline", "punctuation",
               "other")


def token_types(ids: np.ndarray) -> np.ndarray:
  """Byte-token ids [..., S] -> class index into TOKEN_TYPES [..., S]."""
  ids = np.asarray(ids)
  b = ids - 3
  is_letter = lambda x: ((x >= 65) & (x <= 90)) | ((x >= 97) & (x <= 122)) | (x == 95)  # A-Z a-z _
  prev = np.concatenate([np.full(b.shape[:-1] + (1,), -1), b[..., :-1]], axis=-1)
  letter = is_letter(b)
  t = np.full(b.shape, TOKEN_TYPES.index("other"))
  t[(b >= 33) & (b <= 126)] = TOKEN_TYPES.index("punctuation")
  t[(b >= 48) & (b <= 57)] = TOKEN_TYPES.index("digit")
  t[letter & ~is_letter(prev)] = TOKEN_TYPES.index("word start")
  t[letter & is_letter(prev)] = TOKEN_TYPES.index("word continuation")
  t[(b == 32) | (b == 9)] = TOKEN_TYPES.index("space")
  t[b == 10] = TOKEN_TYPES.index("newline")
  return t


# ----------------------------------------------------------------------------------------------
# Looking inside a model.


def token_stats_fn(model):
  """Jitted `f(variables, batch)` -> per-token statistics of one batch (numpy):

  loss [B, S] float32 next-token cross-entropy (nats) at each position, mask [B, S] (loss_mask),
  ffn_experts [L, B, S] FFN experts chosen per token per layer, expert_load [L, N+Z], types [B, S],
  hidden_norm / hidden_max_abs [B, S] L2 norm / max |z_i| of the last layer's hidden state z
  (before the final norm).
  """
  import jax
  import jax.numpy as jnp

  @jax.jit
  def f(variables, input_ids, targets, positions, segment_ids):
    logits, state = model.apply(variables, input_ids, positions, segment_ids,
                                mutable=["intermediates", "expert_load"], capture_intermediates=
                                lambda mdl, name: mdl.name == "decoder" and name == "__call__")
    logits = logits.astype(jnp.float32)
    loss = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
    moe = state["intermediates"]["decoder"]["layers"]["moe"]
    hidden = state["intermediates"]["decoder"]["__call__"][0]
    return dict(loss=loss, ffn_experts=moe["ffn_experts_per_token"][0],
                expert_load=state["expert_load"]["decoder"]["layers"]["moe"]["router"],
                hidden_norm=jnp.linalg.norm(hidden.astype(jnp.float32), axis=-1),
                hidden_max_abs=jnp.max(jnp.abs(hidden.astype(jnp.float32)), axis=-1))

  def stats(variables, batch):
    v = {k: variables[k] for k in ("params", "expert_bias") if k in variables}
    out = jax.device_get(f(v, batch["input_ids"], batch["targets"], batch["positions"],
                           batch["segment_ids"]))
    out = {k: np.asarray(x) for k, x in out.items()}
    out["mask"] = np.asarray(batch["loss_mask"]) > 0
    out["types"] = token_types(batch["input_ids"])
    return out

  return stats


def concat_stats(stats: list[dict]) -> dict:
  """Joins token_stats of several batches along the batch axis (expert_load is summed)."""
  out = {}
  for k in stats[0]:
    if k == "expert_load":
      out[k] = sum(s[k] for s in stats)
    else:
      out[k] = np.concatenate([s[k] for s in stats], axis=1 if k == "ffn_experts" else 0)
  return out


def by_token_type(values: np.ndarray, types: np.ndarray, mask: np.ndarray, min_count: int = 1) -> dict:
  """Mean of `values` [B, S] per token class -> {class: {"mean", "count"}} (masked positions only;
  classes with fewer than `min_count` tokens are left out)."""
  out = {}
  for i, name in enumerate(TOKEN_TYPES):
    sel = (types == i) & mask
    if sel.sum() >= max(min_count, 1):
      out[name] = {"mean": float(values[sel].mean()), "count": int(sel.sum())}
  return out


def spearman(x: np.ndarray, y: np.ndarray) -> float:
  """Spearman rank correlation (average ranks for ties)."""
  def rank(a):
    a = np.asarray(a, np.float64).ravel()
    order = np.argsort(a, kind="stable")
    r = np.empty(len(a))
    r[order] = np.arange(len(a))
    # average ties
    _, inv, counts = np.unique(a, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=r)
    return sums[inv] / counts[inv]
  rx, ry = rank(x), rank(y)
  return float(np.corrcoef(rx, ry)[0, 1])


# ----------------------------------------------------------------------------------------------
# Training runs (through the trainer: `longcat_jax.train.trainer.run`).

RUNS_DIR = os.environ.get("LONGCAT_RUNS_DIR", os.path.join(ROOT, "runs", "experiments"))
# Persistent XLA cache shared by the runs of an experiment (identical programs compile once).
XLA_CACHE_DIR = os.environ.get("LONGCAT_XLA_CACHE", os.path.join(RUNS_DIR, "xla_cache"))

# The CPU-sized model of the experiments: the `tiny` preset (hidden 64, 2 ScMoE layers, 8 FFN + 4
# zero experts, top-3, target 2) with the byte vocabulary rounded up to 320.
SMALL_MODEL = dict(vocab_size=320)


def train_config(preset: str = "tiny", *, model: dict | None = None, **fields):
  """A trainer config (`longcat_jax.train.get_train_config`) with the experiments' defaults:
  batch 16 x 128 tokens, 300 steps, WSD schedule, one checkpoint at the end, no sample.

  `model` overrides model fields; other keyword arguments are training fields, with dotted
  sub-fields written as `optimizer__lr=1e-3` (double underscore for the dot).
  """
  from longcat_jax.train import get_train_config
  c = get_train_config(preset)
  c.model.update(SMALL_MODEL if preset == "tiny" else {})
  c.model.update(model or {})
  c.total_steps = 300
  c.batch_size = 16
  c.seq_len = 128
  c.optimizer.lr = 3e-3
  c.optimizer.warmup_steps = 30
  c.sample_tokens = 0
  c.async_checkpoint = False
  c.keep_checkpoints = 1
  c.data.cache_dir = DATA_DIR
  c.compilation_cache = XLA_CACHE_DIR
  for key, value in fields.items():
    *path, last = key.split("__")
    target = c
    for p in path:
      target = target[p]
    if last not in target:
      raise ValueError(f"training config has no field {key.replace('__', '.')!r}")
    target[last] = value
  c.checkpoint_every = c.total_steps
  return c


class Run:
  """A finished training run: its config, per-step metrics and (on demand) final weights."""

  def __init__(self, config, workdir: str, summary: dict | None = None):
    from longcat_jax.train.metrics import read_metrics
    self.config, self.workdir, self.summary = config, workdir, summary or {}
    self.metrics = read_metrics(workdir)
    if not self.metrics:
      raise FileNotFoundError(f"{workdir}: the run wrote no metrics.jsonl")

  def curve(self, key: str) -> np.ndarray:
    """Per-step values of a logged metric ([steps] or [steps, ...] for arrays)."""
    return np.asarray([m[key] for m in self.metrics])

  @property
  def steps(self) -> np.ndarray:
    return self.curve("step")

  @property
  def model(self):
    from longcat_jax.model import LongcatForCausalLM
    return LongcatForCausalLM(self.config.model)

  def variables(self, step: int | None = None) -> dict:
    """{"params", "expert_bias"} of the checkpoint at `step` (default: the last)."""
    from longcat_jax.train.checkpoint import Checkpointer
    from longcat_jax.train.step import abstract_train_state
    ckpt = Checkpointer(os.path.join(self.workdir, "checkpoints"), async_save=False)
    from longcat_jax.train.spike import init_stats
    state, _, _ = ckpt.restore(abstract_train_state(self.model, self.config), step,
                               defaults={"guard": init_stats()})  # runs from before the spike guard
    ckpt.close()
    return {"params": state.params, "expert_bias": state.expert_bias}


REUSE = False  # set by parse_args(--reuse)


def train(config, name: str, *, fresh: bool | None = None, quiet: bool = True) -> Run:
  """Trains `config` with the trainer in RUNS_DIR/<name> (wiped first unless `fresh=False`, in
  which case a finished run there is reused; default: fresh unless --reuse) and returns the Run."""
  fresh = (not REUSE) if fresh is None else fresh
  import shutil
  from longcat_jax.train import trainer
  workdir = os.path.join(RUNS_DIR, name)
  if fresh and os.path.exists(workdir):
    shutil.rmtree(workdir)
  t = Timer()
  log = (lambda msg: print(f"  [{name}] {msg}", flush=True) if msg.startswith(("trained", "grown", "already")) else None) \
      if quiet else (lambda msg: print(f"  [{name}] {msg}", flush=True))
  summary = trainer.run(config, workdir, progress=False, log=log)
  summary["wall_seconds"] = t()
  return Run(config, workdir, summary)


def load_run(workdir: str) -> Run:
  """A trainer run directory (metrics.jsonl + checkpoints/) with the config stored in its checkpoint."""
  import json as json_lib
  from longcat_jax.train.checkpoint import Checkpointer
  from longcat_jax.train.config import ConfigDict
  path = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{workdir} has no checkpoints/ directory: not a trainer run "
                            "(python experiments/train.py --workdir DIR writes one)")
  ckpt = Checkpointer(path, async_save=False)
  try:
    meta = ckpt.read_meta()
  finally:
    ckpt.close()
  return Run(ConfigDict(json_lib.loads(meta["config"])), workdir)


def notebook_run(smoke: bool) -> Run:
  """The trained model the notebooks look at.

  $LONGCAT_CHECKPOINT (a trainer run directory) if set; else `experiments/configs/default.py`
  (its `smoke` variant when `smoke`) trained with the trainer in $LONGCAT_NOTEBOOK_WORKDIR
  (default runs/notebooks/<variant>); a finished run there is reused, not retrained.
  """
  if os.environ.get("LONGCAT_CHECKPOINT"):
    return load_run(os.environ["LONGCAT_CHECKPOINT"])
  from experiments.configs import default
  from longcat_jax.train import trainer
  variant = "smoke" if smoke else ""
  config = default.get_config(variant)
  config.sample_tokens = 0
  config.data.cache_dir = DATA_DIR
  root = os.environ.get("LONGCAT_NOTEBOOK_WORKDIR", os.path.join(ROOT, "runs", "notebooks"))
  workdir = os.path.join(root, variant or "default")
  summary = trainer.run(config, workdir, progress=False, log=lambda m: print(m) if m.startswith(("trained", "already")) else None)
  return Run(config, workdir, summary)


# ----------------------------------------------------------------------------------------------
# Results.


def results_path(name: str) -> str:
  os.makedirs(RESULTS_DIR, exist_ok=True)
  return os.path.join(RESULTS_DIR, name)


def _jsonable(x):
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return _jsonable(x.tolist())
  if isinstance(x, (np.floating, float)):
    return None if not np.isfinite(x) else round(float(x), 6)
  if isinstance(x, np.integer):
    return int(x)
  return x


def save_json(name: str, data: dict) -> str:
  """Writes results/<name>.json (floats rounded to 6 digits) and returns the path."""
  path = results_path(name + ".json")
  with open(path, "w") as f:
    json.dump(_jsonable(data), f, indent=1)
    f.write("\n")
  return path


def figure(nrows: int = 1, ncols: int = 1, size=(5.0, 3.6)):
  """A matplotlib figure (Agg backend, no display) with a grid of axes."""
  import matplotlib.pyplot as plt  # headless: matplotlib falls back to Agg by itself
  fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False)
  return fig, axes


def save_figure(fig, name: str) -> str:
  """Writes results/<name>.png (small: 80 dpi) and closes the figure."""
  import matplotlib.pyplot as plt
  path = results_path(name + ".png")
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)
  return path


def smooth(x, window: int = 10) -> np.ndarray:
  """Trailing moving average (same length; the first points average what exists)."""
  x = np.asarray(x, np.float64)
  c = np.cumsum(np.insert(x, 0, 0.0))
  n = np.minimum(np.arange(1, len(x) + 1), window)
  return (c[1:] - c[np.arange(1, len(x) + 1) - n]) / n


def tail_mean(x, frac: float = 0.1) -> float:
  """Mean of the last `frac` of a curve (the number a loss curve is compared by)."""
  x = np.asarray(x, np.float64)
  k = max(1, int(round(len(x) * frac)))
  return float(x[-k:].mean())


# ----------------------------------------------------------------------------------------------
# Command line.


def parse_args(description: str, scales: dict, add_arguments=None):
  """--scale (a key of `scales`), --smoke (a few steps; results and runs go under RUNS_DIR/smoke),
  --tag (suffix of the result names). Returns (args, the chosen scale's dict, result name suffix)."""
  global RESULTS_DIR, RUNS_DIR, REUSE
  p = argparse.ArgumentParser(description=description)
  p.add_argument("--scale", default="small", choices=sorted(k for k in scales if k != "smoke"),
                 help="experiment size; 'small' is the 2-core CPU setting quoted in RESULTS.md")
  p.add_argument("--smoke", action="store_true", help="a few steps only (tests)")
  p.add_argument("--tag", default="", help="suffix of the result file names")
  p.add_argument("--reuse", action="store_true",
                 help="reuse finished runs in RUNS_DIR instead of retraining (re-plot after editing the analysis; "
                      "the runs must have been made with the same settings)")
  if add_arguments is not None:
    add_arguments(p)
  args = p.parse_args()
  REUSE = args.reuse
  if args.smoke:
    RUNS_DIR = os.path.join(RUNS_DIR, "smoke")
    RESULTS_DIR = os.path.join(RUNS_DIR, "results")
  suffix = (f"_{args.scale}" if args.scale != "small" else "") + (f"_{args.tag}" if args.tag else "")
  return args, scales["smoke" if args.smoke else args.scale], suffix


def set_fields(config, items) -> None:
  """Applies `--set FIELD=VALUE` overrides (VALUE a Python literal, else a bare string) to an
  ml_collections config; an unknown field is an error naming it (plan.py, bench_mfu.py)."""
  for item in items:
    field, _, value = item.partition("=")
    if field not in config:
      raise SystemExit(f"--set {item}: the model config has no field {field!r}")
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      pass  # a bare string, e.g. --set kernels=xla
    with config.ignore_type():
      config[field] = value


def summary_line(name: str, out: dict) -> str:
  claims = ", ".join(f"{k}={'HELD' if v else 'NOT HELD'}" for k, v in out.get("claims", {}).items())
  return (f"{name}: {claims} (wall {out.get('wall_seconds', 0):.0f}s, cpu {out.get('cpu_seconds', 0):.0f}s); "
          f"numbers in {results_path(name + '.json')}")


class Timer:
  """Wall seconds since creation (`timer()`), plus CPU seconds of this process and its children
  (`timer.cpu()`) and the 1-minute load average (`timer.load()`): on a shared machine the CPU
  time is the better measure of what the experiment costs."""

  def __init__(self):
    self.t0 = time.time()
    self.c0 = self._cpu()

  @staticmethod
  def _cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system

  def __call__(self) -> float:
    return time.time() - self.t0

  def cpu(self) -> float:
    return self._cpu() - self.c0

  @staticmethod
  def load() -> float:
    return os.getloadavg()[0]

  def record(self) -> dict:
    return dict(wall_seconds=self(), cpu_seconds=self.cpu(), load_average_1min_at_end=self.load(),
                cpu_cores=os.cpu_count())
