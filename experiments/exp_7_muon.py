"""Experiment 7: Muon vs AdamW at small scale (`optimizer.name="muon"`, train/optimizer.py).

Claim (LongCat-2.0 was trained with Muon [card]; Moonshot, arXiv 2502.16982: Muon with update RMS
matched to AdamW's reaches a lower loss at equal steps, with AdamW's learning rate and weight decay
unchanged): at equal steps and tokens, Muon's held-out loss is below AdamW's.

Runs: the trainer's recipe (WSD, lr 3e-3, weight decay 0.1, clipping 1.0) with AdamW and with Muon
(hidden matrices; AdamW for embeddings, unembedding, norms, router), the same learning rate, for
each seed in `seeds`; a seed fixes the initialisation and the data order, so the two optimizers of a
seed see the same batches from the same weights (paired). Held-out loss on fixed batches.

    python experiments/exp_7_muon.py                 # small (CPU): 3 seeds
    python experiments/exp_7_muon.py --scale quick   # the same with seeds 0 and 1
    python experiments/exp_7_muon.py --smoke

Writes results/exp7_muon.{png,json}; `claims.muon_lower_loss` says whether it held for every seed.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from experiments import common  # noqa: E402

SCALES = {
    "small": dict(preset="tiny", steps=300, batch=16, seq=128, eval_batches=8, seeds=(0, 1, 2)),
    "quick": dict(preset="tiny", steps=300, batch=16, seq=128, eval_batches=8, seeds=(0, 1)),  # 2 seeds of small
    "medium": dict(preset="small", steps=2000, batch=32, seq=512, eval_batches=16, seeds=(0, 1)),
    "smoke": dict(preset="tiny", steps=3, batch=4, seq=32, eval_batches=1, seeds=(0,)),
}
OPTIMIZERS = ("adamw", "muon")


def main():
  args, s, suffix = common.parse_args(__doc__.splitlines()[0], SCALES)
  timer = common.Timer()
  batches = common.eval_batches(common.corpus(), s["seq"], s["batch"], s["eval_batches"])
  base = dict(total_steps=s["steps"], batch_size=s["batch"], seq_len=s["seq"])

  def eval_loss(run):
    st = common.concat_stats([common.token_stats_fn(run.model)(run.variables(), b) for b in batches])
    return float(st["loss"][st["mask"]].mean())

  runs, losses = {}, {o: [] for o in OPTIMIZERS}
  for seed in s["seeds"]:
    for opt in OPTIMIZERS:
      cfg = common.train_config(s["preset"], seed=seed, optimizer__name=opt, **base)
      runs[(opt, seed)] = common.train(cfg, f"exp7/{opt}_s{seed}")
      losses[opt].append(eval_loss(runs[(opt, seed)]))
  diff = np.asarray(losses["muon"]) - np.asarray(losses["adamw"])
  out = dict(scale=args.scale, steps=s["steps"], tokens_per_step=s["batch"] * s["seq"], seeds=list(s["seeds"]),
             eval_loss={o: losses[o] for o in OPTIMIZERS}, muon_minus_adamw=diff.tolist(),
             mean_muon_minus_adamw=float(diff.mean()),
             train_nll_last10pct={f"{o}_s{sd}": common.tail_mean(r.curve("nll")) for (o, sd), r in runs.items()})
  out["claims"] = dict(muon_lower_loss=bool((diff < 0).all()))
  out.update(timer.record())

  fig, ax = common.figure(1, 1)
  for (opt, seed), run in runs.items():
    ax[0, 0].plot(run.steps, common.smooth(run.curve("nll")), color="tab:red" if opt == "muon" else "tab:blue",
                  lw=1, alpha=0.8, label=f"{opt} seed {seed}: eval {losses[opt][s['seeds'].index(seed)]:.3f}")
  ax[0, 0].set(xlabel="step", ylabel="train nll (smoothed)", title="Muon vs AdamW, same LR, paired seeds")
  ax[0, 0].legend(fontsize=7)
  tag = "exp7_muon" + suffix
  common.save_figure(fig, tag)
  common.save_json(tag, out)
  print(common.summary_line(tag, out))


if __name__ == "__main__":
  main()
