"""Configs: every file loads, overrides apply, unknown keys fail with the key's name."""

import subprocess
import sys

import pytest

from nlmm_jax import config_lib

NAMES = ["demo", "tiny", "small", "medium", "large"]


@pytest.mark.parametrize("name", NAMES)
def test_config_loads(name):
  c = config_lib.load_config(name)
  assert c.model.width % c.model.heads == 0
  assert list(c.model.cms.levels.keys())


def test_issue_shapes():
  small = config_lib.load_config("small")
  assert (small.model.width, small.model.heads, small.model.depth.text,
          small.model.num_latents) == (512, 8, 6, 32)
  assert [l.update_every for l in small.model.cms.levels.values()] == [1, 16, 256]
  medium = config_lib.load_config("medium")
  assert (medium.model.width, medium.model.heads, medium.model.depth.image,
          medium.model.num_latents) == (768, 12, 8, 48)
  large = config_lib.load_config("large")
  assert (large.model.width, large.model.heads, large.model.depth.audio,
          large.model.num_latents) == (1024, 16, 12, 64)


def test_override_applies():
  c = config_lib.load_config("demo", ["train.total_steps=7", "model.memory.rule=hebbian"])
  assert c.train.total_steps == 7 and c.model.memory.rule == "hebbian"


def test_unknown_override_key_names_the_key():
  with pytest.raises(Exception, match="widht"):
    config_lib.load_config("demo", ["model.widht=3"])


def test_unknown_key_on_command_line_fails():
  # The same through the real entry point's flag parsing (no training starts).
  code = ("from absl import flags; from ml_collections import config_flags; import sys;"
          "config_flags.DEFINE_config_file('config');"
          "flags.FLAGS(['x', '--config=configs/demo.py', '--config.train.totl_steps=3'])")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                     cwd=str(config_lib.CONFIG_DIR.parent))
  assert r.returncode != 0
  assert "totl_steps" in r.stderr
