"""Experiment 2: the compute-budget controller (spec section 3, `longcat_jax/train/controller.py`).

Claim: updating each FFN expert's selection bias after every step,
`delta_b_i = mu_t (K_e/(K N) - T_i/(K T_all))`, steers the mean number of FFN experts per token to
the target K_e (the report: within ~1% of target), for any target, and the rate mu sets how fast.

The controller acts per layer (each layer has its own biases), so convergence is judged per
layer: a model whose layers sit at 2.9 and 1.1 FFN experts averages 2.0 but misses the target.

Runs (the balance loss is switched off, so the controller alone does the steering):
  targets  K_e in `targets` at rate `target_rate`
  rates    mu in `rates` at the middle target; mu = 0 is the uncontrolled router (reference)
All with the trainer's rate decay mu_t = mu / sqrt(1 + t / decay_steps).

Convergence numbers per run and layer, from the logged FFN experts per token (batch means):
  final    mean over the last 25% of the steps; rel_error = final / K_e - 1 (worst layer reported)
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
    # tiny preset: top-3 of 8 FFN + 4 zero experts; 0.3 is the trainer's default rate (train/config.py).
    "small": dict(preset="tiny", steps=200, batch=16, seq=128, targets=(1.0, 2.0, 2.5), target_rate=0.1,
                  rates=(0.0, 1e-2, 1e-1, 0.3)),
    "medium": dict(preset="small", steps=1000, batch=32, seq=512, targets=(2.0, 4.0, 5.0), target_rate=0.1,
                   rates=(0.0, 1e-3, 1e-2, 1e-1, 0.3)),
    "smoke": dict(preset="tiny", steps=3, batch=4, seq=32, targets=(1.0,), target_rate=0.1, rates=(0.0,)),
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
  default_rate = s["target_rate"]
  mid = s["targets"][len(s["targets"]) // 2]
  plan = [(t, default_rate) for t in s["targets"]] + [(mid, r) for r in s["rates"] if r != default_rate]
  runs = {}
  for target, rate in plan:
    cfg = base.copy_and_resolve_references()
    cfg.model.target_ffn_experts = target
    cfg.controller.rate = rate
    runs[target, rate] = common.train(cfg, f"exp2/target{target:g}_rate{rate:g}")

  out = {"scale": args.scale, "steps": s["steps"], "top_k": base.model.top_k, "target_rate": default_rate,
         "trainer_default_rate": base.controller.rate, "decay_steps": base.controller.decay_steps, "runs": {}}
  for (target, rate), run in runs.items():
    per_layer = run.curve("ffn_experts_mean")                        # [steps, L]
    tail = per_layer[-max(1, len(per_layer) // 4):].mean(0)
    rel = tail / target - 1
    out["runs"][f"target{target:g}_rate{rate:g}"] = dict(
        target=target, rate=rate, final_mean=common.tail_mean(run.curve("ffn_experts_per_token"), 0.25),
        final_per_layer=tail, rel_error_per_layer=rel, worst_layer_rel_error=float(np.max(np.abs(rel))),
        settle_step_per_layer=[settle_step(run.steps, per_layer[:, l], target) for l in range(per_layer.shape[1])],
        final_loss=common.tail_mean(run.curve("nll")), seconds=run.summary["wall_seconds"])
  controlled = [r for r in out["runs"].values() if r["rate"] == default_rate]
  worst = max(r["worst_layer_rel_error"] for r in controlled)
  out["claims"] = dict(every_layer_reaches_every_target_within_2pct=bool(worst < 0.02),
                       every_layer_reaches_every_target_within_1pct=bool(worst < 0.01),
                       trainer_default_rate_within_2pct=bool(
                           out["runs"].get(f"target{mid:g}_rate{base.controller.rate:g}", {}).get(
                               "worst_layer_rel_error", 1.0) < 0.02))
  out.update(timer.record())

  fig, ax = common.figure(1, 2, size=(5.5, 3.6))
  cmap = {t: c for t, c in zip(s["targets"], ("tab:blue", "tab:orange", "tab:green", "tab:red"))}
  styles = ("-", "--", ":", "-.")
  for target in s["targets"]:
    run = runs[target, default_rate]
    per_layer = run.curve("ffn_experts_mean")
    for l in range(per_layer.shape[1]):
      ax[0, 0].plot(run.steps, common.smooth(per_layer[:, l], 5), color=cmap[target], lw=1.2, ls=styles[l % 4],
                    label=f"K_e = {target:g}" if l == 0 else None)
    ax[0, 0].axhline(target, color=cmap[target], lw=0.6, alpha=0.6)
  ax[0, 0].set(xlabel="step", ylabel="FFN experts per token (5-step mean)", ylim=(0, base.model.top_k),
               title=f"targets (mu = {default_rate:g}); line style = layer")
  ax[0, 0].legend(fontsize=7)
  rates = sorted({r for (t, r) in runs if t == mid})
  for rate, color in zip(rates, ("k", "tab:purple", "tab:orange", "tab:cyan", "tab:green")):
    per_layer = runs[mid, rate].curve("ffn_experts_mean")
    for l in range(per_layer.shape[1]):
      ax[0, 1].plot(runs[mid, rate].steps, common.smooth(per_layer[:, l], 5), color=color, lw=1.2, ls=styles[l % 4],
                    label=(f"mu = {rate:g}" + (" (no controller)" if rate == 0 else "")) if l == 0 else None)
  ax[0, 1].axhline(mid, color="k", lw=0.6)
  ax[0, 1].set(xlabel="step", ylabel="FFN experts per token (5-step mean)", ylim=(0, base.model.top_k),
               title=f"rates (K_e = {mid:g}); line style = layer")
  ax[0, 1].legend(fontsize=7)
  tag = "exp2_controller" + suffix
  common.save_figure(fig, tag)
  common.save_json(tag, out)
  print(common.summary_line(tag, out))


if __name__ == "__main__":
  main()
