"""Export a training run in the Hugging Face LongCat layout, with its tokenizer and generation config.

    python -m longcat_jax.export --run WORKDIR [--step N] --out DIR [--dtype bfloat16|float32|fp8]

Reads the params and expert bias of the orbax checkpoint WORKDIR/checkpoints/<step> (default: the
latest complete one; the optimizer state is not read) and the training config saved in its meta, and writes DIR with `longcat_jax.save_pretrained` (safetensors
+ index + config.json), loadable by transformers and by `longcat_jax.load_pretrained`.

Where the run came from: a run started with `init_from=hf:SRC` has WORKDIR/origin.json and copies
of SRC's small files in WORKDIR/origin/ (`longcat_jax.train.init_from.record_origin`). From them
the export copies the tokenizer files, the chat template and generation_config.json, and writes
config.json as SRC's with the model fields replaced by the run's (so extra fields of the release
survive). A run without an origin gets the tokenizer.json (and tokenizer_config.json beside it)
that its data store names.

dtype: the default is the origin's stored dtype (from its config.json), else bfloat16. The router
weights and the expert bias stay float32 (the released checkpoints keep them in high precision);
everything else is cast. `fp8` writes the released FP8 layout (block e4m3 `weight_scale_inv`,
`quantization_config`); with no --dtype a run that started from an FP8 release is written in FP8
again (the layout it was loaded from). The weights are restored sharded over the local devices
(FSDP, the trainer's own layout) and written tensor by tensor from their shards.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from longcat_jax import config as config_lib
from longcat_jax.interop import CheckpointError, save_pretrained
from longcat_jax.model import LongcatForCausalLM
from longcat_jax.train import init_from, trainer
from longcat_jax.train.checkpoint import Checkpointer, with_shardings
from longcat_jax.train.step import abstract_train_state

DTYPES = ("bfloat16", "float32", "float16", "fp8")
_KEEP_F32 = ("router",)   # param leaf names kept in float32 on export


def run_config(workdir: str, step: int | None = None):
  """(training config, step) of a run's checkpoint (the latest complete one by default)."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{workdir}: not a training run (no checkpoints/ directory)")
  ckpt = Checkpointer(directory, async_save=False)
  try:
    steps = ckpt.all_steps()
    if not steps:
      raise FileNotFoundError(f"{directory}: no complete checkpoint")
    if step is None:
      step = max(steps)
    elif step not in steps:
      raise FileNotFoundError(f"{directory}: no checkpoint at step {step} (have {sorted(steps)})")
    meta = ckpt.read_meta(step)
  finally:
    ckpt.close()
  if "config" not in meta:
    raise ValueError(f"{directory}/{step}: checkpoint meta has no 'config'")
  return config_lib.ConfigDict(json.loads(meta["config"])), step


def load_run(workdir: str, step: int | None = None, sharding=None):
  """(model, variables {"params", "expert_bias"}, step) of a run's checkpoint.

  Only the params and the expert bias are read (an orbax partial restore: the optimizer state
  stays on disk), laid out with `sharding` (one sharding for every leaf), by default the
  trainer's FSDP layout over the local devices (`trainer.build` with mesh "fsdp=-1"), so no
  stacked leaf is gathered on one device; the model then holds that mesh's placement.
  """
  config, step = run_config(workdir, step)
  if sharding is None:
    config.mesh, config.dcn_mesh = "fsdp=-1", ""
    program = trainer.build(config, trainer.make_mesh(config, jax.local_devices()))
    model = program.model
    abstract = program.abstract_state
    wanted = {"params": abstract.params, "expert_bias": abstract.expert_bias}
  else:
    model = LongcatForCausalLM(config.model)
    abstract = abstract_train_state(model, config)
    wanted = with_shardings({"params": abstract.params, "expert_bias": abstract.expert_bias}, sharding)
  restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), wanted)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  try:
    out = ckpt.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=wanted, restore_args=restore_args, partial_restore=True)))
  finally:
    ckpt.close()
  return model, {"params": out["state"]["params"], "expert_bias": out["state"]["expert_bias"]}, step


def run_files_dir(workdir: str, config=None) -> str | None:
  """Where a run's tokenizer / template / generation config live: WORKDIR/origin, or the directory
  of the tokenizer.json its data store names; None if neither."""
  origin = init_from.read_origin(workdir)
  if origin is not None:
    return origin["files_dir"]
  if config is None:
    config, _ = run_config(workdir)
  store = config.data.get("store", "")
  meta = os.path.join(store, "meta.json") if store else ""
  if meta and os.path.isfile(meta):
    with open(meta) as f:
      tok = json.load(f).get("tokenizer", "")
    if tok and os.path.isfile(tok):
      return os.path.dirname(tok)
  return None


def _stored_dtype(files_dir: str | None) -> str:
  if files_dir and os.path.isfile(os.path.join(files_dir, "config.json")):
    with open(os.path.join(files_dir, "config.json")) as f:
      hf = json.load(f)
    name = hf.get("dtype") or hf.get("torch_dtype")
    if name in ("bfloat16", "float32", "float16"):
      return name
  return "bfloat16"


def cast_variables(variables, dtype: str):
  """params cast to `dtype`, except the router weights (and the expert bias), kept float32."""
  want = jnp.dtype(dtype)

  def cast(path, x):
    keep = any(getattr(p, "key", None) in _KEEP_F32 for p in path)
    return x.astype(jnp.float32 if keep else want)

  return {"params": jax.tree_util.tree_map_with_path(cast, variables["params"]),
          "expert_bias": jax.tree.map(lambda x: x.astype(jnp.float32), variables["expert_bias"])}


def export_run(workdir: str, out: str, step: int | None = None, dtype: str | None = None, log=print) -> str:
  """Writes the run's model to `out` (see the module docstring); returns `out`."""
  config, step = run_config(workdir, step)
  files_dir = run_files_dir(workdir, config)
  requested = dtype is not None
  dtype = dtype or _stored_dtype(files_dir)
  if dtype not in DTYPES:
    raise ValueError(f"--dtype {dtype!r} must be one of {DTYPES}")
  quantization = "fp8" if dtype == "fp8" else (None if requested else "auto")
  stored = "bfloat16" if dtype == "fp8" else dtype   # FP8 blocks are quantized from bfloat16 weights
  model, variables, _ = load_run(workdir, step)
  c = model.config.copy_and_resolve_references()
  c.param_dtype = c.dtype = stored
  save_pretrained(out, model.clone(config=c), cast_variables(variables, stored), quantization=quantization)
  copied = _copy_files(files_dir, out, dtype)
  log(f"exported {workdir} step {step} -> {out} ({dtype}; copied {', '.join(copied) or 'no tokenizer files'})")
  return out


def _copy_files(files_dir: str | None, out: str, dtype: str) -> list[str]:
  if files_dir is None:
    return []
  copied = []
  for name in init_from.ORIGIN_FILES:
    src = os.path.join(files_dir, name)
    if not os.path.isfile(src):
      continue
    if name == "config.json":
      with open(src) as f:
        theirs = json.load(f)
      with open(os.path.join(out, name)) as f:
        ours = json.load(f)
      if dtype != "fp8":
        theirs.pop("quantization_config", None)
      merged = {**theirs, **ours}
      if "torch_dtype" in theirs:
        merged["torch_dtype"] = "bfloat16" if dtype == "fp8" else dtype
      with open(os.path.join(out, name), "w") as f:
        json.dump(merged, f, indent=2)
    else:
      shutil.copyfile(src, os.path.join(out, name))
    copied.append(name)
  return copied


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m longcat_jax.export", description=__doc__.split("\n\n")[0])
  p.add_argument("--run", required=True, help="training run directory (holds checkpoints/)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
  p.add_argument("--out", required=True, help="output directory (Hugging Face layout)")
  p.add_argument("--dtype", choices=DTYPES, default=None, help="default: the origin's stored dtype, else bfloat16")
  args = p.parse_args(argv)
  try:
    export_run(args.run, args.out, args.step, args.dtype)
  except (FileNotFoundError, ValueError, CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
