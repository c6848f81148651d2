"""Experiment 1: zero-computation experts (spec section 3; LongCat-Flash report section 2.1).

Claim: at equal average compute, a MoE whose router can also pick zero-computation (identity)
experts reaches a lower loss than the same MoE without them, because compute goes where it is
needed: tokens differ in how many FFN experts they use, and harder tokens get more.

Runs (same data order and steps; `seeds` repeats each to show the seed-to-seed spread; a seed
sets the init and the data order, and both variants share it, so the comparison is paired):
  zero    N FFN + Z zero experts, top-k, controller target K_e FFN experts/token (rate 0.1)
  dense   N FFN experts, no zero experts, top-K_e: exactly K_e FFN experts per token (equal compute)
Afterwards `zero`'s routing on held-out batches: FFN experts per token, by input-token class, and
against the per-token next-token loss (the difficulty).

The lower-loss claim holds here only if the dense model's held-out loss is higher in every seed pair.

    python experiments/exp_1_zero_experts.py                # small (CPU, minutes)
    python experiments/exp_1_zero_experts.py --scale medium # the `small` preset (100M), longer

Writes results/exp1_zero_experts.{png,json}.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from experiments import common  # noqa: E402

SCALES = {
    # tiny preset: hidden 64, 2 layers, 8 FFN + 4 zero experts, top-3, K_e = 2.
    "small": dict(preset="tiny", steps=300, batch=16, seq=128, seeds=(0, 1, 2), eval_batches=8),
    "medium": dict(preset="small", steps=2000, batch=32, seq=512, seeds=(0, 1, 2), eval_batches=16),
    "smoke": dict(preset="tiny", steps=3, batch=4, seq=32, seeds=(0,), eval_batches=1),
}


# Controller rate of both variants (experiment 2 measures how closely each rate holds every layer
# at the target in a few hundred steps at this scale; equal compute needs a close one).
CONTROLLER_RATE = 0.1


def configs(s, rate=CONTROLLER_RATE):
  zero = common.train_config(s["preset"], total_steps=s["steps"], batch_size=s["batch"], seq_len=s["seq"],
                             controller__rate=rate)
  m = zero.model
  k_e = m.target_ffn_experts
  if k_e != int(k_e):
    raise ValueError(f"target_ffn_experts={k_e} must be an integer for an equal-compute top-k baseline")
  dense = common.train_config(s["preset"], total_steps=s["steps"], batch_size=s["batch"], seq_len=s["seq"],
                              controller__rate=rate,   # without zero experts: load balancing only
                              model=dict(zero_experts=0, top_k=int(k_e), target_ffn_experts=k_e))
  return {"zero": zero, "dense": dense}


def main():
  args, s, suffix = common.parse_args(
      __doc__.splitlines()[0], SCALES,
      lambda p: p.add_argument("--controller-rate", type=float, default=CONTROLLER_RATE,
                               help="expert-bias controller rate of both variants"))
  timer = common.Timer()
  cfgs = configs(s, args.controller_rate)
  run_prefix = "exp1" if args.controller_rate == CONTROLLER_RATE else f"exp1_rate{args.controller_rate:g}"
  runs = {}
  for name, cfg in cfgs.items():
    for seed in s["seeds"]:
      cfg = cfg.copy_and_resolve_references()
      cfg.seed = seed
      runs[name, seed] = common.train(cfg, f"{run_prefix}/{name}_s{seed}")

  store = common.corpus()
  batches = common.eval_batches(store, s["seq"], s["batch"], s["eval_batches"])
  stats = {}
  for key, run in runs.items():
    st = common.concat_stats([common.token_stats_fn(run.model)(run.variables(), b) for b in batches])
    stats[key] = st

  # Numbers.
  zcfg = cfgs["zero"].model
  out = {"scale": args.scale, "steps": s["steps"], "tokens_per_step": s["batch"] * s["seq"],
         "controller_rate": args.controller_rate, "runs": {}}
  for (name, seed), run in runs.items():
    st = stats[name, seed]
    out["runs"][f"{name}_s{seed}"] = dict(
        eval_loss=float(st["loss"][st["mask"]].mean()), train_nll_last10pct=common.tail_mean(run.curve("nll")),
        ffn_experts_per_token_train_mean=float(run.curve("ffn_experts_per_token").mean()),
        ffn_experts_per_token_eval=float(st["ffn_experts"][:, st["mask"]].mean()),
        seconds=run.summary["wall_seconds"])
  eval_loss = {n: [out["runs"][f"{n}_s{sd}"]["eval_loss"] for sd in s["seeds"]] for n in cfgs}
  gap = float(np.mean(eval_loss["dense"]) - np.mean(eval_loss["zero"]))
  spread = max(float(np.ptp(v)) for v in eval_loss.values())
  paired = np.asarray(eval_loss["dense"]) - np.asarray(eval_loss["zero"])    # same seed: init + data order
  z = stats["zero", s["seeds"][0]]
  mask = z["mask"]
  k_tok = z["ffn_experts"].mean(0)                    # [B, S] mean over layers
  rho = common.spearman(k_tok[mask], z["loss"][mask])
  rho_layers = [common.spearman(z["ffn_experts"][l][mask], z["loss"][mask]) for l in range(zcfg.num_layers)]
  hist = np.bincount(z["ffn_experts"][:, mask].ravel(), minlength=zcfg.top_k + 1) / z["ffn_experts"][:, mask].size
  out.update(
      target_ffn_experts=zcfg.target_ffn_experts, top_k=zcfg.top_k,
      eval_loss_mean={n: float(np.mean(v)) for n, v in eval_loss.items()},
      eval_loss_gap_dense_minus_zero=gap, eval_loss_seed_spread=spread, paired_gap_per_seed=paired,
      zero_ffn_experts_train_mean=float(np.mean([out["runs"][f"zero_s{sd}"]["ffn_experts_per_token_train_mean"]
                                                 for sd in s["seeds"]])),
      ffn_experts_hist=hist, ffn_experts_summed_over_layers_hist=np.bincount(
          z["ffn_experts"].sum(0)[mask], minlength=zcfg.num_layers * zcfg.top_k + 1) / mask.sum(),
      loss_by_summed_ffn_experts=[float(z["loss"][mask][z["ffn_experts"].sum(0)[mask] == b].mean())
                                  if (z["ffn_experts"].sum(0)[mask] == b).sum() >= 20 else None
                                  for b in range(zcfg.num_layers * zcfg.top_k + 1)],
      spearman_ffn_experts_vs_loss=rho, spearman_per_layer=rho_layers,
      by_token_type={t: dict(ffn_experts=v["mean"], count=v["count"],
                             loss=common.by_token_type(z["loss"], z["types"], mask)[t]["mean"])
                     for t, v in common.by_token_type(k_tok, z["types"], mask, min_count=20).items()},
      claims=dict(lower_loss_at_equal_compute=bool((paired > 0).all()),   # every paired seed agrees
                  compute_varies_per_token=bool(float(np.std(k_tok[mask])) > 0.1),
                  harder_tokens_get_more_compute=bool(rho > 0.05)),
      **timer.record())

  # Figure.
  fig, ax = common.figure(2, 2)
  colors = {"zero": "tab:orange", "dense": "tab:blue"}
  labels = {"zero": f"{zcfg.num_ffn_experts} FFN + {zcfg.zero_experts} zero, top-{zcfg.top_k}, K_e={zcfg.target_ffn_experts:g}",
            "dense": f"{zcfg.num_ffn_experts} FFN, top-{int(zcfg.target_ffn_experts)} (no zero experts)"}
  for (name, seed), run in runs.items():
    ax[0, 0].plot(run.steps, common.smooth(run.curve("nll"), 20), color=colors[name], lw=1,
                  label=labels[name] if seed == s["seeds"][0] else None)
  lo = min(common.tail_mean(r.curve("nll"), 0.3) for r in runs.values())
  ax[0, 0].set_ylim(lo - 0.15, lo + 0.9)
  ax[0, 0].set(xlabel="step", ylabel="train loss (nats/byte, smoothed)",
               title=f"equal compute: eval loss {np.mean(eval_loss['zero']):.3f} vs {np.mean(eval_loss['dense']):.3f}")
  ax[0, 0].legend(fontsize=7)
  for seed in s["seeds"]:
    r = runs["zero", seed]
    ax[0, 1].plot(r.steps, r.curve("ffn_experts_per_token"), color="tab:orange", lw=0.8)
  ax[0, 1].axhline(zcfg.target_ffn_experts, color="k", ls="--", lw=0.8, label="target K_e")
  ax[0, 1].set(xlabel="step", ylabel="FFN experts per token (batch mean)", title="compute per token during training")
  ax[0, 1].legend(fontsize=7)
  total = z["ffn_experts"].sum(0)[mask]              # FFN experts per token summed over layers
  bins = np.arange(zcfg.num_layers * zcfg.top_k + 1)
  share = np.array([(total == b).mean() for b in bins])
  ax[1, 0].bar(bins, share, color="tab:orange")
  ax[1, 0].set(xlabel=f"FFN experts used by a token, summed over its {zcfg.num_layers} layers",
               ylabel="share of tokens (bars)", title="compute per token vs difficulty")
  twin0 = ax[1, 0].twinx()
  loss_bin = [z["loss"][mask][total == b].mean() if (total == b).sum() >= 20 else np.nan for b in bins]
  twin0.plot(bins, loss_bin, "ko-", ms=3)
  twin0.set_ylabel("mean next-token loss (black)")
  types = sorted(out["by_token_type"], key=lambda t: out["by_token_type"][t]["ffn_experts"])
  x = np.arange(len(types))
  ax[1, 1].bar(x, [out["by_token_type"][t]["ffn_experts"] for t in types], color="tab:orange")
  ax[1, 1].set_xticks(x, [t.replace(" ", "\n") for t in types], fontsize=7)
  ax[1, 1].set_ylabel("FFN experts per token (mean over layers)")
  twin = ax[1, 1].twinx()
  twin.plot(x, [out["by_token_type"][t]["loss"] for t in types], "ko-", ms=3)
  twin.set_ylabel("next-token loss (black)")
  ax[1, 1].set_title(f"by input token; Spearman(FFN experts, loss) = {rho:+.2f}", fontsize=9)
  tag = "exp1_zero_experts" + suffix
  common.save_figure(fig, tag)
  common.save_json(tag, out)
  print(common.summary_line(tag, out))


if __name__ == "__main__":
  main()
