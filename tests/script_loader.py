"""Imports a file of scripts/ (not a package) as a module, for the tests of the scripts."""

import importlib.util
import pathlib

SCRIPTS = pathlib.Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str):
  """scripts/<name>.py, executed as a fresh module."""
  spec = importlib.util.spec_from_file_location(f"{name}_script", SCRIPTS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
