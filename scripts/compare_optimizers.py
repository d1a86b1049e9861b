"""Does the choice of optimizer matter? One config trained with each optimizer.

  python scripts/compare_optimizers.py --workdir=runs/compare [--config=demo]
      [--optimizers=adamw,sgd,dmgd,anderson] [--seeds=0,1,2] [--lr_factors=0.3,1,3]
      [--steps=N] [--eval_every=N] [--base_lr=sgd=0.03,...]

Protocol, per optimizer (the same step budget for all):
  1. learning-rate sweep: one run per lr = base_lr * factor, with the first seed; the
     optimizer is set for the `default` label AND every CMS level (config.optim.optimizer,
     config.model.cms.levels.*.optimizer), and every label's peak lr is scaled by the
     same factor (the config's own lrs for adamw / dmgd / anderson, which take Adam-sized
     steps; `--base_lr` sets another base, e.g. for sgd);
  2. the lr with the highest best-dev mean R@1 is chosen (on dev only);
  3. that lr is run with the remaining seeds (the sweep's run is the first seed's).
A run is `python -m nlmm_jax.main` in its own workdir (`<workdir>/<optimizer>/lr<lr>_s<seed>`),
so it resumes like any run, and a finished run (eval_test.json present) is not repeated:
rerunning the script continues where it stopped. A run that stops with an error (a
diverged lr: the job refuses a non-finite loss) is recorded as `failed`, with its message,
and cannot be chosen; if every lr of an optimizer fails, it is reported so.

The test score of a run is that of its checkpoint with the best dev rsum_all (what the
training job itself reports in eval_test.json). Writes to --workdir:
  results.json   every run (optimizer, lr, seed, status, best dev mean R@1, test metrics)
                 and the summary;
  summary.md     the table: optimizer, chosen lr, test mean R@1 mean +- std over seeds
                 (sample std), each seed's value, and against the best optimizer the
                 difference and Welch's t-test p-value ("exceeds the seed spread" when
                 p < 0.05);
  dev_curves.png dev mean R@1 against step for every run of the chosen lrs, one colour per
                 optimizer.
"""

import argparse
import json
import math
import os
import subprocess
import sys

import numpy as np

OPTIMIZERS = ("adamw", "sgd", "dmgd", "anderson")
EVAL_JSONL = "metrics.jsonl"                        # nlmm_jax/logging.py
DEFAULT_BASE_LR = {"sgd": 0.03}                    # others: the config's own lrs


def parse_base_lr(text: str) -> dict:
  """'sgd=0.03,dmgd=1e-3' -> {'sgd': 0.03, 'dmgd': 0.001}."""
  out = dict(DEFAULT_BASE_LR)
  for item in filter(None, text.split(",")):
    name, _, value = item.partition("=")
    if name not in OPTIMIZERS or not value:
      raise SystemExit(f"error: --base_lr wants NAME=LR with NAME in {OPTIMIZERS}, got {item!r}")
    out[name] = float(value)
  return out


def run_dir(root: str, optimizer: str, lr: float, seed: int) -> str:
  return os.path.join(root, optimizer, f"lr{lr:.3g}_s{seed}")


def overrides(config, optimizer: str, factor: float, base_lr: float | None, seed: int,
              steps: int | None, eval_every: int | None) -> list[str]:
  """--config.* flags for one run: optimizer everywhere, every lr scaled by `factor`."""
  base = float(config.optim.lr) if base_lr is None else base_lr
  flags = [f"optim.optimizer={optimizer}", f"optim.lr={base * factor:.6g}", f"seed={seed}",
           "train.progress_bar=False"]
  for name, level in config.model.cms.levels.items():
    level_base = float(level.lr) if base_lr is None else base_lr
    flags += [f"model.cms.levels.{name}.optimizer={optimizer}",
              f"model.cms.levels.{name}.lr={level_base * factor:.6g}"]
  if steps:
    flags.append(f"train.total_steps={steps}")
    flags.append(f"train.checkpoint_every={eval_every or steps}")
  if eval_every:
    flags.append(f"train.eval_every={eval_every}")
  return flags


def read_run(workdir: str) -> dict:
  """{status, best_dev_mean_R@1, dev_curve [(step, mean R@1)], test {...}} of one run."""
  out = {"status": "missing"}
  curve = []
  path = os.path.join(workdir, EVAL_JSONL)
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          r = json.loads(line)
        except json.JSONDecodeError:
          continue
        if r.get("split") == "dev":
          curve.append((int(r["step"]), float(r["mean_R@1"])))
  out["dev_curve"] = curve
  out["best_dev_mean_R@1"] = max((v for _, v in curve), default=None)
  test = os.path.join(workdir, "eval_test.json")
  if os.path.exists(test):
    with open(test) as f:
      out["test"] = json.load(f)
    out["status"] = "done"
  elif os.path.exists(os.path.join(workdir, "error.txt")):
    with open(os.path.join(workdir, "error.txt")) as f:
      out["error"] = f.read().strip()
    out["status"] = "failed"
  return out


def train(config_name: str, workdir: str, flags: list[str]) -> dict:
  """Runs (or resumes) one job unless it has finished or failed before; its record."""
  record = read_run(workdir)
  if record["status"] in ("done", "failed"):
    return record
  os.makedirs(workdir, exist_ok=True)
  cmd = [sys.executable, "-m", "nlmm_jax.main", f"--config={config_name}",
         f"--workdir={workdir}"] + [f"--config.{f}" for f in flags]
  print("$", " ".join(cmd), flush=True)
  with open(os.path.join(workdir, "job.log"), "w") as log:
    proc = subprocess.run(cmd, stdout=log, stderr=subprocess.PIPE, text=True, check=False)
    log.write(proc.stderr)
  if proc.returncode != 0:
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    if not errors:   # not a reported user error: a bug, stop here with its traceback
      raise SystemExit(f"run {workdir} crashed (exit {proc.returncode}):\n{proc.stderr}")
    with open(os.path.join(workdir, "error.txt"), "w") as f:
      f.write(errors[-1] + "\n")
  return read_run(workdir)


def choose_lr(sweep: dict) -> float | None:
  """The lr whose finished run has the highest best-dev mean R@1 (None: all failed)."""
  done = {lr: r["best_dev_mean_R@1"] for lr, r in sweep.items()
          if r["status"] == "done" and r["best_dev_mean_R@1"] is not None}
  return max(done, key=lambda lr: (done[lr], -lr)) if done else None


def welch_p(a: list[float], b: list[float]) -> float:
  """Two-sided p-value of Welch's t-test (nan with fewer than 2 values a side)."""
  if len(a) < 2 or len(b) < 2:
    return float("nan")
  from scipy import stats  # pylint: disable=g-import-not-at-top
  if np.std(a) == 0 and np.std(b) == 0:
    return 0.0 if np.mean(a) != np.mean(b) else 1.0
  return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def summarise(results: dict) -> list[dict]:
  """One row per optimizer: chosen lr, test mean R@1 per seed, mean, std, vs the best."""
  rows = []
  for name, res in results.items():
    scores = [r["test"]["mean_R@1"] for r in res["seeds"].values() if r["status"] == "done"]
    rows.append({"optimizer": name, "lr": res["chosen_lr"], "scores": scores,
                 "mean": float(np.mean(scores)) if scores else None,
                 "std": float(np.std(scores, ddof=1)) if len(scores) > 1 else None,
                 "failed": sum(r["status"] == "failed" for r in res["seeds"].values())})
  scored = [r for r in rows if r["mean"] is not None]
  best = max(scored, key=lambda r: r["mean"]) if scored else None
  for r in rows:
    if best is not None and r["mean"] is not None and r is not best:
      r["diff_vs_best"] = r["mean"] - best["mean"]
      r["p_vs_best"] = welch_p(r["scores"], best["scores"])
    r["best"] = r is best
  return rows


def markdown(rows: list[dict], sweeps: dict) -> str:
  lines = ["| optimizer | lr (chosen on dev) | test mean R@1 (mean +- std) | per seed "
           "| vs best: diff, Welch p |", "|---|---|---|---|---|"]
  for r in rows:
    if r["mean"] is None:
      lines.append(f"| {r['optimizer']} | - | every lr failed | - | - |")
      continue
    spread = f" +- {r['std']:.2f}" if r["std"] is not None else ""
    if r["best"]:
      versus = "best"
    else:
      p = r["p_vs_best"]
      exceeds = "exceeds the seed spread" if p < 0.05 else "within the seed spread"
      versus = (f"{r['diff_vs_best']:+.2f}, p = {p:.3f} ({exceeds})" if not math.isnan(p)
                else f"{r['diff_vs_best']:+.2f}")
    lines.append(f"| {r['optimizer']} | {r['lr']:.3g} | {r['mean']:.2f}{spread} | "
                 f"{', '.join(f'{s:.2f}' for s in r['scores'])} | {versus} |")
  lines += ["", "Sweep (first seed), best dev mean R@1 per lr:", ""]
  for name, sweep in sweeps.items():
    cells = [f"{lr:.3g}: " + (f"{r['best_dev_mean_R@1']:.2f}" if r["status"] == "done"
                               else f"failed ({r.get('error', '?')})")
             for lr, r in sorted(sweep.items())]
    lines.append(f"- {name}: " + "; ".join(cells))
  return "\n".join(lines) + "\n"


def plot(results: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4))
  for i, (name, res) in enumerate(results.items()):
    for j, r in enumerate(res["seeds"].values()):
      if r["dev_curve"]:
        steps, vals = zip(*r["dev_curve"])
        ax.plot(steps, vals, color=f"C{i}", marker="o", markersize=3, alpha=0.8,
                label=f"{name} (lr {res['chosen_lr']:.3g})" if j == 0 else None)
  ax.set(xlabel="step", ylabel="dev mean R@1 (%)", title="dev recall, chosen lr, every seed")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--config", default="demo")
  p.add_argument("--optimizers", default=",".join(OPTIMIZERS))
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--lr_factors", default="0.3,1,3")
  p.add_argument("--base_lr", default="", help="NAME=LR,...: sweep centre (default: "
                 "the config's lrs; sgd 0.03)")
  p.add_argument("--steps", type=int, default=None, help="train.total_steps (default: the "
                 "config's)")
  p.add_argument("--eval_every", type=int, default=None)
  args = p.parse_args(argv)
  from nlmm_jax import config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config(args.config)
  optimizers = args.optimizers.split(",")
  unknown = set(optimizers) - set(OPTIMIZERS)
  if unknown:
    raise SystemExit(f"error: unknown optimizers {sorted(unknown)}; choose from {OPTIMIZERS}")
  seeds = [int(s) for s in args.seeds.split(",")]
  factors = [float(f) for f in args.lr_factors.split(",")]
  base_lrs = parse_base_lr(args.base_lr)
  root = os.path.abspath(args.workdir)

  results, sweeps = {}, {}
  for name in optimizers:
    base = base_lrs.get(name)
    lr_of = lambda f: (float(config.optim.lr) if base is None else base) * f
    run = lambda f, seed: train(args.config, run_dir(root, name, lr_of(f), seed), overrides(
        config, name, f, base, seed, args.steps, args.eval_every))
    sweeps[name] = {lr_of(f): run(f, seeds[0]) for f in factors}
    chosen = choose_lr(sweeps[name])
    seed_runs = {}
    if chosen is not None:
      factor = factors[[lr_of(f) for f in factors].index(chosen)]
      seed_runs = {seeds[0]: sweeps[name][chosen]}
      seed_runs.update({s: run(factor, s) for s in seeds[1:]})
    results[name] = {"chosen_lr": chosen, "seeds": seed_runs}
    print(f"{name}: lr {chosen} -> " + ", ".join(
        f"seed {s}: {r['test']['mean_R@1']:.2f}" if r["status"] == "done" else
        f"seed {s}: failed" for s, r in seed_runs.items()), flush=True)

  rows = summarise(results)
  table = markdown(rows, sweeps)
  with open(os.path.join(root, "summary.md"), "w") as f:
    f.write(table)
  with open(os.path.join(root, "results.json"), "w") as f:
    json.dump({"args": vars(args), "summary": rows,
               "sweeps": {n: {str(lr): r for lr, r in s.items()} for n, s in sweeps.items()},
               "runs": results}, f, indent=1)
  plot(results, os.path.join(root, "dev_curves.png"))
  print(table)
  return 0


if __name__ == "__main__":
  sys.exit(main())
