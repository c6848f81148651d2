"""Fine-tune a released LongCat checkpoint on chat data (or continue pretraining it on a corpus).

    python -m longcat_jax.data.prep --chat data.jsonl --tokenizer CKPT --output data/chat --seq-len 2048
    python experiments/train.py --config experiments/configs/finetune.py \
        --config.init_from=hf:CKPT --config.data.store=data/chat --workdir runs/ft

The model config is CKPT/config.json (`longcat_jax/train/init_from.py`); `config.model` holds only
unset placeholders, of which numerics and execution may be set (`--config.model.remat=full`,
`--config.model.dtype=bfloat16`); architecture fields that differ from the checkpoint are refused.
"""

from longcat_jax.train.config import get_train_config
from longcat_jax.train.init_from import checkpoint_model_config


def get_config(variant: str = ""):
  c = get_train_config("tiny")
  c.model = checkpoint_model_config()
  c.init_from = "hf:"                 # hf:/path/to/checkpoint (required)
  c.total_steps = 200
  c.batch_size = 8
  c.seq_len = 2048
  c.optimizer.lr = 1e-5
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_steps = 20
  c.optimizer.weight_decay = 0.0
  c.controller.rate = 0.0             # keep the released router bias unless asked
  c.checkpoint_every = 100
  c.keep_checkpoints = 2
  c.sample_tokens = 0
  if variant:
    raise ValueError(f"unknown variant {variant!r} of experiments/configs/finetune.py")
  return c
