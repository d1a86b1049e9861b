"""What a researcher watches: TensorBoard + console (clu writers), JSONL logs, the plot.

Files in the workdir (process 0 only):
  events.out.tfevents.*   TensorBoard: train/*, lr/*, eval_<split>/*, hparams
  train_metrics.jsonl     one line per log step (the scalars written to TensorBoard)
  metrics.jsonl           one line per evaluation: {"step", "split", <R@K keys>...}
  training_progress.png   losses, R@1 per direction and lr per level against steps,
                          redrawn at each evaluation.
On resume the JSONL files are truncated to the restored step, so they never hold
lines from steps the run is about to redo.
"""

import json
import os
from typing import Any, Mapping

import numpy as np

from nlmm_jax import evaluate

TRAIN_JSONL = "train_metrics.jsonl"
EVAL_JSONL = "metrics.jsonl"
PLOT = "training_progress.png"


def create_writer(workdir: str, is_main: bool):
  """clu's default writer: TensorBoard + console on the main process, console elsewhere."""
  from clu import metric_writers  # pylint: disable=g-import-not-at-top  (imports TF)
  return metric_writers.create_default_writer(workdir, just_logging=not is_main,
                                              asynchronous=True)


def _to_python(x: Any) -> Any:
  if isinstance(x, (np.generic, np.ndarray)) or hasattr(x, "__array__"):
    arr = np.asarray(x)
    return arr.item() if arr.ndim == 0 else arr.tolist()
  return x


def append_jsonl(path: str, record: Mapping[str, Any]) -> None:
  with open(path, "a") as f:
    f.write(json.dumps({k: _to_python(v) for k, v in record.items()}) + "\n")


def read_jsonl(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  out = []
  with open(path) as f:
    for line in f:
      line = line.strip()
      if line:
        try:
          out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill: the rest is still good
          continue
  return out


def truncate_jsonl(path: str, last_step: int) -> None:
  """Drops lines after `last_step` (the run resumes from there and redoes them)."""
  if not os.path.exists(path):
    return
  keep = [r for r in read_jsonl(path) if r.get("step", 0) <= last_step]
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    for r in keep:
      f.write(json.dumps(r) + "\n")
  os.replace(tmp, path)


def plot_progress(workdir: str, eval_split: str = "dev") -> str:
  """Draws training_progress.png from the JSONL logs; returns its path."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  train = read_jsonl(os.path.join(workdir, TRAIN_JSONL))
  evals = [r for r in read_jsonl(os.path.join(workdir, EVAL_JSONL))
           if r.get("split") == eval_split]
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
  ax = axes[0]
  if train:
    steps = [r["step"] for r in train]
    for key in sorted({k for r in train for k in r if k.startswith("train/loss")}):
      ax.plot(steps, [r.get(key, np.nan) for r in train], label=key.split("/", 1)[1])
    ax.legend(fontsize=8)
  ax.set(title="training loss", xlabel="step")
  ax = axes[1]
  if evals:
    steps = [r["step"] for r in evals]
    for q, g in evaluate.DIRECTIONS:
      key = f"{evaluate.direction_name(q, g)}_R@1"
      if key in evals[-1]:
        ax.plot(steps, [r.get(key, np.nan) for r in evals], marker="o", label=key)
    if "mean_R@1" in evals[-1]:
      ax.plot(steps, [r["mean_R@1"] for r in evals], "k--", lw=2, label="mean_R@1")
    ax.legend(fontsize=8)
  ax.set(title=f"{eval_split} R@1 (%)", xlabel="step", ylim=(0, 100))
  ax = axes[2]
  if train:
    steps = [r["step"] for r in train]
    for key in sorted({k for r in train for k in r if k.startswith("lr/")}):
      ax.plot(steps, [r.get(key, np.nan) for r in train], label=key.split("/", 1)[1])
    ax.legend(fontsize=8)
  ax.set(title="learning rate per level", xlabel="step")
  fig.tight_layout()
  path = os.path.join(workdir, PLOT)
  fig.savefig(path + ".tmp.png", dpi=90)
  plt.close(fig)
  os.replace(path + ".tmp.png", path)
  return path
