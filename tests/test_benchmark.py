"""scripts/benchmark.py: the peak, memory and optim sections at tiny sizes, through main()."""

import json
import math

import pytest

from script_loader import load_script  # pylint: disable=g-bad-import-order


def load_benchmark():
  return load_script("benchmark")


def positive(x) -> bool:
  return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_baseline_runs_first_and_last_and_ratios_use_the_mean_of_both():
  bench = load_benchmark()
  assert bench.bracketed(["adamw", "dmgd", "anderson"]) == ["adamw", "dmgd", "anderson",
                                                            "adamw"]
  assert bench.bracketed(["adamw"]) == ["adamw"]
  rows = [dict(opt="adamw", t=1.0), dict(opt="dmgd", t=4.0), dict(opt="adamw", t=3.0)]
  bench.ratio_to_baseline(rows, "t", lambda r: r["opt"] == "adamw")
  assert [r["vs_adamw"] for r in rows] == [0.5, 2.0, 1.5]


@pytest.mark.slow  # six benchmark sections, ~90 s: the slow tier (CI runs it)
def test_peak_memory_optim_figures(tmp_path):
  out = tmp_path / "figures.json"
  assert load_benchmark().main([
      "--only", "memory,hope,optim,optim_parts,optim_kernels", "--json", str(out), "--repeats", "1",
      "--peak_n", "128", "--batch", "1", "--seq_len", "16", "--memory_width", "64",
      "--chunk_size", "8", "--sweep", "", "--optim_config", "demo",
      "--optim_names", "adamw,anderson,anderson-bf16", "--optim_steps", "2",
      "--hope_seq_lens", "12", "--hope_width", "64", "--hope_batch", "1", "--hope_hidden", "4",
      "--hope_chunk_size", "4", "--parts_shape", "64,32", "--parts_tensors", "2",
      "--parts_fresh_n", "64"]) == 0
  figures = json.loads(out.read_text())
  assert list(figures) == ["meta", "peak", "memory", "hope", "optim", "optim_parts",
                           "optim_kernels"]

  assert [r["dtype"] for r in figures["peak"]] == ["float32", "bfloat16"]
  for r in figures["peak"]:
    assert r["n"] == 128 and positive(r["gflop_s"]) and positive(r["ms"])
    assert math.isclose(r["xla_gflop"], 2 * 128**3 / 1e9, rel_tol=0.05)  # + converts

  memory = figures["memory"]
  assert {(r["form"], r["rule"]) for r in memory} == {
      (f, r) for f in ("recurrent", "chunked") for r in ("hebbian", "delta")}
  for r in memory:
    for key in ("fwd_bwd_s", "tok_per_s", "xla_gflop", "gflop_s", "rec/chunked"):
      assert positive(r[key]), (key, r)
    assert 0 < r["pct_peak"] < 1000, r
    assert r["loops"] >= 0

  hope = figures["hope"]
  assert [(r["form"], r["T"], r["C"]) for r in hope] == [("recurrent", 12, "-"),
                                                        ("chunked", 12, 4)]
  for r in hope:
    for key in ("fwd_bwd_s", "tok_per_s", "xla_gflop", "rec/chunked"):
      assert positive(r[key]), (key, r)

  optim = figures["optim"]
  assert [r["optimizer"] for r in optim] == [
      "optax.adamw", "clip + optax.adamw", "levels:adamw", "levels:anderson",
      "levels:anderson-bf16", "optax.adamw"]
  # m = 3: 7 float32 copies of the parameters; with bfloat16 rings 2 + 6 halves = 5
  # (plus, in both, the slower levels' gradient accumulators: under one copy).
  assert 0.6 < optim[4]["state_mib"] / optim[3]["state_mib"] < 0.75
  assert math.isclose(optim[0]["vs_adamw"] + optim[-1]["vs_adamw"], 2.0)
  for r in optim:
    assert r["steps"] == 2
    for key in ("ms_per_step", "ms_max", "state_mib", "vs_adamw"):
      assert positive(r[key]), (key, r)

  parts = figures["optim_parts"]
  assert [r["part"] for r in parts[:2]] == ["write 64x64 f32, in_place", "write 64x64 f32, fresh"]
  assert [r["part"].split(",")[0] for r in parts[2:]] == [
      "optax.adamw", "dmgd", "dmgd hidden=2", "dmgd phi_sample=1024",
      "dmgd hidden=0 (linear)", "anderson"]
  assert parts[2]["vs_adamw"] == 1.0
  for r in parts:
    assert positive(r["ms"]) and math.isclose(r["mib"], 64 * 32 * 4 * 2 / 2**20 if "x [" in r["part"]
                                              else 64 * 64 * 4 / 2**20), r

  kernels = figures["optim_kernels"]
  for name in ("optax.adamw", "dmgd", "anderson"):
    mine = [r for r in kernels if r["optimizer"] == name]
    assert mine[-1]["kernel"] == "(total)" and mine[-2]["kernel"] == "(other kinds)"
    assert len(mine) <= 6 + 2 and all(r["ms_per_step"] >= 0 for r in mine), mine
    assert math.isclose(sum(r["ms_per_step"] for r in mine[:-1]), mine[-1]["ms_per_step"])
    assert positive(mine[-1]["ms_per_step"]) and mine[-1]["per_step"] >= 3, mine
  totals = {r["optimizer"]: r for r in kernels if r["kernel"] == "(total)"}
  # Anderson runs more kernels than AdamW (reductions, ring writes): the trace sees them.
  assert totals["anderson"]["per_step"] > totals["optax.adamw"]["per_step"]


@pytest.mark.slow  # two compiles of the demo train step: the slow tier (CI runs it)
def test_accum_figures(tmp_path):
  """The accum section on the tiny demo model (tests/tiny_run.py, recurrent memories
  for compile time) at batch 8, 4 micro-batches of 2 rows (one per device): the
  accumulated row first, with the full batch's first-step loss (every negative kept).
  Not asserted: less memory, which needs real sizes (here the micro-batch copies of the
  inputs and the gradient carry outweigh the tiny activations)."""
  from tiny_run import TINY_OVERRIDES  # pylint: disable=g-import-not-at-top
  out = tmp_path / "figures.json"
  assert load_benchmark().main([
      "--only", "accum", "--json", str(out), "--repeats", "1", "--peak_n", "128",
      "--accum_config", "demo", "--accum_batch", "8", "--accum_steps", "4",
      "--accum_repeats", "1", "--accum_overrides",
      ",".join([o for o in TINY_OVERRIDES if not o.startswith("train.")]
               + ["model.memory.form=recurrent"])]) == 0
  figures = json.loads(out.read_text())
  assert list(figures) == ["meta", "peak", "accum"]
  rows = figures["accum"]
  assert [(r["accum_steps"], r["micro_batch"], r["batch"]) for r in rows] == [(4, 2, 8),
                                                                           (1, 8, 8)]
  assert math.isclose(rows[0]["loss"], rows[1]["loss"], rel_tol=1e-5), rows
  assert rows[1]["step_vs_1"] == rows[1]["temp_vs_1"] == 1.0
  for r in rows:
    for key in ("compile_s", "step_s", "examples_per_s", "xla_total_gib", "xla_temp_gib",
                "step_vs_1", "temp_vs_1"):
      assert positive(r[key]), (key, r)
