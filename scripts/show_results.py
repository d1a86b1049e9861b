"""Compares training runs: `python scripts/show_results.py WORKDIR [WORKDIR ...]`.

For each workdir (a `--workdir` of nlmm_jax.main) it reads `metrics.jsonl` (one line per
evaluation) and `train_metrics.jsonl` (one line per log step), then

  1. prints every evaluation as a table (R@K per direction, mean, rsum_it, rsum_all);
  2. prints each run's best evaluation (highest `--split` rsum_all, the metric that picks
     the best checkpoint; the earliest on ties) as a Markdown table with R@1 per
     direction; a direction the run does not evaluate (no audio) is "-";
  3. draws one figure, `--output` (default `results.png` in the working directory):
     train/loss, rsum_it and rsum_all (the best evaluation starred), and R@1 of each of
     the six directions against steps, one colour per run (legend: the run names).

Two recall sums: `rsum_it` (I->T and T->I at R@1/5/10, at most 600: the RSUM of the
Flickr8k / COCO literature) and `rsum_all` (all six directions, at most 1800). A run is
named by its workdir's last path component (the whole path when two runs share it).
"""

import argparse
import json
import os
import sys

TRAIN_JSONL = "train_metrics.jsonl"  # nlmm_jax/logging.py
EVAL_JSONL = "metrics.jsonl"
DIRS = ("i2t", "t2i", "i2a", "a2i", "t2a", "a2t")  # evaluate.DIRECTIONS, in its order
ARROWS = {"i2t": "I->T", "t2i": "T->I", "i2a": "I->A", "a2i": "A->I", "t2a": "T->A",
          "a2t": "A->T"}
KS = (1, 5, 10)


def read_jsonl(path: str) -> list[dict]:
  """The records of a JSONL log (as nlmm_jax.logging.read_jsonl: a cut line is skipped)."""
  if not os.path.exists(path):
    return []
  out = []
  with open(path) as f:
    for line in f:
      if line.strip():
        try:
          out.append(json.loads(line))
        except json.JSONDecodeError:  # the last line of a killed run
          continue
  return out


def rsum(record: dict, key: str) -> float | None:
  """`rsum_it` / `rsum_all` as logged, or recomputed from the recalls (older logs)."""
  if key in record:
    return record[key]
  dirs = ("i2t", "t2i") if key == "rsum_it" else DIRS
  vals = [record[f"{d}_R@{k}"] for d in dirs for k in KS if f"{d}_R@{k}" in record]
  return float(sum(vals)) if vals else None


def best_eval(evals: list[dict], split: str) -> dict | None:
  """The evaluation of `split` with the highest rsum_all (the earliest on ties)."""
  best = None
  for r in evals:
    if r.get("split") != split or rsum(r, "rsum_all") is None:
      continue
    if best is None or rsum(r, "rsum_all") > rsum(best, "rsum_all"):
      best = r
  return best


def run_names(workdirs: list[str]) -> list[str]:
  names = [os.path.basename(os.path.normpath(wd)) for wd in workdirs]
  return [n if names.count(n) == 1 else os.path.normpath(wd)
          for n, wd in zip(names, workdirs)]


def _fmt(value) -> str:
  return "-" if value is None else f"{value:.1f}"


def evaluations_table(runs: list[dict], k: int) -> str:
  header = ["run", "step", "split"] + [f"{d}@{k}" for d in DIRS] + [
      f"mean@{k}", "rsum_it", "rsum_all"]
  lines = [" ".join(f"{h:>10}" for h in header)]
  for run in runs:
    for r in run["evals"]:
      row = [run["name"][:10], str(r["step"]), r.get("split", "?")]
      row += [_fmt(r.get(f"{d}_R@{k}")) for d in DIRS]
      row += [_fmt(r.get(f"mean_R@{k}")), _fmt(rsum(r, "rsum_it")), _fmt(rsum(r, "rsum_all"))]
      lines.append(" ".join(f"{c:>10}" for c in row))
  return "\n".join(lines)


def best_table(runs: list[dict], split: str) -> str:
  """Markdown: each run's best `split` evaluation, R@1 per direction and the sums."""
  header = (["run", "step"] + [ARROWS[d] for d in DIRS] +
            ["mean R@1", "rsum_it", "rsum_all"])
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for run in runs:
    b = run["best"]
    if b is None:
      row = [run["name"]] + ["-"] * (len(header) - 1)
    else:
      row = [run["name"], str(b["step"])] + [_fmt(b.get(f"{d}_R@1")) for d in DIRS]
      row += [_fmt(b.get("mean_R@1")), _fmt(rsum(b, "rsum_it")), _fmt(rsum(b, "rsum_all"))]
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


def plot(runs: list[dict], split: str, path: str) -> str:
  """One figure: loss, the recall sums and R@1 per direction against steps, a colour a run."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(3, 3, figsize=(16, 12))
  panels = {"loss": axes[0, 0], "rsum_it": axes[0, 1], "rsum_all": axes[0, 2]}
  panels.update({d: ax for d, ax in zip(DIRS, axes[1:].ravel())})
  has_data = dict.fromkeys(panels, False)
  for i, run in enumerate(runs):
    style = dict(color=f"C{i % 10}", ls="-" if i < 10 else "--", label=run["name"])
    train = [r for r in run["train"] if "train/loss" in r]
    if train:
      panels["loss"].plot([r["step"] for r in train], [r["train/loss"] for r in train],
                          lw=1.2, **style)
      has_data["loss"] = True
    evals = [r for r in run["evals"] if r.get("split") == split]
    steps = [r["step"] for r in evals]
    for key in ("rsum_it", "rsum_all"):
      vals = [rsum(r, key) for r in evals]
      if any(v is not None for v in vals):
        panels[key].plot(steps, [float("nan") if v is None else v for v in vals],
                         marker="o", ms=4, **style)
        has_data[key] = True
    if run["best"] is not None:
      panels["rsum_all"].plot([run["best"]["step"]], [rsum(run["best"], "rsum_all")],
                              marker="*", ms=16, color=style["color"], mec="k", ls="")
    for d in DIRS:
      vals = [r.get(f"{d}_R@1", float("nan")) for r in evals]
      if any(f"{d}_R@1" in r for r in evals):
        panels[d].plot(steps, vals, marker="o", ms=4, **style)
        has_data[d] = True
  panels["loss"].set(title="train/loss", xlabel="step")
  panels["rsum_it"].set(title=f"{split} rsum_it (I<->T, R@1/5/10; max 600)", xlabel="step")
  panels["rsum_all"].set(title=f"{split} rsum_all (6 directions; max 1800; * best)",
                         xlabel="step")
  for d in DIRS:
    panels[d].set(title=f"{split} {ARROWS[d]} R@1 (%)", xlabel="step", ylim=(0, 100))
  for key, ax in panels.items():
    ax.grid(alpha=0.3)
    if not has_data[key]:
      ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes,
              color="gray")
  handles, labels = [], []
  for ax in panels.values():  # the first panel that shows each run gives its legend entry
    for h, l in zip(*ax.get_legend_handles_labels()):
      if l not in labels:
        handles.append(h)
        labels.append(l)
  fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 6) or 1,
             fontsize=10, frameon=False)
  fig.tight_layout(rect=(0, 0, 1, 0.96))
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("workdirs", nargs="+")
  parser.add_argument("--k", type=int, default=1, choices=KS,
                      help="the R@K of the table of all evaluations")
  parser.add_argument("--split", default="dev",
                      help="the evaluations that are plotted and pick the best (dev)")
  parser.add_argument("--output", default="results.png", help="the figure (a .png)")
  parser.add_argument("--no-plot", action="store_true", help="print the tables only")
  args = parser.parse_args(argv)
  runs = []
  for wd, name in zip(args.workdirs, run_names(args.workdirs)):
    evals = read_jsonl(os.path.join(wd, EVAL_JSONL))
    train = read_jsonl(os.path.join(wd, TRAIN_JSONL))
    if not evals and not train:
      raise SystemExit(f"neither {EVAL_JSONL} nor {TRAIN_JSONL} in {wd}: is it a training "
                       "workdir?")
    runs.append({"name": name, "evals": evals, "train": train,
                 "best": best_eval(evals, args.split)})
  print(evaluations_table(runs, args.k))
  print(f"\nBest {args.split} evaluation of each run (by rsum_all):\n")
  print(best_table(runs, args.split))
  if not args.no_plot:
    print(f"\nfigure: {plot(runs, args.split, args.output)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
