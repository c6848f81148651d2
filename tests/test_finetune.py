"""The released-checkpoint path (issue 17): prep chat data with the checkpoint's template, fine-tune
from `init_from=hf:DIR`, export the run in the released layout, and chat with it.

One small random transformers LongCat-Flash (tests/chat_fixture.py) is fine-tuned once (30 steps,
module fixture) and every test reads that run."""

import importlib
import io
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from chat_fixture import CONVERSATIONS, make_chat_checkpoint, write_chat_jsonl

import longcat_jax as lj
from longcat_jax.data import prep
from longcat_jax.data.pipeline import make_train_iterator
from longcat_jax.train import init_from, trainer
from longcat_jax.train.metrics import read_metrics
from longcat_jax.train.step import make_train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ, BATCH, STEPS = 128, 4, 30


def _finetune_config(ckpt, store):
  c = _load_finetune().get_config()
  c.init_from = "hf:" + ckpt
  c.data.store = store
  c.data.num_threads = c.data.prefetch = 0
  c.model.dtype = "float32"
  c.total_steps, c.batch_size, c.seq_len = STEPS, BATCH, SEQ
  c.optimizer.update(lr=3e-3, schedule="constant", warmup_steps=3)
  c.loss.z_loss_weight = c.loss.balance_loss_weight = 0.0   # the objective is the masked NLL
  c.checkpoint_every = STEPS
  c.async_checkpoint = False
  c.log_every = 1
  return c


def _load_finetune():
  import importlib.util
  spec = importlib.util.spec_from_file_location("finetune_config", os.path.join(ROOT, "experiments", "configs",
                                                                                 "finetune.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("ft")
  ckpt, store, workdir = str(root / "released"), str(root / "chat_store"), str(root / "run")
  ref = make_chat_checkpoint(ckpt)
  jsonl = str(root / "chat.jsonl")
  write_chat_jsonl(jsonl)
  assert prep.main(["--chat", jsonl, "--tokenizer", ckpt, "--output", store, "--seq-len", str(SEQ)]) == 0
  config = _finetune_config(ckpt, store)
  summary = trainer.run(config, workdir, progress=False, log=lambda *_: None)
  return dict(ref=ref, ckpt=ckpt, store=store, workdir=workdir, config=config, summary=summary, root=root)


def _hf_masked_nll(ref, batch):
  """transformers' mean NLL over the batch's loss mask, each packed conversation run on its own."""
  total, count = 0.0, 0.0
  for r in range(batch["input_ids"].shape[0]):
    seg = batch["segment_ids"][r]
    for s in range(1, seg.max() + 1):
      where = np.flatnonzero(seg == s)
      with torch.no_grad():
        logits = ref(torch.as_tensor(batch["input_ids"][r][where][None], dtype=torch.long)).logits[0].double()
      logp = torch.log_softmax(logits, -1).numpy()
      w = batch["loss_mask"][r][where]
      nll = -logp[np.arange(len(where)), batch["targets"][r][where]]
      total += float((nll * w).sum())
      count += float(w.sum())
  return total / count


def test_first_step_loss_equals_transformers_and_loss_falls(run):
  metrics = {m["step"]: m for m in read_metrics(os.path.join(run["workdir"], "metrics.jsonl"))}
  assert sorted(metrics) == list(range(1, STEPS + 1))
  it = make_train_iterator(run["store"], SEQ, BATCH, run["config"].seed, 0, 1, num_threads=0, prefetch=0)
  want = _hf_masked_nll(run["ref"], next(it))
  np.testing.assert_allclose(metrics[1]["loss"], want, rtol=1e-5)
  assert metrics[1]["nll"] == metrics[1]["loss"]
  last = np.mean([metrics[s]["nll"] for s in range(STEPS - 2, STEPS + 1)])
  assert last < 0.5 * metrics[1]["nll"], (metrics[1]["nll"], last)
  origin = init_from.read_origin(run["workdir"])
  assert origin["source"] == run["ckpt"] and "tokenizer.json" in origin["files"]


def test_non_assistant_targets_change_nothing(run):
  config = init_from.resolve_config(run["config"], log=lambda *_: None)
  model = lj.LongcatForCausalLM(config.model)
  state = init_from.initial_state_from_hf(model, config, jax.random.PRNGKey(0), log=lambda *_: None)
  step = jax.jit(make_train_step(model, config))
  it = make_train_iterator(run["store"], SEQ, BATCH, 0, 0, 1, num_threads=0, prefetch=0)
  batch = next(it)
  off = (batch["loss_mask"] == 0) & (batch["segment_ids"] > 0)
  assert off.sum() > 50 and (batch["loss_mask"] > 0).sum() > 20
  changed = dict(batch, targets=np.where(off, (batch["targets"] + 7) % 300, batch["targets"]))
  (s1, m1), (s2, m2) = step(state, batch), step(state, changed)
  assert float(m1["loss"]) == float(m2["loss"])
  jax.tree.map(np.testing.assert_array_equal, s1.params, s2.params)
  # ... while an assistant token's target does change the loss.
  on = np.argwhere(batch["loss_mask"] > 0)[0]
  flipped = batch["targets"].copy()
  flipped[tuple(on)] = (flipped[tuple(on)] + 1) % 300
  _, m3 = step(state, dict(batch, targets=flipped))
  assert float(m3["loss"]) != float(m1["loss"])


def test_init_from_refuses_a_changed_architecture(run):
  c = _finetune_config(run["ckpt"], run["store"])
  c.model.hidden_size, c.model.num_layers = 128, 2   # 2 equals the checkpoint's: fine
  with pytest.raises(ValueError, match=r"model.hidden_size=128 \(checkpoint: 64\)\. The architecture comes from"):
    init_from.resolve_config(c, log=lambda *_: None)
  c.model.hidden_size = None
  c.model.remat = "full"
  assert init_from.resolve_config(c, log=lambda *_: None).model.remat == "full"


def test_bad_init_from_ends_with_one_message(tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
  for bad in ("hf:" + str(tmp_path / "missing"), str(tmp_path / "no_run")):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "train.py"), "--config",
                        os.path.join(ROOT, "experiments", "configs", "default.py") + ":smoke",
                        f"--config.init_from={bad}", "--workdir", str(tmp_path / "w"), "--noprogress"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode != 0
    assert p.stderr.count("Traceback") == 1, p.stderr[-3000:]
    assert "FileNotFoundError" in p.stderr and "cannot schedule new futures" not in p.stderr
