"""Training metrics: JSONL + TensorBoard writer, model FLOPs per token, device peak, MFU.

    writer = MetricWriter(workdir, resume_step=state_step)
    writer.write(step, {"loss": 2.1, ...}, arrays={"ffn_experts_mean": [...], "expert_load": [[...]]})
    mfu = tokens_per_s * training_flops_per_token(config.model, seq_len, ffn_experts) / device_peak_flops()
"""

from __future__ import annotations

import functools
import json
import math
import os
import time

import numpy as np

from longcat_jax.config import qk_head_dim

METRICS_FILE = "metrics.jsonl"


class MetricWriter:
  """Appends one JSON object per logged step to `workdir/metrics.jsonl` and mirrors it to
  TensorBoard event files under `workdir/tensorboard`.

  On resume from step k the JSONL keeps only records with step <= k (the killed run may have
  logged steps past its last checkpoint, which the resumed run recomputes), so the file always
  reads as one uninterrupted run.
  """

  def __init__(self, workdir: str, resume_step: int = 0, tensorboard: bool = True):
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, METRICS_FILE)
    records = read_metrics(self.path)
    kept = [r for r in records if r.get("step", 0) <= resume_step]
    if len(kept) != len(records) or (os.path.exists(self.path) and not _ends_with_newline(self.path)):
      tmp = self.path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
      os.replace(tmp, self.path)
    self._file = open(self.path, "a")
    self._tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=resume_step + 1 if resume_step else None)

  def write(self, step: int, scalars: dict, arrays: dict | None = None) -> None:
    rec = {"step": int(step), "time": time.time()}
    rec.update({k: float(v) for k, v in scalars.items()})
    for k, v in (arrays or {}).items():
      rec[k] = np.asarray(v).tolist()
    self._file.write(json.dumps(rec) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, float(v), step)
      for k, v in (arrays or {}).items():
        v = np.asarray(v, np.float64)
        if k == "expert_load":                       # [L, N+Z] -> one histogram of shares per layer
          for l, row in enumerate(v.reshape(-1, v.shape[-1])):
            self._tb.add_histogram(f"expert_load/layer_{l}", row / max(row.sum(), 1.0), step)
        elif v.ndim == 1:
          for l, x in enumerate(v):
            self._tb.add_scalar(f"{k}/layer_{l}", float(x), step)

  def text(self, tag: str, text: str, step: int) -> None:
    if self._tb is not None:
      self._tb.add_text(tag, text, step)

  def close(self) -> None:
    self._file.close()
    if self._tb is not None:
      self._tb.close()


class NullWriter:
  """What processes other than 0 write: nothing (`MetricWriter`'s interface)."""

  path = None

  def write(self, step: int, scalars: dict, arrays: dict | None = None) -> None:
    del step, scalars, arrays

  def text(self, tag: str, text: str, step: int) -> None:
    del tag, text, step

  def close(self) -> None:
    pass


def _ends_with_newline(path: str) -> bool:
  with open(path, "rb") as f:
    f.seek(0, os.SEEK_END)
    if f.tell() == 0:
      return True
    f.seek(-1, os.SEEK_END)
    return f.read(1) == b"\n"


def read_metrics(path: str) -> list[dict]:
  """Records of a metrics.jsonl (a partial last line from a killed process is skipped)."""
  if os.path.isdir(path):
    path = os.path.join(path, METRICS_FILE)
  if not os.path.exists(path):
    return []
  out = []
  with open(path) as f:
    for line in f:
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:
        pass
  return out


# ---------------------------------------------------------------------------------------------
# FLOPs and MFU.


def _mla_params(c) -> int:
  nh, qk = c.num_heads, qk_head_dim(c)
  return (c.hidden_size * c.q_lora_rank + c.q_lora_rank * nh * qk
          + c.hidden_size * (c.kv_lora_rank + c.qk_rope_head_dim)
          + c.kv_lora_rank * nh * (c.qk_nope_head_dim + c.v_head_dim) + nh * c.v_head_dim * c.hidden_size)


def forward_flops_per_token(c, seq_len: int, ffn_experts_per_token: float | None = None) -> float:
  """Model FLOPs of one token's forward pass (matmuls only; embedding lookups are free).

  2 * (matmul weights the token touches) + attention scores and values over the full sequence
  (2 * S * heads * (qk + v) per block, the PaLM convention: no causal discount). FFN experts
  count `ffn_experts_per_token` times (default: the controller target K_e); zero experts are free.
  """
  k_e = c.target_ffn_experts if ffn_experts_per_token is None else ffn_experts_per_token
  attn_scores = 2 * seq_len * c.num_heads * (qk_head_dim(c) + c.v_head_dim)
  mlp = 3 * c.hidden_size * c.ffn_size
  experts = 3 * c.hidden_size * c.expert_ffn_size * k_e if c.num_ffn_experts else 0
  router = c.hidden_size * (c.num_ffn_experts + c.zero_experts)
  layer = 2 * (2 * _mla_params(c) + 2 * mlp + router + experts) + 2 * attn_scores
  head = 2 * c.hidden_size * c.vocab_size
  mtp = c.mtp_num_heads * (2 * (2 * c.hidden_size * c.hidden_size + _mla_params(c) + mlp) + attn_scores + head)
  return c.num_layers * layer + head + mtp


def training_flops_per_token(c, seq_len: int, ffn_experts_per_token: float | None = None) -> float:
  """Forward + backward = 3 x forward."""
  return 3.0 * forward_flops_per_token(c, seq_len, ffn_experts_per_token)


# Dense bf16 peak FLOP/s per device by `device_kind` substring (vendor datasheets).
PEAK_FLOPS = {
    "H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12,
    "TPU v6": 918e12, "TPU v5p": 459e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v4": 275e12,
}


@functools.lru_cache(maxsize=None)
def device_peak_flops(dtype: str = "float32") -> float:
  """Peak FLOP/s of one local device: the datasheet for known accelerators; on CPU, measured
  (best of a few large jitted matmuls in `dtype`, all cores)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  dev = jax.local_devices()[0]
  for name, peak in PEAK_FLOPS.items():
    if name.lower() in dev.device_kind.lower():
      return peak
  if dev.platform != "cpu":
    return math.nan
  n = 1024
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = math.inf
  for _ in range(5):
    t = time.perf_counter()
    for _ in range(4):
      f(a).block_until_ready()
    best = min(best, (time.perf_counter() - t) / 4)
  return 2 * n ** 3 / best
