"""scripts/compare_optimizers.py: the protocol (sweep on dev, seeds at the chosen lr), the
run overrides, failure records and the summary's statistics, with stand-in runs."""

import json
import os
import subprocess

import pytest

from nlmm_jax import config_lib
from script_loader import load_script  # pylint: disable=g-bad-import-order

@pytest.fixture(scope="module")
def script():
  return load_script("compare_optimizers")


def _write_run(workdir, dev_curve, test_r1):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    for step, r1 in dev_curve:
      f.write(json.dumps({"step": step, "split": "dev", "mean_R@1": r1}) + "\n")
  with open(os.path.join(workdir, "eval_test.json"), "w") as f:
    json.dump({"step": dev_curve[-1][0], "mean_R@1": test_r1}, f)


def test_overrides_set_the_optimizer_and_scale_every_lr(script):
  demo = config_lib.load_config("demo")
  flags = script.overrides(demo, "dmgd", 3.0, None, 2, steps=40, eval_every=20)
  c = config_lib.load_config("demo", flags)
  assert c.optim.optimizer == "dmgd" and c.seed == 2
  assert c.optim.lr == pytest.approx(3 * demo.optim.lr)
  for name, level in c.model.cms.levels.items():
    assert level.optimizer == "dmgd"
    assert level.lr == pytest.approx(3 * demo.model.cms.levels[name].lr)
  assert (c.train.total_steps, c.train.eval_every, c.train.checkpoint_every) == (40, 20, 20)
  sgd = config_lib.load_config("demo", script.overrides(demo, "sgd", 0.3, 0.1, 0, None, None))
  assert sgd.optim.lr == pytest.approx(0.03)
  assert all(l.lr == pytest.approx(0.03) for l in sgd.model.cms.levels.values())
  assert sgd.train.total_steps == demo.train.total_steps


def test_protocol_sweeps_on_dev_then_runs_the_seeds_of_the_chosen_lr(script, tmp_path,
                                                                     monkeypatch):
  calls = []
  dev_by_factor = {0.3: 40.0, 1.0: 50.0, 3.0: 60.0}     # factor 3 wins on dev

  def fake_train(config_name, workdir, flags):
    lr = float(next(f for f in flags if f.startswith("optim.lr=")).split("=")[1])
    seed = int(next(f for f in flags if f.startswith("seed=")).split("=")[1])
    calls.append((os.path.basename(os.path.dirname(workdir)), lr, seed))
    optimizer = os.path.basename(os.path.dirname(workdir))
    factor = min(dev_by_factor, key=lambda f: abs(f * 1e-3 - lr))
    os.makedirs(workdir, exist_ok=True)
    if optimizer == "sgd" and factor == 3.0:        # a diverged run: sgd picks factor 1
      with open(os.path.join(workdir, "error.txt"), "w") as f:
        f.write("error: non-finite loss\n")
      return script.read_run(workdir)
    # adamw beats sgd by far more than the seed spread.
    test = (80.0 if optimizer == "adamw" else 60.0) + seed
    _write_run(workdir, [(10, dev_by_factor[factor] / 2), (20, dev_by_factor[factor])], test)
    return script.read_run(workdir)

  monkeypatch.setattr(script, "train", fake_train)
  root = tmp_path / "cmp"
  assert script.main(["--workdir", str(root), "--optimizers", "adamw,sgd",
                      "--base_lr", "sgd=1e-3", "--seeds", "0,1,2"]) == 0
  sweep = [(o, lr, s) for o, lr, s in calls if s == 0]
  assert sorted(sweep) == sorted((o, f * 1e-3, 0) for o in ("adamw", "sgd")
                                 for f in (0.3, 1.0, 3.0))
  seeds = [(o, lr, s) for o, lr, s in calls if s != 0]
  assert sorted(seeds) == [("adamw", 3e-3, 1), ("adamw", 3e-3, 2), ("sgd", 1e-3, 1),
                           ("sgd", 1e-3, 2)]
  results = json.loads((root / "results.json").read_text())
  rows = {r["optimizer"]: r for r in results["summary"]}
  assert rows["adamw"]["best"] and rows["adamw"]["scores"] == [80.0, 81.0, 82.0]
  assert rows["sgd"]["diff_vs_best"] == pytest.approx(-20.0)
  assert rows["sgd"]["p_vs_best"] < 0.05
  summary = (root / "summary.md").read_text()
  assert "exceeds the seed spread" in summary
  assert "failed (error: non-finite loss)" in summary
  assert (root / "dev_curves.png").stat().st_size > 0


def test_choose_lr_ignores_failed_and_unfinished_runs(script):
  done = lambda v: {"status": "done", "best_dev_mean_R@1": v}
  assert script.choose_lr({0.1: done(30.0), 0.3: {"status": "failed",
                                                  "best_dev_mean_R@1": 90.0},
                           1.0: {"status": "missing", "best_dev_mean_R@1": 95.0}}) == 0.1
  assert script.choose_lr({0.1: {"status": "failed", "best_dev_mean_R@1": None}}) is None


def test_seed_spread_decides_whether_a_difference_counts(script):
  run = lambda v: {"status": "done", "test": {"mean_R@1": v}}
  results = {"a": {"chosen_lr": 1e-3, "seeds": {0: run(50.0), 1: run(60.0), 2: run(55.0)}},
             "b": {"chosen_lr": 1e-3, "seeds": {0: run(52.0), 1: run(58.0), 2: run(53.0)}}}
  rows = {r["optimizer"]: r for r in script.summarise(results)}
  assert rows["a"]["best"] and not rows["b"]["best"]
  assert rows["b"]["p_vs_best"] > 0.05
  assert "within the seed spread" in script.markdown(list(rows.values()), {})
  rows["b"]["p_vs_best"] = 0.2                   # between 0.05 and any looser threshold
  assert "within the seed spread" in script.markdown(list(rows.values()), {})
  rows["b"]["p_vs_best"] = 0.04
  assert "exceeds the seed spread" in script.markdown(list(rows.values()), {})


def test_a_failed_run_is_recorded_and_not_rerun_but_a_crash_stops(script, tmp_path,
                                                                  monkeypatch):
  results = iter([subprocess.CompletedProcess([], 1, "", "I1 log\nerror: non-finite loss\n"),
                  subprocess.CompletedProcess([], 1, "", "Traceback ...\nKeyError: 'x'\n")])
  calls = []

  def fake_run(cmd, **kwargs):
    calls.append(cmd)
    return next(results)

  monkeypatch.setattr(script.subprocess, "run", fake_run)
  failed = script.train("demo", str(tmp_path / "a"), [])
  assert failed["status"] == "failed" and failed["error"] == "error: non-finite loss"
  assert script.train("demo", str(tmp_path / "a"), [])["status"] == "failed"
  assert len(calls) == 1                                      # not repeated
  _write_run(str(tmp_path / "b"), [(4, 10.0)], 9.0)
  assert script.train("demo", str(tmp_path / "b"), [])["status"] == "done"
  assert len(calls) == 1                                      # a finished run is not rerun
  with pytest.raises(SystemExit, match="crashed"):
    script.train("demo", str(tmp_path / "c"), [])
