"""Experiment 5: model-growth initialisation (spec section 5, `train/growth.py`).

Claim: initialising a deep model by stacking a trained half-depth model (layers [l_0..l_{L-1}] ->
[l_0..l_{L-1}, l_0..l_{L-1}]) trains to a lower loss than random initialisation.

Runs (same data order, same optimizer settings):
  half     L/2 layers from random init, `half_steps` steps
  grown    L layers stacked from `half`'s final weights (trainer: `init_from`, `grow_factor=2`),
           `steps` steps with a fresh optimizer state
  random   L layers from random init, for as many steps as the grown model's total training FLOPs
           (its half-depth stage included; `train.metrics.training_flops_per_token`)
All runs use a constant learning rate after warmup, so curves compare at any step. Compared:
the smoothed train loss at equal steps of the deep model, and the held-out loss at equal total
training compute (grown's last step vs random's last step).

    python experiments/exp_5_growth.py                 # small (CPU, minutes)
    python experiments/exp_5_growth.py --scale medium  # `small` preset, 4 -> 8 layers, longer

Writes results/exp5_growth.{png,json}.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from experiments import common  # noqa: E402

SCALES = {
    # tiny widths; 2 -> 4 ScMoE layers.
    "small": dict(preset="tiny", layers=4, half_steps=150, steps=300, batch=16, seq=128, eval_batches=8),
    "medium": dict(preset="small", layers=8, half_steps=1000, steps=2000, batch=32, seq=512, eval_batches=16),
    "smoke": dict(preset="tiny", layers=4, half_steps=2, steps=3, batch=4, seq=32, eval_batches=1),
}


def main():
  args, s, suffix = common.parse_args(__doc__.splitlines()[0], SCALES)
  timer = common.Timer()
  from longcat_jax.train.metrics import training_flops_per_token
  # A constant LR after warmup, so that curves compare at any step (no schedule end effects).
  base = dict(total_steps=s["steps"], batch_size=s["batch"], seq_len=s["seq"], optimizer__schedule="constant")
  half_cfg = common.train_config(s["preset"], model=dict(num_layers=s["layers"] // 2),
                                 **dict(base, total_steps=s["half_steps"]))
  grown_cfg = common.train_config(s["preset"], model=dict(num_layers=s["layers"]), grow_factor=2, **base)
  tokens = s["batch"] * s["seq"]
  flops = lambda cfg: training_flops_per_token(cfg.model, s["seq"]) * tokens      # per step
  half_in_deep_steps = flops(half_cfg) * s["half_steps"] / flops(grown_cfg)
  # Random init runs as many steps as the grown model's total compute (its half-depth stage included).
  equal_compute_steps = int(round(s["steps"] + half_in_deep_steps))
  random_cfg = common.train_config(s["preset"], model=dict(num_layers=s["layers"]),
                                   **dict(base, total_steps=equal_compute_steps))

  half = common.train(half_cfg, "exp5/half")
  grown_cfg.init_from = os.path.join(half.workdir, "checkpoints")
  grown = common.train(grown_cfg, "exp5/grown")
  random = common.train(random_cfg, "exp5/random")

  batches = common.eval_batches(common.corpus(), s["seq"], s["batch"], s["eval_batches"])

  def eval_loss(run):
    st = common.concat_stats([common.token_stats_fn(run.model)(run.variables(), b) for b in batches])
    return float(st["loss"][st["mask"]].mean())

  sm = lambda run: common.smooth(run.curve("nll"), 20)
  at_step = lambda run, step: float(sm(run)[np.searchsorted(run.steps, step)])
  out = dict(scale=args.scale, layers=s["layers"], half_steps=s["half_steps"], steps=s["steps"], tokens_per_step=tokens,
             half_stage_in_deep_steps=half_in_deep_steps, random_steps=equal_compute_steps,
             eval_loss=dict(half=eval_loss(half), grown=eval_loss(grown), random_at_equal_compute=eval_loss(random)),
             train_nll_smoothed_at_deep_step=dict(grown=at_step(grown, s["steps"]), random=at_step(random, s["steps"])),
             train_nll_first_step=dict(grown=float(grown.curve("nll")[0]), random=float(random.curve("nll")[0])))
  target = sm(grown)[-1]
  hit = np.nonzero(sm(random) <= target)[0]
  out["random_steps_to_match_grown_final"] = int(random.steps[hit[0]]) if len(hit) else None
  steps_gap = out["train_nll_smoothed_at_deep_step"]["random"] - out["train_nll_smoothed_at_deep_step"]["grown"]
  compute_gap = out["eval_loss"]["random_at_equal_compute"] - out["eval_loss"]["grown"]
  out.update(gap_at_equal_deep_steps=steps_gap, gap_at_equal_total_compute=compute_gap)
  out["claims"] = dict(grown_lower_loss_at_equal_deep_steps=bool(steps_gap > 0.01),
                       grown_lower_loss_at_equal_total_compute=bool(compute_gap > 0.01))
  out.update(timer.record())

  fig, ax = common.figure(1, 2, size=(5.2, 3.8))
  lo = min(common.tail_mean(r.curve("nll"), 0.3) for r in (grown, random))
  ax[0, 0].plot(grown.steps, sm(grown), color="tab:green", label=f"grown from {s['layers'] // 2} layers")
  ax[0, 0].plot(random.steps, sm(random), color="tab:gray", label="random init")
  ax[0, 0].axvline(s["steps"], color="k", lw=0.6, ls=":")
  ax[0, 0].set_ylim(lo - 0.15, lo + 1.2)
  ax[0, 0].set(xlabel=f"step of the {s['layers']}-layer model", ylabel="train loss (smoothed)",
               title=f"equal deep steps: gap {steps_gap:+.3f}")
  ax[0, 0].legend(fontsize=7)
  per_step = flops(grown_cfg)
  ax[0, 1].plot(half.steps * flops(half_cfg) / 1e12, sm(half), color="tab:olive", label=f"{s['layers'] // 2}-layer stage")
  ax[0, 1].plot((half.steps[-1] * flops(half_cfg) + grown.steps * per_step) / 1e12, sm(grown), color="tab:green",
                label=f"grown: eval {out['eval_loss']['grown']:.3f}")
  ax[0, 1].plot(random.steps * per_step / 1e12, sm(random), color="tab:gray",
                label=f"random init: eval {out['eval_loss']['random_at_equal_compute']:.3f}")
  ax[0, 1].set_ylim(lo - 0.15, lo + 1.2)
  ax[0, 1].set(xlabel="training FLOPs (10^12, model FLOPs)", ylabel="train loss (smoothed)",
               title=f"equal total compute: gap {compute_gap:+.3f}")
  ax[0, 1].legend(fontsize=7)
  tag = "exp5_growth" + suffix
  common.save_figure(fig, tag)
  common.save_json(tag, out)
  print(common.summary_line(tag, out))


if __name__ == "__main__":
  main()
