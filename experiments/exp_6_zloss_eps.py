"""Experiment 6: hidden z-loss and Adam epsilon (spec section 5, `train/losses.py`, `train/optimizer.py`).

Claims:
  z-loss   the hidden z-loss `lambda/T sum_t (logsumexp_i |z_t,i|)^2` on the last layer's hidden
           states z keeps their magnitude down (the report uses it against massive activations)
           without hurting the language-model loss;
  epsilon  Adam's epsilon must stay far below the gradient RMS: as epsilon approaches it, the loss
           degrades (the report sets 1e-16).

Runs (all with the trainer's recipe otherwise):
  z-loss   lambda in `z_weights` (0 = off; 1e-7 = the default); the logged per-step z-loss and,
           on held-out batches after training, per-token L2 norm and max |z| of the last layer's
           hidden states (before the final RMSNorm)
  epsilon  eps in `eps` (the default-lambda z-loss run is the eps = 1e-16 point); the gradient RMS
           is measured in that run as grad_norm / sqrt(#params) (pre-clipping, median over the
           second half)

    python experiments/exp_6_zloss_eps.py                 # small (CPU, minutes)
    python experiments/exp_6_zloss_eps.py --scale medium  # `small` preset, longer

Writes results/exp6_zloss_eps.{png,json}.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from experiments import common  # noqa: E402

SCALES = {
    "small": dict(preset="tiny", steps=200, batch=16, seq=128, eval_batches=8, z_weights=(0.0, 1e-7, 1e-4),
                  eps=(1e-8, 1e-6, 1e-5, 1e-4, 1e-3)),
    "medium": dict(preset="small", steps=2000, batch=32, seq=512, eval_batches=16, z_weights=(0.0, 1e-7, 1e-5, 1e-4),
                   eps=(1e-10, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4)),
    "smoke": dict(preset="tiny", steps=3, batch=4, seq=32, eval_batches=1, z_weights=(0.0, 1e-7), eps=(1e-3,)),
}
DEFAULT_EPS = 1e-16


def main():
  args, s, suffix = common.parse_args(__doc__.splitlines()[0], SCALES)
  timer = common.Timer()
  import longcat_jax
  batches = common.eval_batches(common.corpus(), s["seq"], s["batch"], s["eval_batches"])
  base = dict(total_steps=s["steps"], batch_size=s["batch"], seq_len=s["seq"])

  def evaluate(run):
    st = common.concat_stats([common.token_stats_fn(run.model)(run.variables(), b) for b in batches])
    m = st["mask"]
    return dict(eval_loss=float(st["loss"][m].mean()), hidden_norm_mean=float(st["hidden_norm"][m].mean()),
                hidden_norm_p99=float(np.percentile(st["hidden_norm"][m], 99)),
                hidden_max_abs_mean=float(st["hidden_max_abs"][m].mean()),
                hidden_max_abs_max=float(st["hidden_max_abs"][m].max()))

  z_runs, z_eval = {}, {}
  for lam in s["z_weights"]:
    cfg = common.train_config(s["preset"], loss__z_loss_weight=lam, optimizer__eps=DEFAULT_EPS, **base)
    z_runs[lam] = common.train(cfg, f"exp6/z{lam:g}")
    z_eval[lam] = evaluate(z_runs[lam])

  default = z_runs[1e-7] if 1e-7 in z_runs else z_runs[s["z_weights"][-1]]
  num_params = longcat_jax.count_params(default.config.model).total
  gn = default.curve("grad_norm")
  grad_rms = float(np.median(gn[len(gn) // 2:]) / np.sqrt(num_params))
  eps_loss = {DEFAULT_EPS: z_eval[1e-7 if 1e-7 in z_eval else s["z_weights"][-1]]["eval_loss"]}
  eps_curves = {DEFAULT_EPS: default}
  for eps in s["eps"]:
    cfg = common.train_config(s["preset"], optimizer__eps=eps, **base)
    run = common.train(cfg, f"exp6/eps{eps:g}")
    eps_loss[eps] = evaluate(run)["eval_loss"]
    eps_curves[eps] = run

  eps_sorted = sorted(eps_loss)
  tiny_eps = [e for e in eps_sorted if e <= grad_rms / 100]
  near_eps = [e for e in eps_sorted if e >= grad_rms / 10]
  floor = min(eps_loss[e] for e in tiny_eps) if tiny_eps else None
  out = dict(scale=args.scale, steps=s["steps"], tokens_per_step=s["batch"] * s["seq"], num_params=num_params,
             z_loss={f"{lam:g}": dict(z_eval[lam], z_loss_last10pct=common.tail_mean(z_runs[lam].curve("z_loss")),
                                      train_nll_last10pct=common.tail_mean(z_runs[lam].curve("nll")))
                     for lam in s["z_weights"]},
             grad_rms=grad_rms, eps_eval_loss={f"{e:g}": eps_loss[e] for e in eps_sorted},
             eps_loss_increase_near_grad_rms={f"{e:g}": eps_loss[e] - floor for e in near_eps} if floor else {})
  off, strong = z_eval[0.0], z_eval[max(s["z_weights"])]
  out["claims"] = dict(
      z_loss_lowers_hidden_norm=bool(strong["hidden_norm_mean"] < 0.95 * off["hidden_norm_mean"]),
      z_loss_default_lambda_changes_hidden_norm=bool(
          1e-7 in z_eval and abs(z_eval[1e-7]["hidden_norm_mean"] / off["hidden_norm_mean"] - 1) > 0.05),
      z_loss_no_quality_cost=bool(strong["eval_loss"] <= off["eval_loss"] + 0.02),
      eps_near_grad_rms_degrades=bool(floor is not None and near_eps and
                                      max(eps_loss[e] for e in near_eps) > floor + 0.02))
  out.update(timer.record())

  fig, ax = common.figure(1, 3, size=(4.4, 3.6))
  colors = ("tab:gray", "tab:blue", "tab:red", "tab:purple")
  for (lam, run), color in zip(z_runs.items(), colors):
    ax[0, 0].plot(run.steps, np.sqrt(np.maximum(run.curve("z_loss"), 0)), color=color, lw=1,
                  label=f"lambda {lam:g}: eval {z_eval[lam]['eval_loss']:.3f}")
  ax[0, 0].set(xlabel="step", ylabel="sqrt(z-loss): RMS of logsumexp|z|",
               title="last-layer hidden magnitude")
  ax[0, 0].legend(fontsize=7)
  lams = list(s["z_weights"])
  x = np.arange(len(lams))
  ax[0, 1].bar(x - 0.2, [z_eval[l]["hidden_norm_mean"] for l in lams], 0.4, label="mean L2 norm", color="tab:blue")
  ax[0, 1].bar(x + 0.2, [z_eval[l]["hidden_max_abs_mean"] for l in lams], 0.4, label="mean max|z_i|", color="tab:orange")
  ax[0, 1].set_xticks(x, [f"{l:g}" for l in lams])
  ax[0, 1].set(xlabel="z-loss lambda", ylabel="per token, held-out", title="after training")
  ax[0, 1].legend(fontsize=7)
  ax[0, 2].plot(eps_sorted, [eps_loss[e] for e in eps_sorted], "o-", color="k")
  ax[0, 2].axvline(grad_rms, color="tab:red", ls="--", label=f"gradient RMS {grad_rms:.1e}")
  ax[0, 2].set_xscale("log")
  ax[0, 2].set(xlabel="Adam epsilon", ylabel="held-out loss after training", title="epsilon vs gradient RMS")
  ax[0, 2].legend(fontsize=7)
  tag = "exp6_zloss_eps" + suffix
  common.save_figure(fig, tag)
  common.save_json(tag, out)
  print(common.summary_line(tag, out))


if __name__ == "__main__":
  main()
