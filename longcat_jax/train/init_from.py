"""Start a training run from a released (Hugging Face layout) LongCat checkpoint: `init_from="hf:DIR"`.

    python experiments/train.py --config experiments/configs/finetune.py \
        --config.init_from=hf:/ckpt/LongCat-Flash-Chat --config.data.store=/data/chat --workdir runs/ft

Semantics of `config.init_from = "hf:DIR"`:
  * model config: DIR/config.json (`longcat_jax.config.from_hf_config`), as `load_pretrained` reads
    it. `config.model` fields that are None (the placeholders of `checkpoint_model_config()`, what
    experiments/configs/finetune.py uses) are taken from the checkpoint. A field that is set is an
    override: allowed for the fields in `OVERRIDABLE` (numerics and execution: dtype, remat,
    kernels, block sizes, the controller's target), refused with one message naming every other
    field whose value differs from the checkpoint's (e.g. a changed hidden_size: the weights would
    not fit). Master weights default to float32 (`param_dtype`), whatever the stored dtype.
  * weights: params and the `expert_bias` collection (the router's selection bias
    `e_score_correction_bias`, kept as trained) from `load_pretrained` (any layout and dtype it
    reads); MTP heads when config.json has them and the checkpoint holds `model.mtp.*`.
  * optimizer: fresh (`train.step.state_from_params`), step 0.
  * origin: `record_origin` copies DIR's small files (config.json, generation_config.json,
    tokenizer files, chat template) to WORKDIR/origin/ and writes WORKDIR/origin.json
    {"init_from", "source", "files"}; `python -m longcat_jax.export` reads them to write the
    trained model back in the released layout.
Problems (no such directory, no config.json, no weights) raise before any checkpoint manager
exists, so a bad `init_from` ends the run with one message.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
from ml_collections import config_dict

from longcat_jax import config as config_lib
from longcat_jax.interop import load_pretrained
from longcat_jax.interop.hf import CONFIG_NAME, INDEX_NAME, SINGLE_NAME, read_config, read_format
from longcat_jax.train.step import state_from_params

HF_PREFIX = "hf:"
# Model fields a fine-tune may set differently from the checkpoint: they change numerics or
# execution, not the weights' shapes or the function the weights compute.
OVERRIDABLE = ("name", "dtype", "param_dtype", "remat", "scan_unroll", "kernels", "attention_block_q",
               "attention_block_k", "moe_block_size", "target_ffn_experts", "initializer_range")
# Files of a checkpoint directory that travel with a run (everything but the weights).
ORIGIN_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "chat_template.jinja", "chat_template.json", "tokenizer.model",
                "vocab.json", "merges.txt", "added_tokens.json")
ORIGIN_DIR, ORIGIN_JSON = "origin", "origin.json"


def is_hf(init_from: str) -> bool:
  return isinstance(init_from, str) and init_from.startswith(HF_PREFIX)


def source_dir(init_from: str) -> str:
  """The checkpoint directory of `hf:DIR`, checked to hold a config.json and weights."""
  path = os.path.abspath(os.path.expanduser(init_from[len(HF_PREFIX):]))
  if not init_from[len(HF_PREFIX):]:
    raise ValueError("init_from='hf:' names no directory; use init_from=hf:/path/to/checkpoint")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"init_from={init_from!r}: no such directory {path}")
  if not os.path.isfile(os.path.join(path, CONFIG_NAME)):
    raise FileNotFoundError(f"init_from={init_from!r}: {path} has no {CONFIG_NAME}")
  if not any(os.path.isfile(os.path.join(path, f)) for f in (INDEX_NAME, SINGLE_NAME)):
    raise FileNotFoundError(f"init_from={init_from!r}: {path} has no {INDEX_NAME} or {SINGLE_NAME}")
  return path


def checkpoint_model_config() -> config_lib.ConfigDict:
  """`config.model` for a run started from a checkpoint: every field a typed None placeholder
  (take it from the checkpoint), each settable from the command line (`--config.model.remat=full`)."""
  c = config_lib.ConfigDict()
  for k, v in config_lib.base_config().items():
    if v is not None and not isinstance(v, (dict, config_lib.ConfigDict)):
      c[k] = config_dict.placeholder(type(v))
  return c


def _has_mtp_tensors(path: str) -> bool:
  index = os.path.join(path, INDEX_NAME)
  if os.path.isfile(index):
    with open(index) as f:
      keys = json.load(f).get("weight_map", {})
  else:
    from safetensors import safe_open  # pylint: disable=import-outside-toplevel
    with safe_open(os.path.join(path, SINGLE_NAME), framework="numpy") as f:
      keys = list(f.keys())
  return any(k.startswith("model.mtp.") for k in keys)


def model_config(given: config_lib.ConfigDict, path: str) -> config_lib.ConfigDict:
  """The run's model config: DIR/config.json, with `given`'s set fields as checked overrides."""
  c = read_config(path)
  if c.mtp_num_heads and not _has_mtp_tensors(path):
    c.mtp_num_heads = 0  # as load_pretrained does (it warns)
  c.param_dtype = c.dtype = "float32"
  refused = []
  for k, v in given.items():
    if v is None:
      continue
    if k not in c:
      raise ValueError(f"model.{k}: not a model config field")
    if k in OVERRIDABLE:
      c[k] = v
    elif _plain(v) != _plain(c[k]):
      refused.append((k, v, c[k]))
  if refused:
    diffs = ", ".join(f"model.{k}={v!r} (checkpoint: {w!r})" for k, v, w in refused)
    raise ValueError(f"init_from=hf:{path}: {diffs}. The architecture comes from {path}/{CONFIG_NAME} (its "
                     f"weights would not fit another); only {', '.join(OVERRIDABLE)} may be overridden. Leave "
                     "the other model fields unset (experiments/configs/finetune.py) or equal to the checkpoint's.")
  config_lib.validate(c)
  c.hf_format = read_format(path, c)  # so that an export of the run writes the release's layout back
  return c


def _plain(v):
  return v.to_dict() if isinstance(v, config_lib.ConfigDict) else v


def resolve_config(config, workdir: str | None = None, log=print):
  """A copy of the training `config` whose `model` is the checkpoint's (see the module docstring);
  records the run's origin in `workdir` when given."""
  path = source_dir(config.init_from)
  c = model_config(config.model, path)
  new = config.copy_and_resolve_references()
  with new.unlocked():
    new.model = c
  if workdir is not None:
    record_origin(workdir, path, config.init_from)
  log(f"init_from {config.init_from}: {c.num_layers} layers, hidden {c.hidden_size}, "
      f"{c.num_ffn_experts} + {c.zero_experts} experts, vocab {c.vocab_size}")
  return new


def record_origin(workdir: str, path: str, init_from: str) -> dict:
  """Copies DIR's non-weight files to WORKDIR/origin/ and writes WORKDIR/origin.json (primary
  process only); returns the origin record."""
  files = [f for f in ORIGIN_FILES if os.path.isfile(os.path.join(path, f))]
  record = {"init_from": init_from, "source": path, "files": files}
  if jax.process_index() == 0:
    dst = os.path.join(workdir, ORIGIN_DIR)
    os.makedirs(dst, exist_ok=True)
    for f in files:
      shutil.copyfile(os.path.join(path, f), os.path.join(dst, f))
    tmp = os.path.join(workdir, ORIGIN_JSON + ".tmp")
    with open(tmp, "w") as f:
      json.dump(record, f, indent=1)
    os.replace(tmp, os.path.join(workdir, ORIGIN_JSON))
  return record


def read_origin(workdir: str) -> dict | None:
  """WORKDIR/origin.json with `files_dir` (the copies) added, or None for a run not started from
  a checkpoint."""
  p = os.path.join(workdir, ORIGIN_JSON)
  if not os.path.isfile(p):
    return None
  with open(p) as f:
    record = json.load(f)
  record["files_dir"] = os.path.join(workdir, ORIGIN_DIR)
  return record


def load_variables(config, *, mesh=None, shardings=None):
  """(model, variables) of the checkpoint, laid out for `config.model` (`resolve_config`'s).

  `mesh` / `shardings` are passed to `load_pretrained` when given (its sharded, streaming form).
  """
  path = source_dir(config.init_from)
  c = config.model
  kwargs = {k: v for k, v in (("mesh", mesh), ("shardings", shardings)) if v is not None}
  overrides = {k: c[k] for k in OVERRIDABLE if k != "param_dtype"}
  overrides["mtp_num_heads"] = c.mtp_num_heads
  model, variables = load_pretrained(path, dtype=jnp.dtype(c.param_dtype), config_overrides=overrides, **kwargs)
  if model.config.to_dict() != c.to_dict():
    diff = [k for k in c if model.config.get(k) != c[k]]
    raise ValueError(f"init_from={config.init_from!r}: loaded model config differs from the run's in {diff}")
  return model, variables


def initial_state_from_hf(model, config, rng, log=print, *, mesh=None, shardings=None):
  """A step-0 `TrainState` with the checkpoint's params and expert bias and a fresh optimizer."""
  _, variables = load_variables(config, mesh=mesh, shardings=shardings)
  rng = jnp.asarray(rng)
  if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.key_data(rng)
  log(f"initialised from {config.init_from}: params + expert bias loaded, fresh optimizer state")
  return state_from_params(model, config, variables["params"], variables["expert_bias"], rng)
