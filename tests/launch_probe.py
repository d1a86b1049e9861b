"""A tiny multi-process JAX program for tests/test_launch.py (run by nlmm_jax.launch).

Joins the job through jax.distributed, builds one global array from every process's
local rows and sums it across processes. PROBE_FAIL=<i> makes process i exit with
status 3 (abruptly, as a crash does) before the collective, so the others wait in it until they are stopped.
"""

import os
import sys

import jax

jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"],
                           int(os.environ["JAX_NUM_PROCESSES"]),
                           int(os.environ["JAX_PROCESS_ID"]))

import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

if os.environ.get("PROBE_FAIL") == str(jax.process_index()):
  print("boom: probe failing on purpose", file=sys.stderr, flush=True)
  os._exit(3)  # a crash: no jax.distributed shutdown (that would wait for the others)
mesh = Mesh(np.array(jax.devices()), ("d",))
local = np.full((jax.local_device_count(),), jax.process_index() + 1, np.float32)
x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("d")), local)
total = jax.jit(lambda a: a.sum(), out_shardings=NamedSharding(mesh, P()))(x)
print(f"process {jax.process_index()}/{jax.process_count()} devices {jax.device_count()} "
      f"sum {float(total):g}")
