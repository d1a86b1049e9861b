"""Two JAX processes train exactly like one: the tiny job under `nlmm_jax.launch`.

The reference is the session's tiny job (tests/conftest.py `tiny_job`): one process with
two CPU devices. Here the same config runs in two processes with one device each (CPU
collectives over gloo), the way two hosts would run it.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tiny_run import tiny_overrides  # pylint: disable=g-bad-import-order

pytestmark = pytest.mark.slow   # two processes per run: `pytest -m slow`

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")


def _launch(corpus, workdir, *overrides, faults=None):
  """`python -m nlmm_jax.launch --num_processes=2 -- --config=demo ...` (the tiny job)."""
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, TESTS]), **(faults or {}))
  env["XLA_FLAGS"] = ""  # the launcher gives each process its one device
  # No persistent compilation cache: processes running collectives from executables
  # loaded from it aborted in gloo (jax 0.10.2), so every launch compiles.
  flags = [f"--config.{o}" for o in tiny_overrides(corpus / "corpus", corpus / "cache")]
  flags += [f"--config.{o}" for o in overrides]
  return subprocess.run(
      [sys.executable, "-m", "nlmm_jax.launch", "--num_processes=2", "--grace_secs=10",
       "--module=launch_train", "--", "--config=demo", f"--workdir={workdir}", *flags],
      capture_output=True, text=True, cwd=REPO, env=env, timeout=900)


def _jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def _final_params(workdir):
  """The latest checkpoint's params, read with plain orbax as the README shows for a
  checkpoint written on another device layout (here: by two processes)."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
  step = mngr.latest_step()
  meta = ocp.StandardCheckpointer().metadata(
      os.path.join(workdir, "checkpoints", str(step), "state")).item_metadata
  one_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one_device),
                        meta.tree)
  state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
  mngr.close()
  return step, state["state"]["params"]


def _assert_same_training(got_dir, want_dir):
  """Same losses at every step, final parameters and eval metrics (to 1e-5)."""
  got, want = _jsonl(os.path.join(got_dir, "train_metrics.jsonl")), _jsonl(
      os.path.join(want_dir, "train_metrics.jsonl"))
  assert [r["step"] for r in got] == [r["step"] for r in want]
  for g, w in zip(got, want):
    for key in w:
      if key not in ("train/examples_per_sec",):
        np.testing.assert_allclose(g[key], w[key], rtol=1e-5, atol=1e-5, err_msg=key)
  s1, p1 = _final_params(str(got_dir))
  s2, p2 = _final_params(str(want_dir))
  assert s1 == s2
  import jax  # pylint: disable=g-import-not-at-top
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5), p1, p2)
  drop = lambda m: {k: v for k, v in m.items() if k != "eval_seconds"}
  e1 = [drop(m) for m in _jsonl(os.path.join(got_dir, "metrics.jsonl"))]
  e2 = [drop(m) for m in _jsonl(os.path.join(want_dir, "metrics.jsonl"))]
  assert len(e1) == len(e2) == 3  # dev at 2 and 4, test
  for a, b in zip(e1, e2):
    assert a.keys() == b.keys()
    for k in a:
      if isinstance(a[k], str):
        assert a[k] == b[k], k
      else:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6, err_msg=k)


@pytest.fixture(scope="module")
def two_process_run(tiny_corpus, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("two_processes") / "run"
  r = _launch(tiny_corpus, workdir)
  assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
  return workdir, r.stdout


def test_two_processes_train_like_one(two_process_run, tiny_job):
  workdir, out = two_process_run
  lines = out.splitlines()
  for i in range(2):
    assert any(l.startswith(f"[p{i}]") and "process " + f"{i}/2, 1 local / 2 global devices"
               in l for l in lines), f"process {i} did not report 1 local / 2 global devices"
  _assert_same_training(workdir, tiny_job[0])
  # One set of files, written by process 0 only: one TensorBoard file, one line per step.
  events = [f for f in os.listdir(workdir) if f.startswith("events.out.tfevents")]
  assert len(events) == 1, os.listdir(workdir)
  assert len(_jsonl(workdir / "train_metrics.jsonl")) == 4
  for name in ("config.json", "eval_dev.json", "eval_test.json", "training_progress.png"):
    assert (workdir / name).exists(), name


def test_preempted_and_killed_two_process_run_resumes_exactly(tiny_corpus, two_process_run,
                                                              tmp_path):
  """SIGTERM to process 1 alone stops both with one checkpoint; a SIGKILL of process 1
  after a later checkpoint ends the job (the launcher stops process 0); the same command
  then resumes and ends exactly where the uninterrupted two-process run did."""
  workdir = tmp_path / "run"
  every_step = "train.checkpoint_every=1"
  r = _launch(tiny_corpus, workdir, every_step, faults={"NLMM_TEST_SIGTERM": "1:1"})
  assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
  stops = {l[:4] for l in r.stdout.splitlines() if "Stopped at step" in l}
  assert stops == {"[p0]", "[p1]"}, r.stdout[-4000:]
  saved = sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())
  assert len(saved) == 1 and saved[0] < 3, saved
  assert not (workdir / "eval_test.json").exists()

  r = _launch(tiny_corpus, workdir, every_step, faults={"NLMM_TEST_SIGKILL": "1:3"})
  assert r.returncode != 0, r.stdout[-4000:]
  assert f"Resumed from {workdir / 'checkpoints'} step {saved[0]}" in r.stdout
  last = r.stdout.strip().splitlines()[-1]
  assert last.startswith("launch: process 1 of 2 failed (signal 9)"), last
  assert not (workdir / "eval_test.json").exists()

  r = _launch(tiny_corpus, workdir, every_step)
  assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
  assert f"Resumed from {workdir / 'checkpoints'} step 3" in r.stdout
  _assert_same_training(workdir, two_process_run[0])
