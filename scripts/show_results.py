"""Prints a run's evaluations as a table: `python scripts/show_results.py WORKDIR [...]`.

Reads `metrics.jsonl` (one line per evaluation) and `eval_test.json` from each workdir.
"""

import argparse
import json
import os
import sys

DIRS = ("i2t", "t2i", "i2a", "a2i", "t2a", "a2t")


def load(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    raise SystemExit(f"{path} not found: is {workdir} a training workdir?")
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("workdirs", nargs="+")
  parser.add_argument("--k", type=int, default=1, choices=(1, 5, 10))
  args = parser.parse_args(argv)
  header = ["run", "step", "split"] + [f"{d}@{args.k}" for d in DIRS] + [
      f"mean@{args.k}", "rsum"]
  print(" ".join(f"{h:>10}" for h in header))
  for wd in args.workdirs:
    for r in load(wd):
      row = [os.path.basename(os.path.normpath(wd))[:10], str(r["step"]), r["split"]]
      row += [f"{r[f'{d}_R@{args.k}']:.1f}" if f"{d}_R@{args.k}" in r else "-" for d in DIRS]
      row += [f"{r[f'mean_R@{args.k}']:.1f}", f"{r['rsum']:.1f}"]
      print(" ".join(f"{c:>10}" for c in row))
  return 0


if __name__ == "__main__":
  sys.exit(main())
