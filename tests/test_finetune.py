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


def _two_processes(args, timeout=600):
  import socket
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "experiments", "train.py"), *args, "--cpu_devices=4",
                             "--num_processes=2", f"--process_id={i}", f"--coordinator_address=127.0.0.1:{port}"],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  logs = [p.communicate(timeout=timeout)[0] for p in procs]
  for i, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == 0, f"process {i}:\n{log[-3000:]}"


def test_same_finetune_from_two_processes_on_an_expert_parallel_mesh(run, tmp_path):
  """The fine-tuning command from 2 processes x 4 devices (experiments/train.py) with
  --config.mesh="fsdp=2,expert=4" (init_from loads each process's shards onto the 8-device mesh)
  trains the module run's (1 device) first steps."""
  steps = 4
  want = [m["loss"] for m in read_metrics(os.path.join(run["workdir"], "metrics.jsonl"))][:steps]
  flags = [f"--config={os.path.join(ROOT, 'experiments', 'configs', 'finetune.py')}", f"--workdir={tmp_path / 'mp'}",
           "--noprogress", f"--config.init_from=hf:{run['ckpt']}", f"--config.data.store={run['store']}",
           "--config.data.num_threads=0", "--config.data.prefetch=0", "--config.model.dtype=float32",
           f"--config.total_steps={steps}", f"--config.batch_size={BATCH}", f"--config.seq_len={SEQ}",
           "--config.optimizer.lr=3e-3", "--config.optimizer.schedule=constant", "--config.optimizer.warmup_steps=3",
           "--config.loss.z_loss_weight=0", "--config.loss.balance_loss_weight=0", f"--config.checkpoint_every={steps}",
           "--config.async_checkpoint=False", "--config.mesh=fsdp=2,expert=4"]
  _two_processes(flags)
  np.testing.assert_allclose([m["loss"] for m in read_metrics(str(tmp_path / "mp"))], want, rtol=1e-5)


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
    errors = [l for l in p.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "FileNotFoundError" in errors[0], p.stderr[-3000:]
    assert "Traceback" not in p.stderr + p.stdout, p.stderr[-3000:]  # the one traceback is in the run's log
    log = open(tmp_path / "w" / "train.log").read()
    assert "cannot schedule new futures" not in log + p.stderr, log[-3000:]


# ---------------------------------------------------------------------------------------------
# Export.


def _tensors(path):
  """Every stored tensor of a checkpoint directory as numpy (F8 and BF16 through ml_dtypes)."""
  from longcat_jax.interop.safetensors_io import CheckpointFiles
  files = CheckpointFiles(path)
  try:
    return {k: files.read(k) for k in files.keys()}
  finally:
    files.close()


@pytest.fixture(scope="module")
def exported(run):
  from longcat_jax import export
  out = {}
  for dtype in ("float32", "bfloat16"):
    out[dtype] = str(run["root"] / f"export_{dtype}")
    assert export.main(["--run", run["workdir"], "--out", out[dtype], "--dtype", dtype]) == 0
  return out


def test_export_loads_in_transformers_and_longcat_jax_with_our_logits(run, exported):
  from transformers import LongcatFlashForCausalLM
  from longcat_jax import export
  model, variables, step = export.load_run(run["workdir"])
  assert step == STEPS
  ids = np.asarray([run["ref"].config.bos_token_id] + list(range(10, 40)), np.int32)[None]
  ours = np.asarray(model.apply(variables, ids))
  path = exported["float32"]
  ref = LongcatFlashForCausalLM.from_pretrained(path).float().eval()
  with torch.no_grad():
    theirs = ref(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
  assert np.abs(ours - np.asarray(lj.load_pretrained(run["ckpt"])[0].apply(
      lj.load_pretrained(run["ckpt"])[1], ids))).max() > 1e-2  # the export holds the TRAINED weights
  m2, v2 = lj.load_pretrained(path)
  np.testing.assert_allclose(np.asarray(m2.apply(v2, ids)), ours, atol=1e-5, rtol=0)
  # Tokenizer, template and generation config came along; config.json keeps the release's fields.
  for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
    with open(os.path.join(path, name), "rb") as a, open(os.path.join(run["ckpt"], name), "rb") as b:
      assert a.read() == b.read(), name
  with open(os.path.join(path, "config.json")) as f, open(os.path.join(run["ckpt"], "config.json")) as g:
    exp, src = json.load(f), json.load(g)
  assert set(src) <= set(exp) and exp["hidden_size"] == src["hidden_size"]


def test_export_load_export_is_bitwise(run, exported, tmp_path):
  from longcat_jax import export
  path = exported["bfloat16"]
  first = _tensors(path)
  assert str(first["model.layers.0.mlp.router.classifier.weight"].dtype) == "float32"
  assert str(first["model.embed_tokens.weight"].dtype) == "bfloat16"
  model, variables = lj.load_pretrained(path)
  again = str(tmp_path / "again")
  lj.save_pretrained(again, model, variables)
  second = _tensors(again)
  assert sorted(first) == sorted(second)
  for k in first:
    assert first[k].dtype == second[k].dtype and first[k].tobytes() == second[k].tobytes(), k
  # FP8 on request: the released layout (e4m3 blocks + weight_scale_inv, quantization_config);
  # it loads back, and load -> save with the stored scales gives the same bytes.
  fp8_dir = str(tmp_path / "fp8")
  assert export.main(["--run", run["workdir"], "--out", fp8_dir, "--dtype", "fp8"]) == 0
  q = _tensors(fp8_dir)
  assert str(q["model.layers.0.mlp.experts.0.gate_proj.weight"].dtype) == "float8_e4m3fn"
  assert "model.layers.0.mlp.experts.0.gate_proj.weight_scale_inv" in q
  with open(os.path.join(fp8_dir, "config.json")) as f:
    assert json.load(f)["quantization_config"]["fmt"] == "e4m3"
  model, variables = lj.load_pretrained(fp8_dir)
  again = str(tmp_path / "fp8_again")
  lj.save_pretrained(again, model, variables, fp8_scales=fp8_dir)
  second = _tensors(again)
  assert sorted(q) == sorted(second)
  for k in q:
    assert q[k].dtype == second[k].dtype and q[k].tobytes() == second[k].tobytes(), k


# ---------------------------------------------------------------------------------------------
# Chat.


def _hf_chat(path, turns, max_new_tokens):
  """transformers: the same conversation, greedy, with the template and generation_config.json."""
  from transformers import AutoTokenizer, LongcatFlashForCausalLM
  tok = AutoTokenizer.from_pretrained(path)
  ref = LongcatFlashForCausalLM.from_pretrained(path).float().eval()
  eos = ref.generation_config.eos_token_id
  eos = [eos] if isinstance(eos, int) else list(eos)
  conv, log = [], []
  for text in turns:
    conv.append({"role": "user", "content": text})
    ids = tok.apply_chat_template(conv, add_generation_prompt=True, return_dict=True)["input_ids"]
    out = ref.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                       do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos,
                       pad_token_id=tok.pad_token_id)
    reply = out[0, len(ids):].tolist()
    if eos[0] in reply:  # HF pads after EOS
      reply = reply[:reply.index(eos[0]) + 1]
    log.append({"prompt_ids": ids, "reply_ids": reply})
    conv.append({"role": "assistant", "content": tok.decode([t for t in reply if t not in eos])})
  return log, eos


def test_chat_from_stdin_equals_transformers_generate(run, exported, tmp_path, monkeypatch, capsys):
  cli = importlib.import_module("longcat_jax.generate")
  turns = ["What is the capital of France?", "And the moon?"]
  path = exported["float32"]
  want, eos = _hf_chat(path, turns, 24)
  log = str(tmp_path / "tokens.jsonl")
  monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(turns) + "\n"))
  assert cli.main(["--checkpoint", path, "--chat", "--temperature", "0", "--max-new-tokens", "24", "--context", "128",
                   "--token-log", log]) == 0
  out = capsys.readouterr()
  with open(log) as f:
    got = [json.loads(line) for line in f]
  assert got == want
  assert want[0]["reply_ids"][-1] in eos          # the reply stopped at EOS
  lines = out.out.split("\n")
  assert len(lines) == 3 and lines[2] == "" and "<|end|>" not in out.out
  # A run directory is a checkpoint too; --prompt-file decodes one-turn conversations as a batch.
  prompts = tmp_path / "prompts.txt"
  prompts.write_text(turns[0] + "\n" + "Do experts cost much?\n")
  log2 = str(tmp_path / "tokens2.jsonl")
  assert cli.main(["--checkpoint", run["workdir"], "--chat", "--prompt-file", str(prompts), "--temperature", "0",
                   "--max-new-tokens", "24", "--token-log", log2]) == 0
  with open(log2) as f:
    got2 = [json.loads(line) for line in f]
  assert got2[0] == want[0]
  assert len(capsys.readouterr().out.strip().split("\n")) == 2


def test_chat_uses_mtp_speculation_when_the_checkpoint_has_it(tmp_path, monkeypatch, capsys):
  from chat_fixture import write_tokenizer
  from longcat_jax import inference
  from longcat_jax.data.chat import ChatTemplate
  cli = importlib.import_module("longcat_jax.generate")
  model = lj.LongcatForCausalLM(lj.get_config("tiny", mtp_num_heads=1, max_position_embeddings=256))
  variables = lj.init_variables(model, jax.random.key(1))
  path = str(tmp_path / "mtp")
  lj.save_pretrained(path, model, variables)
  write_tokenizer(path)
  log = str(tmp_path / "tokens.jsonl")
  monkeypatch.setattr(sys, "stdin", io.StringIO("What is the capital of France?\n"))
  assert cli.main(["--checkpoint", path, "--chat", "--temperature", "0", "--max-new-tokens", "12", "--context", "64",
                   "--token-log", log]) == 0
  assert "MTP draft acceptance" in capsys.readouterr().err
  with open(log) as f:
    got = json.loads(f.readline())
  template = ChatTemplate.from_dir(path)
  prompt = template.tokenize([{"role": "user", "content": "What is the capital of France?"}], True)
  assert got["prompt_ids"] == prompt
  eos = template.tokenizer.eos_id
  plain = inference.generate(model, variables, [prompt], 12, temperature=0.0, eos_token_id=eos)
  assert got["reply_ids"] == plain.tokens[0, :plain.num_tokens[0]].tolist()
