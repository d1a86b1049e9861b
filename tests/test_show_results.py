"""scripts/show_results.py: the best evaluation per run (Markdown) and the comparison figure."""

import json
import pathlib
import subprocess
import sys

import pytest

from script_loader import load_script  # pylint: disable=g-bad-import-order

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "scripts" / "show_results.py"


@pytest.fixture(scope="module")
def show_results():
  return load_script("show_results")


def _eval(step, split, r1, plus=(20, 30)):
  """A metrics.jsonl record as evaluate.py writes it: R@1 per direction, R@5 and R@10 that
  much higher."""
  rec = {"step": step, "split": split}
  for d, v in r1.items():
    rec.update({f"{d}_R@1": v, f"{d}_R@5": min(v + plus[0], 100.0),
                f"{d}_R@10": min(v + plus[1], 100.0)})
  for k in (1, 5, 10):
    rec[f"mean_R@{k}"] = sum(rec[f"{d}_R@{k}"] for d in r1) / len(r1)
  recalls = [v for key, v in rec.items() if "_R@" in key and not key.startswith("mean")]
  rec["rsum_all"] = sum(recalls)
  rec["rsum_it"] = sum(rec[f"{d}_R@{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
  rec["eval_seconds"] = 1.0
  return rec


def _workdir(path, evals, steps):
  path.mkdir(parents=True)
  with open(path / "metrics.jsonl", "w") as f:
    for r in evals:
      f.write(json.dumps(r) + "\n")
  with open(path / "train_metrics.jsonl", "w") as f:
    for s in steps:
      f.write(json.dumps({"step": s, "train/loss": 5.0 / (1 + s / 50), "train/loss_it": 2.0,
                          "lr/fast": 1e-3, "train/examples_per_sec": 100.0}) + "\n")
    f.write('{"step": 9999, "train/lo')  # a line cut by a kill: skipped
  return path


ALL6 = ("i2t", "t2i", "i2a", "a2i", "t2a", "a2t")


@pytest.fixture
def runs(tmp_path):
  """alpha (six directions): best dev rsum_all at step 200, although rsum_it peaks at 300
  and a test evaluation is higher; beta (image-text only): best at 100, although mean R@1
  peaks at 150."""
  alpha = _workdir(tmp_path / "runs" / "alpha", [
      _eval(100, "dev", dict(zip(ALL6, (10, 11, 5, 6, 7, 8)))),
      _eval(200, "dev", dict(zip(ALL6, (20, 21, 30, 31, 32, 33)))),
      _eval(300, "dev", dict(zip(ALL6, (25, 26, 12, 13, 14, 15)))),
      _eval(300, "test", dict(zip(ALL6, (50, 50, 50, 50, 50, 50)))),
  ], range(10, 301, 10))
  beta = _workdir(tmp_path / "runs" / "beta", [
      _eval(50, "dev", {"i2t": 10.0, "t2i": 12.0}),
      _eval(100, "dev", {"i2t": 20.0, "t2i": 20.0}, plus=(40, 60)),  # rsum_all 320
      _eval(150, "dev", {"i2t": 22.0, "t2i": 23.0}),  # the best mean R@1; rsum_all 235
  ], range(5, 151, 5))
  return alpha, beta


def _rows(out):
  return {line.split("|")[1].strip(): [c.strip() for c in line.strip().strip("|").split("|")]
          for line in out.splitlines() if line.startswith("| ") and "---" not in line}


def test_best_table_and_figure(show_results, runs, tmp_path, capsys):
  alpha, beta = runs
  png = tmp_path / "out" / "cmp.png"
  assert show_results.main([str(alpha), str(beta), "--output", str(png)]) == 0
  out = capsys.readouterr().out
  rows = _rows(out)
  assert rows["run"] == ["run", "step", "I->T", "T->I", "I->A", "A->I", "T->A", "A->T",
                         "mean R@1", "rsum_it", "rsum_all"]
  a = _eval(200, "dev", dict(zip(ALL6, (20, 21, 30, 31, 32, 33))))
  assert rows["alpha"] == ["alpha", "200", "20.0", "21.0", "30.0", "31.0", "32.0", "33.0",
                           f"{a['mean_R@1']:.1f}", f"{a['rsum_it']:.1f}",
                           f"{a['rsum_all']:.1f}"]
  b = _eval(100, "dev", {"i2t": 20.0, "t2i": 20.0}, plus=(40, 60))
  assert rows["beta"] == ["beta", "100", "20.0", "20.0", "-", "-", "-", "-", "20.0",
                          f"{b['rsum_it']:.1f}", f"{b['rsum_all']:.1f}"]
  assert png.is_file() and png.stat().st_size > 10_000
  assert f"figure: {png}" in out


def test_best_selection_rules(show_results):
  evals = [_eval(1, "dev", {"i2t": 4.0, "t2i": 5.0}), _eval(2, "dev", {"i2t": 9.0, "t2i": 1.0}),
           _eval(3, "dev", {"i2t": 1.0, "t2i": 9.0}), _eval(4, "test", {"i2t": 90., "t2i": 90.})]
  assert show_results.best_eval(evals, "dev")["step"] == 2  # a tie: the earliest
  assert show_results.best_eval(evals, "test")["step"] == 4
  assert show_results.best_eval(evals, "val") is None
  old = {k: v for k, v in evals[1].items() if not k.startswith("rsum")}  # older logs
  assert show_results.rsum(old, "rsum_all") == evals[1]["rsum_all"]
  assert show_results.rsum(old, "rsum_it") == evals[1]["rsum_it"]


def test_run_without_evaluations_and_same_names(show_results, tmp_path, capsys):
  a = _workdir(tmp_path / "x" / "run", [], range(10, 50, 10))
  b = _workdir(tmp_path / "y" / "run", [_eval(10, "dev", {"i2t": 1.0, "t2i": 2.0})], [10])
  assert show_results.main([str(a), str(b), "--no-plot"]) == 0
  rows = _rows(capsys.readouterr().out)
  assert rows[str(a)] == [str(a)] + ["-"] * 10  # names: the paths (both end in "run")
  assert rows[str(b)][1] == "10"
  with pytest.raises(SystemExit, match="training workdir"):
    show_results.main([str(tmp_path)])


def test_command_line_default_output(runs, tmp_path):
  alpha, beta = runs
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  r = subprocess.run([sys.executable, str(SCRIPT), str(alpha), str(beta)], cwd=cwd,
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  assert (cwd / "results.png").stat().st_size > 10_000
  assert "| beta | 100 |" in r.stdout


def test_script_matches_the_package(show_results):
  """The script stands alone (no nlmm_jax import); its copies of the names must agree."""
  from nlmm_jax import evaluate, logging as nl_logging  # pylint: disable=g-import-not-at-top
  assert show_results.DIRS == tuple(evaluate.direction_name(q, g)
                                    for q, g in evaluate.DIRECTIONS)
  assert (show_results.TRAIN_JSONL, show_results.EVAL_JSONL) == (nl_logging.TRAIN_JSONL,
                                                                 nl_logging.EVAL_JSONL)
  assert show_results.KS == evaluate.KS
