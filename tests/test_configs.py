"""Configs: every file loads, overrides apply, unknown keys fail with the key's name."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

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


def test_config_path_resolution(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # a bare name does not depend on the working directory
  assert config_lib.config_path("demo") == config_lib.CONFIG_DIR / "demo.py"
  assert set(NAMES) <= set(config_lib.config_names())
  mine = tmp_path / "mine.py"
  mine.write_text((config_lib.CONFIG_DIR / "tiny.py").read_text())
  assert config_lib.config_path("mine.py") == pathlib.Path("mine.py")  # a path: as is
  assert config_lib.load_config(str(mine)).model.width == config_lib.load_config("tiny").model.width
  with pytest.raises(FileNotFoundError, match="available.*demo"):
    config_lib.config_path("dmeo")
  with pytest.raises(FileNotFoundError, match="bare name 'demo'"):
    config_lib.config_path("configs/demo.py")  # not here: points at the packaged name


def test_main_resolves_bare_config_name(tmp_path, monkeypatch):
  from nlmm_jax import main  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(tmp_path)
  demo = str(config_lib.CONFIG_DIR / "demo.py")
  argv = ["prog", "--config=demo", "--workdir=w", "--config.train.total_steps=3"]
  assert main.resolve_config_argv(argv) == ["prog", f"--config={demo}", "--workdir=w",
                                            "--config.train.total_steps=3"]
  assert main.resolve_config_argv(["p", "--config", "demo"]) == ["p", "--config", demo]
  assert main.resolve_config_argv(["p", "--config=demo:x"]) == ["p", f"--config={demo}:x"]
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "demo.py").write_text("")
  assert main.resolve_config_argv(["p", "--config=configs/demo.py"]) == [
      "p", "--config=configs/demo.py"]  # an existing path is kept
  with pytest.raises(FileNotFoundError, match="dmeo"):
    main.resolve_config_argv(["p", "--config=dmeo"])


# ---- A non-editable install (a wheel), as Colab users install: configs by bare name. ----

_REPO = pathlib.Path(__file__).resolve().parent.parent

# Runs in the installed copy: every config by name through config_lib.load_config.
_LOAD_ALL = """
import json, sys
from nlmm_jax import config_lib
out = {"config_lib": config_lib.__file__, "configs": {}}
for name in sys.argv[1:]:
  c = config_lib.load_config(name, ["train.total_steps=3"])
  out["configs"][name] = [str(config_lib.config_path(name)), c.model.width,
                          c.train.total_steps]
print(json.dumps(out))
"""

# Runs in the installed copy: `python -m nlmm_jax.main`'s own path up to main() (bare-name
# resolution, absl + config_flags parsing, an override), reporting instead of training.
_MAIN_FLAGS = """
import json, sys
from absl import app, flags
from nlmm_jax import main as entry
def report(main_fn):
  flags.FLAGS(sys.argv)
  module = sys.modules["config_config"]  # config_flags' name for the loaded config file
  print(json.dumps({"main": entry.__file__, "config_file": module.__file__,
                    "config_lib": module.config_lib.__file__,
                    "width": entry._CONFIG.value.model.width,
                    "total_steps": entry._CONFIG.value.train.total_steps}))
app.run = report
sys.argv = ["nlmm_jax.main", "--config=" + sys.argv[1], "--workdir=w",
            "--config.train.total_steps=3"]
entry.run()
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
  """(target dir, wheel names) of `pip install --target` of a wheel built from a copy."""
  base = tmp_path_factory.mktemp("wheel")
  src = base / "src"
  ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
  src.mkdir()
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(_REPO / name, src / name)
  for name in ("nlmm_jax", "configs"):  # a copy: the build writes build/ and egg-info
    shutil.copytree(_REPO / name, src / name, ignore=ignore)
  pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
  r = subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "-w", str(base / "dist"), str(src)],
                     capture_output=True, text=True, cwd=base)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  (wheel,) = (base / "dist").glob("nlmm_jax-*.whl")
  target = base / "site"
  r = subprocess.run(pip + ["install", "--no-deps", "--no-index", "--target", str(target),
                            str(wheel)], capture_output=True, text=True, cwd=base)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  with zipfile.ZipFile(wheel) as z:
    names = {n for n in z.namelist() if ".dist-info/" not in n}
  expected = {p.relative_to(src).as_posix() for p in (src / "nlmm_jax").rglob("*.py")}
  expected |= {f"nlmm_jax/configs/{p.name}" for p in (src / "configs").glob("*.py")}
  return target, names, expected


def _run_installed(target, cwd, args):
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env["PYTHONPATH"] = str(target)
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  return subprocess.run([sys.executable] + args, capture_output=True, text=True, cwd=cwd,
                        env=env, timeout=120)


def test_wheel_holds_every_module_and_config(installed):
  _, names, expected = installed
  assert expected - names == set(), "missing from the wheel (pyproject.toml packages?)"
  assert {f"nlmm_jax/configs/{n}.py" for n in NAMES} <= names


def test_installed_configs_load_by_name(installed, tmp_path):
  target, _, _ = installed
  r = _run_installed(target, tmp_path, ["-c", _LOAD_ALL] + NAMES)
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  assert pathlib.Path(out["config_lib"]).is_relative_to(target)  # not the clone's copy
  for name in NAMES:
    path, width, steps = out["configs"][name]
    assert pathlib.Path(path) == target / "nlmm_jax" / "configs" / f"{name}.py"
    assert width == config_lib.load_config(name).model.width and steps == 3


@pytest.mark.parametrize("name", NAMES)
def test_installed_main_resolves_bare_name(installed, tmp_path, name):
  target, _, _ = installed
  r = _run_installed(target, tmp_path, ["-c", _MAIN_FLAGS, name])
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  assert pathlib.Path(out["main"]).is_relative_to(target)
  assert pathlib.Path(out["config_file"]) == target / "nlmm_jax" / "configs" / f"{name}.py"
  assert pathlib.Path(out["config_lib"]).is_relative_to(target)  # its import, installed
  assert out["width"] == config_lib.load_config(name).model.width
  assert out["total_steps"] == 3


def test_installed_command_line(installed, tmp_path):
  """The real `python -m nlmm_jax.main`: flags parse (no training: main() stops at the
  extra argument before importing anything heavy); a wrong name lists the names."""
  target, _, _ = installed
  common = ["-m", "nlmm_jax.main", f"--workdir={tmp_path / 'w'}"]
  r = _run_installed(target, tmp_path, common + ["--config=demo",
                                                 "--config.train.total_steps=3", "extra"])
  assert r.returncode != 0 and "Unexpected arguments: ['extra']" in r.stderr, r.stderr[-3000:]
  r = _run_installed(target, tmp_path, common + ["--config=demo",
                                                 "--config.train.totl_steps=3", "extra"])
  assert r.returncode != 0 and "totl_steps" in r.stderr  # overrides are still checked
  r = _run_installed(target, tmp_path, common + ["--config=dmeo"])
  assert r.returncode == 1 and "no config named 'dmeo'" in r.stderr
  assert "'demo'" in r.stderr and "Traceback" not in r.stderr
  r = _run_installed(target, tmp_path, common + ["--config=configs/demo.py"])
  assert r.returncode == 1 and "bare name 'demo'" in r.stderr
  assert not (tmp_path / "w").exists()
