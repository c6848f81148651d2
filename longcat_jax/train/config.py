"""Training configuration: a `ConfigDict` with the model preset under `model` and every training field.

    config = get_train_config("tiny", total_steps=200)       # model preset + training defaults
    config.model.hidden_size = 128
    config.optimizer.lr = 1e-3

`experiments/configs/*.py` build on this (big_vision style), and every field can be overridden on
the command line: `--config.optimizer.lr=1e-3 --config.model.num_layers=2`.
"""

from __future__ import annotations

from longcat_jax import config as config_lib
from longcat_jax.parallel import sharding

ConfigDict = config_lib.ConfigDict

NONFINITE_CHOICES = ("skip", "stop")
ON_SAVE_ERROR_CHOICES = ("stop", "retry")


def get_train_config(model: str = "tiny", **overrides) -> ConfigDict:
  c = ConfigDict()
  c.model = config_lib.get_config(model)
  c.seed = 0
  c.total_steps = 1000
  c.batch_size = 8                 # global batch (sequences per optimizer step)
  c.seq_len = 256
  c.grad_accum_steps = 1           # microbatches per step (batch_size must divide)

  # Parallelism: the mesh over all global devices ("axis=size,...", axes data/fsdp/expert/tensor/
  # context, one -1 fills), its slow-network part ("data=2": groups of `data` across slices or
  # hosts), edits of the logical-axis table ("batch=data+fsdp,length=context"; parallel/sharding.py)
  # and the expert-parallel transport (parallel/expert_parallel.py).
  c.mesh = "fsdp=-1"
  c.dcn_mesh = ""
  c.rules = ""
  c.ep_transport = "auto"
  c.ep_chunk_tokens = 0

  c.data = ConfigDict()
  c.data.store = ""                # token store path; "" = the Python-stdlib corpus, built on first use
  c.data.cache_dir = "data_cache"  # where the default corpus is built
  c.data.max_files = 0             # default corpus: first N stdlib files (0 = all)
  c.data.num_threads = 2
  c.data.prefetch = 4

  c.optimizer = ConfigDict()
  c.optimizer.name = "adamw"        # adamw | muon (Muon for hidden matrices, AdamW for the rest; optimizer.py)
  c.optimizer.muon_momentum = 0.95
  c.optimizer.muon_ns_steps = 5
  c.optimizer.muon_update_rms = 0.2  # Moonshot: 0.2 * sqrt(max(fan_in, fan_out)) matches AdamW's update RMS
  c.optimizer.lr = 3e-3
  c.optimizer.schedule = "wsd"     # wsd | cosine | constant
  c.optimizer.warmup_steps = 50
  c.optimizer.decay_fraction = 0.2  # wsd: last fraction of the steps decays
  c.optimizer.final_lr_ratio = 0.1
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.95
  c.optimizer.eps = 1e-16          # the report's finding (spec section 5)
  c.optimizer.weight_decay = 0.1
  c.optimizer.grad_clip = 1.0
  c.optimizer.proxy_hidden_size = 0  # > 0: width transfer from a proxy of that hidden size

  c.loss = ConfigDict()
  c.loss.z_loss_weight = 1e-7      # lambda of the hidden z-loss
  c.loss.balance_loss_weight = 1e-3  # alpha of the device-level balance loss
  c.loss.balance_groups = 1        # D: FFN-expert groups (the expert-parallel degree)
  c.loss.mtp_loss_weight = 0.1     # weight of the mean MTP head loss (model.mtp_num_heads > 0)
  c.loss.chunk_tokens = 0          # tokens per output-projection chunk (0 = 16M logits per chunk)
  c.loss.indexer_kl_weight = 0.0   # > 0: train the sparse indexer by KL to attention (DeepSeek-V3.2; step.py)
  c.loss.indexer_dense_warmup_steps = 0  # first steps: dense attention, only the indexer trains

  c.controller = ConfigDict()
  c.controller.rate = 0.3          # mu of the expert-bias update (spec section 3)
  c.controller.decay_steps = 100.0  # mu_t = mu / sqrt(1 + t / decay_steps)

  c.nonfinite = "skip"             # skip: drop the update, log it; stop: checkpoint-free stop
  c.log_every = 1
  c.checkpoint_every = 100
  c.keep_checkpoints = 3
  c.async_checkpoint = True
  c.strict_resume = False         # a checkpoint that fails to read/verify: refuse (else use the newest intact)
  c.on_save_error = "stop"         # stop: end the run with one message; retry: log it, save at the next interval
  c.step_timeout_s = 0.0           # > 0: end the run with one line if no step finishes this long (hangs)
  c.sdc_every = 0                  # > 0: every N steps rerun the step, compare gradients bitwise (SDC check)
  c.spike = ConfigDict()           # loss-spike guard (train/spike.py); sigmas 0 = that test off
  c.spike.loss_sigmas = 0.0        # skip the update if loss > mean + loss_sigmas * std (running stats)
  c.spike.grad_norm_sigmas = 0.0   # ... or grad norm > mean + grad_norm_sigmas * std
  c.spike.warmup_steps = 20        # accepted steps before the guard can fire
  c.spike.ema = 0.98               # decay of the running mean / variance
  c.spike.max_in_a_row = 5         # stop the run after this many consecutive spikes
  c.init_from = ""                 # orbax checkpoint dir of a trained model to grow from, or hf:DIR (init_from.py)
  c.grow_factor = 2                # model growth: stack the trained layers this many times
  c.sample_prompt = "def "
  c.sample_tokens = 64
  c.compilation_cache = ""         # persistent XLA compilation cache dir ("" = off)
  for k, v in overrides.items():
    if k not in c:
      raise ValueError(f"training config has no field {k!r}")
    c[k] = v
  return c


def validate(c: ConfigDict) -> None:
  """Raises ValueError naming the field that is wrong."""
  config_lib.validate(c.model)
  if c.batch_size <= 0 or c.batch_size % c.grad_accum_steps:
    raise ValueError(f"batch_size={c.batch_size} must be a positive multiple of grad_accum_steps="
                     f"{c.grad_accum_steps}")
  if c.nonfinite not in NONFINITE_CHOICES:
    raise ValueError(f"nonfinite={c.nonfinite!r} must be one of {NONFINITE_CHOICES}")
  for field, parse in (("mesh", sharding.parse_mesh), ("dcn_mesh", sharding.parse_mesh),
                       ("rules", sharding.parse_rules)):
    try:
      parse(c[field])
    except ValueError as e:
      raise ValueError(f"config.{field}={c[field]!r}: {e}") from None
  if c.ep_transport not in sharding.EP_TRANSPORTS:
    raise ValueError(f"ep_transport={c.ep_transport!r} must be one of {sharding.EP_TRANSPORTS}")
  if c.on_save_error not in ON_SAVE_ERROR_CHOICES:
    raise ValueError(f"on_save_error={c.on_save_error!r} must be one of {ON_SAVE_ERROR_CHOICES}")
  if c.sdc_every < 0 or c.spike.loss_sigmas < 0 or c.spike.grad_norm_sigmas < 0:
    raise ValueError(f"sdc_every={c.sdc_every}, spike.loss_sigmas={c.spike.loss_sigmas} and "
                     f"spike.grad_norm_sigmas={c.spike.grad_norm_sigmas} must be >= 0")
  if c.model.num_ffn_experts and c.model.num_ffn_experts % c.loss.balance_groups:
    raise ValueError(f"loss.balance_groups={c.loss.balance_groups} must divide model.num_ffn_experts="
                     f"{c.model.num_ffn_experts}")
