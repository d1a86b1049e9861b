"""`python -m nlmm_jax.launch`: N local JAX processes that form one job."""

import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")


def _launch(*flags, env_extra=None, timeout=240):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, TESTS]), **(env_extra or {}))
  env["XLA_FLAGS"] = ""
  return subprocess.run([sys.executable, "-m", "nlmm_jax.launch", *flags,
                         "--module=launch_probe", "--"], capture_output=True, text=True,
                        cwd=REPO, env=env, timeout=timeout)


def test_two_processes_form_one_job():
  r = _launch("--num_processes=2", "--devices_per_process=2")
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  lines = r.stdout.splitlines()
  # Every process sees 4 global devices; the sum of rows (1, 1) + (2, 2) crosses processes.
  for i in range(2):
    assert any(l.startswith(f"[p{i}] process {i}/2 devices 4 sum 6") for l in lines), lines


def test_a_failing_process_stops_the_others():
  t0 = time.time()
  r = _launch("--num_processes=2", "--grace_secs=3", env_extra={"PROBE_FAIL": "1"})
  assert r.returncode == 3, r.stdout[-3000:] + r.stderr[-3000:]
  last = r.stdout.strip().splitlines()[-1]
  assert last.startswith("launch: process 1 of 2 failed (exit status 3)"), last
  assert "boom: probe failing on purpose" in last
  assert "[p1] boom" in r.stdout
  assert not any(l.startswith("[p0] process 0/2") for l in r.stdout.splitlines())
  assert time.time() - t0 < 200


def test_bad_arguments():
  r = _launch("--num_processes=0")
  assert r.returncode == 2 and "--num_processes must be >= 1" in r.stderr


def test_distributed_args_from_the_environment():
  from nlmm_jax.main import distributed_args  # pylint: disable=g-import-not-at-top
  assert distributed_args({}) is None
  assert distributed_args({"JAX_COORDINATOR_ADDRESS": "h:1234", "JAX_NUM_PROCESSES": "4",
                           "JAX_PROCESS_ID": "3"}) == dict(
                               coordinator_address="h:1234", num_processes=4, process_id=3)
  # Clusters: JAX's auto-detection, only when the job has several processes.
  assert distributed_args({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8"}) == {}
  assert distributed_args({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None
  assert distributed_args({"OMPI_COMM_WORLD_SIZE": "2"}) == {}
  assert distributed_args({"OMPI_COMM_WORLD_SIZE": "1"}) is None
  assert distributed_args({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}) == {}
  assert distributed_args({"TPU_WORKER_HOSTNAMES": "t0"}) is None


def test_cpu_devices_setting():
  """train.cpu_devices splits the CPU into JAX devices, unless the environment has."""
  code = ("from nlmm_jax.main import set_cpu_devices; import jax, os; "
          "done = set_cpu_devices(3, os.environ); print(done, jax.device_count())")
  run = lambda env: subprocess.run([sys.executable, "-c", code], capture_output=True,
                                   text=True, cwd=REPO, env=env, timeout=120)
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
  env["JAX_PLATFORMS"] = "cpu"
  r = run(env)
  assert r.stdout.split() == ["True", "3"], r.stderr[-2000:]
  r = run(dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=2"))
  assert r.stdout.split() == ["False", "2"], r.stderr[-2000:]
  from nlmm_jax.main import set_cpu_devices  # pylint: disable=g-import-not-at-top
  assert not set_cpu_devices(0, {})
