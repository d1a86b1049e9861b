"""Test setup: two CPU devices (sharded code), absl flags parsed (grain workers)."""

import os

# Must run before jax initialises its backend.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import flags  # noqa: E402

# grain 0.2.18 worker processes read absl flags (upstream grain #1355).
flags.FLAGS.mark_as_parsed()

import jax  # noqa: E402

jax.config.update("jax_enable_x64", False)
