"""Loss-spike guard: skip an update whose loss or gradient norm is far above its running statistics.

    stats = init_stats()                                        # TrainState.guard
    spike, limits = is_spike(stats, loss, grad_norm, config.spike)   # inside the jitted step
    stats = update_stats(stats, loss, grad_norm, accepted, config.spike)

The statistics are exponentially weighted means and variances of the accepted steps' loss and
gradient norm (decay `ema`; the first 1/(1-ema) steps average uniformly, so there is no start-up
bias). After `warmup_steps` accepted steps, a step is a spike when

    value > mean + sigmas * max(std, 0.01 * mean)

for the loss (`loss_sigmas`) or the gradient norm (`grad_norm_sigmas`); 0 turns a test off. The
floor on std keeps a run with a very flat loss from calling a 0.1% wiggle a spike. A skipped step
leaves params, optimizer state, expert bias AND these statistics unchanged (the rng and step
counter advance, as with the non-finite skip). The trainer counts spikes in a row and stops after
`max_in_a_row` (a level shift the guard would otherwise skip forever). The statistics are
updated even with the guard off, so turning it on mid-run starts from warm statistics.
"""

from __future__ import annotations

import jax.numpy as jnp

STAT_NAMES = ("count", "loss_mean", "loss_var", "grad_norm_mean", "grad_norm_var")
STD_FLOOR = 0.01  # relative to the mean


def init_stats() -> dict:
  """float32 [] each: accepted-step count and the running loss / gradient-norm moments."""
  return {k: jnp.zeros((), jnp.float32) for k in STAT_NAMES}


def enabled(cfg) -> bool:
  return cfg is not None and (cfg.loss_sigmas > 0 or cfg.grad_norm_sigmas > 0)


def _limit(mean, var, sigmas):
  std = jnp.maximum(jnp.sqrt(jnp.maximum(var, 0.0)), STD_FLOOR * jnp.abs(mean))
  return mean + sigmas * std


def is_spike(stats, loss, grad_norm, cfg):
  """(spike: bool [], limits {"loss", "grad_norm"}: float32 [], +inf where a test is off)."""
  inf = jnp.asarray(jnp.inf, jnp.float32)
  if not enabled(cfg):
    return jnp.zeros((), bool), {"loss": inf, "grad_norm": inf}
  warm = stats["count"] >= cfg.warmup_steps
  lim = {}
  for name, sigmas in (("loss", cfg.loss_sigmas), ("grad_norm", cfg.grad_norm_sigmas)):
    lim[name] = (jnp.where(warm, _limit(stats[f"{name}_mean"], stats[f"{name}_var"], sigmas), inf)
                 if sigmas > 0 else inf)
  spike = (loss > lim["loss"]) | (grad_norm > lim["grad_norm"])
  return spike, lim


def update_stats(stats, loss, grad_norm, accepted, cfg) -> dict:
  """The statistics after a step; unchanged unless `accepted` (bool [])."""
  ema = 0.98 if cfg is None else cfg.ema
  alpha = jnp.maximum(1.0 - ema, 1.0 / (stats["count"] + 1.0))
  out = {"count": stats["count"] + 1.0}
  for name, x in (("loss", loss), ("grad_norm", grad_norm)):
    mean, var = stats[f"{name}_mean"], stats[f"{name}_var"]
    delta = x.astype(jnp.float32) - mean
    out[f"{name}_mean"] = mean + alpha * delta
    out[f"{name}_var"] = (1.0 - alpha) * (var + alpha * delta * delta)
  return {k: jnp.where(accepted, out[k], stats[k]) for k in STAT_NAMES}
