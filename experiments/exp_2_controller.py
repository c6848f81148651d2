"""Experiment 2: the compute-budget controller (spec section 3, `longcat_jax/train/controller.py`).

Claim: updating each FFN expert's selection bias after every step,
`delta_b_i = mu_t (K_e/(K N) - T_i/(K T_all))`, steers the mean number of FFN experts per token to
the target K_e (the report: within ~1% of target), for any target, and the rate mu sets how fast.

Runs (the balance loss is switched off, so the controller alone does the steering):
  targets  K_e in `targets` at the default rate mu
  rates    mu in `rates` at the middle target; mu = 0 is the uncontrolled router (reference)

Convergence numbers per run, from the logged batch means of FFN experts per token:
  final    mean over the last 25% of the steps, and its relative error to the target
  settle   first step after which the 20-step moving average stays within 5% of the target

    python experiments/exp_2_controller.py                 # small (CPU, minutes)
    python experiments/exp_2_controller.py --scale medium  # the `small` preset, longer

Writes results/exp2_controller.{png,json}.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from experiments import common  # noqa: E402

SCALES = {
    # tiny preset: top-3 of 8 FFN + 4 zero experts; the default rate is the trainer's (1e-2).
    "small": dict(preset="tiny", steps=200, batch=16, seq=128, targets=(1.0, 2.0, 2.5), rates=(0.0, 1e-3, 1e-1)),
    "medium": dict(preset="small", steps=1000, batch=32, seq=512, targets=(2.0, 4.0, 5.0), rates=(0.0, 1e-3, 1e-1)),
    "smoke": dict(preset="tiny", steps=3, batch=4, seq=32, targets=(1.0,), rates=(0.0,)),
}


def settle_step(steps, x, target, tol=0.05, window=20):
  """First step from which the trailing moving average stays within tol * target (None: never)."""
  ok = np.abs(common.smooth(x, window) - target) <= tol * target
  bad = np.nonzero(~ok)[0]
  if len(bad) == 0:
    return int(steps[0])
  return int(steps[bad[-1] + 1]) if bad[-1] + 1 < len(steps) else None


def main():
  args, s, suffix = common.parse_args(__doc__.splitlines()[0], SCALES)
  timer = common.Timer()
  base = common.train_config(s["preset"], total_steps=s["steps"], batch_size=s["batch"], seq_len=s["seq"],
                             loss__balance_loss_weight=0.0)
  default_rate = base.controller.rate
  mid = s["targets"][len(s["targets"]) // 2]
  plan = [(t, default_rate) for t in s["targets"]] + [(mid, r) for r in s["rates"] if r != default_rate]
  runs = {}
  for target, rate in plan:
    cfg = base.copy_and_resolve_references()
    cfg.model.target_ffn_experts = target
    cfg.controller.rate = rate
    runs[target, rate] = common.train(cfg, f"exp2/target{target:g}_rate{rate:g}")

  out = {"scale": args.scale, "steps": s["steps"], "top_k": base.model.top_k, "default_rate": default_rate,
         "decay_steps": base.controller.decay_steps, "runs": {}}
  for (target, rate), run in runs.items():
    x = run.curve("ffn_experts_per_token")
    final = common.tail_mean(x, 0.25)
    per_layer = run.curve("ffn_experts_mean")[-max(1, len(x) // 4):].mean(0)
    out["runs"][f"target{target:g}_rate{rate:g}"] = dict(
        target=target, rate=rate, final=final, rel_error=final / target - 1, settle_step=settle_step(run.steps, x, target),
        final_per_layer=per_layer, final_loss=common.tail_mean(run.curve("nll")), seconds=run.summary["wall_seconds"])
  controlled = [r for r in out["runs"].values() if r["rate"] == default_rate]
  out["claims"] = dict(
      reaches_every_target_within_2pct=bool(all(abs(r["rel_error"]) < 0.02 for r in controlled)),
      reaches_every_target_within_1pct=bool(all(abs(r["rel_error"]) < 0.01 for r in controlled)))
  out.update(timer.record())

  fig, ax = common.figure(1, 2, size=(5.5, 3.6))
  cmap = {t: c for t, c in zip(s["targets"], ("tab:blue", "tab:orange", "tab:green", "tab:red"))}
  for target in s["targets"]:
    run = runs[target, default_rate]
    ax[0, 0].plot(run.steps, run.curve("ffn_experts_per_token"), color=cmap[target], lw=0.6, alpha=0.4)
    ax[0, 0].plot(run.steps, common.smooth(run.curve("ffn_experts_per_token"), 20), color=cmap[target], lw=1.5,
                  label=f"K_e = {target:g}")
    ax[0, 0].axhline(target, color=cmap[target], ls="--", lw=0.8)
  ax[0, 0].set(xlabel="step", ylabel="FFN experts per token", ylim=(0, base.model.top_k),
               title=f"targets (top-{base.model.top_k}, mu = {default_rate:g})")
  ax[0, 0].legend(fontsize=7)
  rates = sorted({r for (t, r) in runs if t == mid})
  for rate, color in zip(rates, ("k", "tab:purple", "tab:orange", "tab:cyan")):
    run = runs[mid, rate]
    ax[0, 1].plot(run.steps, common.smooth(run.curve("ffn_experts_per_token"), 5), color=color, lw=1.2,
                  label=f"mu = {rate:g}" + (" (no controller)" if rate == 0 else ""))
  ax[0, 1].axhline(mid, color="k", ls="--", lw=0.8)
  ax[0, 1].set(xlabel="step", ylabel="FFN experts per token (5-step mean)", ylim=(0, base.model.top_k),
               title=f"rates (K_e = {mid:g})")
  ax[0, 1].legend(fontsize=7)
  tag = "exp2_controller" + suffix
  common.save_figure(fig, tag)
  common.save_json(tag, out)
  print(common.summary_line(tag, out))


if __name__ == "__main__":
  main()
