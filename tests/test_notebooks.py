"""The notebooks run top to bottom (nbclient), on the tiny corpus with small settings."""

import os

import nbformat
from nbclient import NotebookClient
import pytest

import tiny_run  # pylint: disable=g-bad-import-order

NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "notebooks")


def _execute(name: str, cwd, env: dict, monkeypatch) -> nbformat.NotebookNode:
  for key, value in env.items():
    monkeypatch.setenv(key, value)         # the kernel inherits this process' environment
  nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(cwd)}}).execute()  # raises on errors
  return nb


def _outputs(nb) -> str:
  text = []
  for cell in nb.cells:
    for out in cell.get("outputs", []):
      text.append(out.get("text", "") + str(out.get("data", {}).get("text/plain", "")))
  return "\n".join(text)


@pytest.mark.slow  # a notebook kernel that trains (70 s): the slow tier (CI runs it)
def test_quickstart_trains_shows_and_evaluates(tiny_corpus, tmp_path, monkeypatch):
  overrides = tiny_run.tiny_overrides(tiny_corpus / "corpus", tiny_corpus / "cache")
  nb = _execute("quickstart.ipynb", tmp_path, {
      "NLMM_WORKDIR": str(tmp_path / "run"), "NLMM_STEPS": "2",
      "NLMM_OVERRIDES": " ".join(overrides)}, monkeypatch)
  text = _outputs(nb)
  assert "test mean R@1" in text and "rsum_all" in text
  assert (tmp_path / "run" / "training_progress.png").exists()
  images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
  assert images, "the progress plot was not displayed"
  assert "dev " in text and "test " in text


@pytest.mark.slow  # a notebook kernel (36 s): the slow tier (CI runs it)
def test_retrieval_demo_queries_text_speech_and_ttt(tiny_trained, tmp_path, monkeypatch):
  workdir, _ = tiny_trained
  nb = _execute("retrieval_demo.ipynb", tmp_path, {
      "NLMM_WORKDIR": str(workdir), "NLMM_QUERY": "a small red circle at the top",
      "NLMM_TTT_STEPS": "1"}, monkeypatch)
  text = _outputs(nb)
  assert "typed + TTT" in text and "spoken + TTT" in text and "cosine(typed, spoken)" in text
  assert (tmp_path / "text_query.png").exists() and (tmp_path / "spoken_query.png").exists()
  images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
  assert len(images) == 2, "both grids are displayed"
