"""Project benchmarks: one function per section, each printing a table of its figures.

Sections (--only, comma-separated; default: all, in this order):
  peak    achieved GFLOP/s of a jitted n x n by n x n jnp matmul (--peak_n; 2 n^3 flops,
          default precision) in float32 and bfloat16: the machine's limit that every
          `pct_peak` column compares with. Runs first whenever another section runs.
  memory  fast-weight memory (models/fast_weights.py), forward + backward: recurrent vs
          chunked for both rules at T = --seq_len, then a T sweep of the chunked form.
  hope    the HOPE block's self-modifying memory (models/titans.py), forward + backward:
          recurrent vs chunked at each --hope_seq_lens.
  optim   one optimizer step on the parameter tree of --optim_config: level-routed adamw,
          dmgd, anderson (`levels.build_optimizer`, every label on that optimizer)
          and plain adamw after the config's global-norm clip, against plain
          `optax.adamw` (run first and again last; 1.0x: their mean),
          each averaged over a full period of the CMS levels (the slowest level's
          update_every: 16 steps with the default levels, 256 for small and medium;
          --optim_steps).
  optim_parts  where an optimizer step's time goes on this machine: an [n, n] float32
          result written in place against into a fresh buffer (a temporary's cost), and
          adamw, dmgd (defaults; hidden 2; phi_sample 1024; linear) and anderson on
          --parts_tensors tensors of --parts_shape (default 40 x [2048, 512]).
  optim_kernels  the kernels of one step of adamw, dmgd and anderson on the optim_parts
          tree, from a jax.profiler trace: per kind (XLA's fusion names without their
          number), kernels per step and milliseconds per step, the largest first.
  model   the whole jitted train step (forward, backward, optimizer) of each
          --model_config, for each --model_optimizer, with its ratio to the adamw step
          (adamw runs first and, with other optimizers, again last: the mean of both).
  accum   the train step of --accum_config at a large batch (--accum_batch) with
          train.accum_steps = --accum_steps (gradient caching, all negatives kept)
          against accum_steps = 1: step time and memory of each, and their ratios.
  input   examples/s delivered by the grain training pipeline from the feature cache of
          the generated demo corpus (under --data_dir) with 0 and 2 worker processes,
          against the demo train step's consumption at the same batch.

Flags:
  --only S1,S2            sections to run (peak is added when any other runs)
  --json PATH             also write every figure (and the run's settings) to PATH
  --quick                 every section at small sizes (QUICK: memory T=256 d=128
                          batch 4, optim on the demo tree, model on demo with 1 repeat,
                          accum on demo at batch 64 with 1 repeat, input 50 batches,
                          3 repeats); flags given explicitly still win
  --repeats N             timed runs per figure (median; default 5)
  --peak_n N              matmul size of `peak` (0: 8192 on a GPU, 2048 otherwise)
  --batch, --seq_len, --memory_width, --chunk_size, --sweep
                          memory: batch, T, d (heads of 64), chunk size C, T values of the sweep
  --hope_seq_lens A,B, --hope_width, --hope_batch, --hope_hidden, --hope_chunk_size
                          hope: T values (default 256,1024), d (heads of 64; 256), batch (4),
                          memory MLP hidden units (32), chunk size C (16)
  --optim_config NAME     optim: the config whose parameter tree is stepped (default small)
  --optim_steps N         optim: steps averaged (0: one full CMS period from the config)
  --optim_names A,B       optim: level-routed optimizers (default adamw,dmgd,anderson)
  --parts_shape A,B, --parts_tensors N, --parts_fresh_n N
                          optim_parts: the tensors stepped (40 x [2048, 512]), the size
                          of the written array (4096); steps: --optim_steps (0: 8)
  --kernels_top N         optim_kernels: kinds shown per optimizer (default 6)
  --model_config A,B      model: configs (default small,demo; on a GPU small,medium,demo)
  --own_shapes A,B        model: configs run at their own train.batch_size and shapes
                          (default demo); the others use --model_batch, --model_overrides
  --model_batch N, --model_overrides K=V,..., --model_repeats N
  --model_optimizer A,B   model: adamw, sgd, dmgd, anderson (adamw, the 1.0x, always runs)
  --accum_config NAME     accum: the config (default small)
  --accum_batch N         accum: global batch of both rows (default 128, small's own)
  --accum_steps K         accum: micro-batches of the accumulated row (default 8)
  --accum_overrides K=V,..., --accum_repeats N
                          accum: config overrides of both rows (default
                          model.max_frames=400, as `model`), timed steps (default 3)
  --data_dir DIR          input: demo corpus and feature cache go here (default data/bench)
  --input_batches N       input: batches timed per worker setting (default 200)
  --step_examples_per_s X input: the train step's examples/s, if not measured in this run

Examples:
  python scripts/benchmark.py --quick --json quick.json
  python scripts/benchmark.py --only memory --seq_len 2048
  python scripts/benchmark.py --only model --model_config demo --model_optimizer dmgd,anderson
  python scripts/benchmark.py --only accum --accum_batch 256 --accum_steps 16
  python scripts/benchmark.py --only input --step_examples_per_s 108

Times are wall-clock seconds after compilation (median of --repeats runs, each ended by
`block_until_ready`; optim: the mean over its steps). Memory: the device's peak bytes in
use where the backend reports it (GPU/TPU `memory_stats()`), and always XLA's compiled
memory analysis (argument + output + temp bytes of the jitted function).

FLOPs are XLA's count for the compiled program (`cost_analysis()`) of one device, so
GFLOP/s and pct_peak are per device. XLA counts the body of a while loop (lax.scan,
fori_loop) once, not once per iteration: in rows whose `loops` is > 0 the FLOP count,
GFLOP/s and pct_peak are lower bounds.

Host memory: run as a script, the benchmark re-executes itself once with glibc's huge-page
malloc tunable, as `python -m nlmm_jax.main` does (nlmm_jax/host_memory.py; the header
line and meta.hugepage_malloc say whether it is on; NLMM_HUGEPAGE_MALLOC=0 leaves it off).

Precision: on a GPU the memory and model sections run in float32 and bfloat16 (the
model's `model.dtype`; memory: q, k, v in bfloat16), each compared with the peak of its
dtype; on other backends in float32 only (peak still reports bfloat16).

To add a section: write `bench_<name>(args, done) -> list[dict]` (one dict per table row;
`done` holds the rows of the sections already run) and register it in SECTIONS.
"""

if __name__ == "__main__":
  # Before the heavy imports below, which the re-executed process would repeat: the
  # allocator `nlmm_jax.main` runs with (nlmm_jax/host_memory.py).
  from nlmm_jax import host_memory
  host_memory.reexec_with_hugepages()

import argparse
import glob
import gzip
import json
import math
import os
import re
import resource
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List

import jax
import jax.numpy as jnp
import numpy as np
import optax

Row = Dict[str, object]
Done = Dict[str, List[Row]]
NAN = float("nan")

QUICK = dict(repeats=3, batch=4, seq_len=256, memory_width=128, sweep=[128, 256],
             parts_tensors=8, parts_fresh_n=2048,
             hope_seq_lens=[256], hope_width=128,
             optim_config="demo", model_config="demo", model_repeats=1, input_batches=50,
             accum_config="demo", accum_batch=64, accum_overrides=[], accum_repeats=1)


# ----------------------------------------------------------------------------- helpers

def run_times(fn: Callable, *args, repeats: int) -> List[float]:
  """Wall times (s) of `repeats` runs of fn(*args), after one warm-up run."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(max(1, repeats)):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return times


def time_fn(fn: Callable, *args, repeats: int = 5) -> float:
  """Median wall time (s) of fn(*args) over `repeats` runs, after one warm-up run."""
  return statistics.median(run_times(fn, *args, repeats=repeats))


def carried_times(step: Callable, carry, *rest, steps: int):
  """Wall times (s) of `steps` runs of `carry = step(carry, *rest)` (a step that donates
  its carry), after one warm-up run; returns (times, last carry)."""
  carry = jax.block_until_ready(step(carry, *rest))
  times = []
  for _ in range(max(1, steps)):
    t0 = time.perf_counter()
    carry = jax.block_until_ready(step(carry, *rest))
    times.append(time.perf_counter() - t0)
  return times, carry


def compile_timed(jitted, *args):
  """(compiled executable, compile seconds, XLA memory analysis) of jitted(*args).

  Call the returned executable (not `jitted`) so that the program compiles once."""
  t0 = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - t0, compiled_memory(compiled)


def compiled_memory(compiled) -> Dict[str, float]:
  """XLA's memory analysis of a compiled function (MiB); {} (printed as nan) where the
  backend does not implement it."""
  try:
    analysis = compiled.memory_analysis()
  except NotImplementedError:
    return {}
  if analysis is None:
    return {}
  mib = lambda n: float(n) / 2**20
  arg = mib(getattr(analysis, "argument_size_in_bytes", 0))
  out = mib(getattr(analysis, "output_size_in_bytes", 0))
  temp = mib(getattr(analysis, "temp_size_in_bytes", 0))
  return {"arg_mib": arg, "out_mib": out, "temp_mib": temp, "total_mib": arg + out + temp}


def xla_flops(compiled) -> float:
  """XLA's FLOP count of a compiled program (summed over its modules), NaN if unknown.

  `cost_analysis()` returns a dict, or a list of dicts (one per module) in some versions."""
  try:
    analysis = compiled.cost_analysis()
  except NotImplementedError:
    return NAN
  if isinstance(analysis, dict):
    analysis = [analysis]
  flops = [float(a["flops"]) for a in analysis or [] if a and "flops" in a]
  return sum(flops) if flops else NAN


def while_loops(compiled) -> int:
  """Number of while loops in the compiled program (their bodies count once in FLOPs)."""
  try:
    return compiled.as_text().count(" while(")
  except Exception:  # pylint: disable=broad-except
    return -1


def peak_gflop_s(done: Done, dtype: str) -> float:
  """The `peak` section's GFLOP/s for `dtype` (NaN if peak did not run)."""
  rows = [r for r in done.get("peak", []) if r["dtype"] == dtype]
  return float(rows[0]["gflop_s"]) if rows else NAN


def throughput(compiled, seconds: float, dtype: str, done: Done) -> Row:
  """XLA FLOPs of one run, achieved GFLOP/s and its percentage of the dtype's peak."""
  flops = xla_flops(compiled)
  gflop_s = flops / seconds / 1e9
  return dict(xla_gflop=flops / 1e9, gflop_s=gflop_s,
              pct_peak=100 * gflop_s / peak_gflop_s(done, dtype), loops=while_loops(compiled))


def dtypes() -> tuple:
  """Model/memory precisions benchmarked on this backend."""
  return ("float32", "bfloat16") if jax.default_backend() == "gpu" else ("float32",)


def device_peak_mib() -> float:
  """Peak bytes in use on device 0 (MiB) where the backend reports it, else NaN."""
  stats = jax.devices()[0].memory_stats() if hasattr(jax.devices()[0], "memory_stats") else None
  if not stats or "peak_bytes_in_use" not in stats:
    return NAN
  return stats["peak_bytes_in_use"] / 2**20


def platform() -> str:
  return f"{jax.devices()[0].platform} x{len(jax.devices())}"


def print_table(title: str, rows: List[Row]) -> None:
  """Prints rows (dicts with the same keys) as an aligned text table."""
  print(f"\n== {title} ==")
  if not rows:
    print("(no rows)")
    return
  keys = list(rows[0].keys())

  def fmt(x):
    if isinstance(x, float):
      return "nan" if x != x else (f"{x:.4g}" if abs(x) < 1e4 else f"{x:.0f}")
    return str(x)

  cells = [[fmt(r.get(k, "")) for k in keys] for r in rows]
  widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
  print("  ".join(k.rjust(w) for k, w in zip(keys, widths)))
  for c in cells:
    print("  ".join(x.rjust(w) for x, w in zip(c, widths)))
  sys.stdout.flush()


def csv(cast=str):
  """argparse type: a comma-separated list."""
  return lambda s: [cast(x.strip()) for x in s.split(",") if x.strip()]


# ----------------------------------------------------------------------------- peak

def bench_peak(args, done: Done) -> List[Row]:
  """Achieved matmul GFLOP/s, float32 and bfloat16 (2 n^3 flops per n x n matmul)."""
  n = args.peak_n or (8192 if jax.default_backend() == "gpu" else 2048)
  rows = []
  for dtype in ("float32", "bfloat16"):
    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(ka, (n, n), dtype)
    b = jax.random.normal(kb, (n, n), dtype)
    matmul, _, _ = compile_timed(jax.jit(jnp.matmul), a, b)
    sec = time_fn(matmul, a, b, repeats=args.repeats)
    rows.append(dict(dtype=dtype, n=n, ms=1e3 * sec, gflop_s=2 * n**3 / sec / 1e9,
                     xla_gflop=xla_flops(matmul) / 1e9))
  print_table(f"peak: jitted {n}x{n} matmul [{platform()}]", rows)
  return rows


# ----------------------------------------------------------------------------- memory

def memory_inputs(b: int, h: int, t: int, e: int, dtype: str):
  """Unit-norm q, k; random v, beta; full mask; the cotangent w (q, k, v in `dtype`)."""
  ks = jax.random.split(jax.random.PRNGKey(0), 5)
  unit = lambda x: (x / jnp.linalg.norm(x, axis=-1, keepdims=True)).astype(dtype)
  q = unit(jax.random.normal(ks[0], (b, h, t, e)))
  k = unit(jax.random.normal(ks[1], (b, h, t, e)))
  v = jax.random.normal(ks[2], (b, h, t, e)).astype(dtype)
  beta = jax.nn.sigmoid(jax.random.normal(ks[3], (b, h, t)))
  w = jax.random.normal(ks[4], (b, h, t, e))
  return q, k, v, beta, jnp.ones((b, t), bool), w


def memory_fwd_bwd(form: str, rule: str, chunk_size: int):
  """jit of <y, w> and its gradients w.r.t. q, k, v and beta."""
  from nlmm_jax.models import fast_weights as fw

  def loss(q, k, v, beta, mask, w):
    y = fw.fast_weight_memory(q, k, v, beta, None, mask, rule=rule, form=form,
                              chunk_size=chunk_size)
    return jnp.sum(y * w)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))


def measure_memory(args, done: Done, form: str, rule: str, t: int, dtype: str,
                   repeats: int) -> Row:
  b, e, c = args.batch, 64, args.chunk_size
  h = max(1, args.memory_width // e)
  inputs = memory_inputs(b, h, t, e, dtype)
  fn, compile_s, mem = compile_timed(memory_fwd_bwd(form, rule, c), *inputs)
  sec = time_fn(fn, *inputs, repeats=repeats)
  return dict(form=form, rule=rule, dtype=dtype, T=t, B=b, H=h, e=e,
              C=c if form == "chunked" else "-", compile_s=compile_s, fwd_bwd_s=sec,
              tok_per_s=b * t / sec, **throughput(fn, sec, dtype, done),
              xla_total_mib=mem.get("total_mib", NAN), xla_temp_mib=mem.get("temp_mib", NAN),
              device_peak_mib=device_peak_mib())


def bench_memory(args, done: Done) -> List[Row]:
  """Fast-weight memory forward + backward, recurrent vs chunked, then a chunked T sweep.

  Heads of 64 (d = --memory_width), batch --batch, chunk size --chunk_size; gradients
  w.r.t. q, k, v and beta of <y, w>.
  """
  t, d = args.seq_len, args.memory_width
  rows, sweep, chunked = [], [], {}
  for dtype in dtypes():
    for rule in ("hebbian", "delta"):
      rec = measure_memory(args, done, "recurrent", rule, t, dtype, max(1, args.repeats // 2))
      chk = measure_memory(args, done, "chunked", rule, t, dtype, args.repeats)
      chunked[rule, t, dtype] = dict(chk)  # reused by the sweep at T = --seq_len
      rec["rec/chunked"] = chk["rec/chunked"] = rec["fwd_bwd_s"] / chk["fwd_bwd_s"]
      rows += [rec, chk]
    for rule in ("hebbian", "delta"):
      for ts in args.sweep:
        sweep.append(chunked.get((rule, ts, dtype)) or
                     measure_memory(args, done, "chunked", rule, ts, dtype, args.repeats))
  print_table(f"memory: recurrent vs chunked, fwd+bwd, T={t}, d={d}, batch={args.batch} "
              f"[{platform()}]", rows)
  if sweep:
    print_table(f"memory: chunked T sweep (C={args.chunk_size}) [{platform()}]", sweep)
  return rows + sweep


# ----------------------------------------------------------------------------- hope

def hope_fwd_bwd(module):
  """jit of <layer(x), w> and its gradients w.r.t. the parameters and x."""
  def loss(params, x, mask, w):
    return jnp.sum(module.apply({"params": params}, x, mask) * w)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def bench_hope(args, done: Done) -> List[Row]:
  """The HOPE block's self-modifying memory layer (models/titans.py), forward + backward,
  recurrent (one update per token) vs chunked (--hope_chunk_size), at each --hope_seq_lens.

  Width --hope_width in heads of 64, --hope_hidden units per memory MLP, batch
  --hope_batch, float32. The two forms compute different functions for C > 1 (the chunk's
  updates are applied at its end), so this compares cost only.
  """
  from nlmm_jax.models import titans
  d, b, c = args.hope_width, args.hope_batch, args.hope_chunk_size
  heads = max(1, d // 64)
  rows = []
  for t in args.hope_seq_lens:
    kx, kw = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(kx, (b, t, d))
    w = jax.random.normal(kw, (b, t, d))
    mask = jnp.ones((b, t), bool)
    pair = []
    for form in ("recurrent", "chunked"):
      module = titans.SelfModifyingMemory(width=d, heads=heads, hidden=args.hope_hidden,
                                          form=form, chunk_size=c)
      params = module.init(jax.random.PRNGKey(1), x[:, :8], mask[:, :8])["params"]
      fn, compile_s, mem = compile_timed(hope_fwd_bwd(module), params, x, mask, w)
      repeats = max(1, args.repeats // 2) if form == "recurrent" else args.repeats
      sec = time_fn(fn, params, x, mask, w, repeats=repeats)
      pair.append(dict(form=form, T=t, B=b, d=d, H=heads, hidden=args.hope_hidden,
                       C=c if form == "chunked" else "-", compile_s=compile_s,
                       fwd_bwd_s=sec, tok_per_s=b * t / sec,
                       **throughput(fn, sec, "float32", done),
                       xla_total_mib=mem.get("total_mib", NAN),
                       xla_temp_mib=mem.get("temp_mib", NAN)))
    for r in pair:
      r["rec/chunked"] = pair[0]["fwd_bwd_s"] / pair[1]["fwd_bwd_s"]
    rows += pair
  print_table(f"hope: self-modifying memory, recurrent vs chunked, fwd+bwd, d={d}, "
              f"batch={b} [{platform()}]", rows)
  return rows


# ----------------------------------------------------------------------------- optim

def use_optimizer(cfg, name: str):
  """Puts every label (default and each CMS level) of a config on optimizer `name`."""
  cfg.optim.optimizer = name
  for level in cfg.model.cms.levels.values():
    level.optimizer = name
  return cfg


def cms_period(cfg) -> int:
  """Steps after which every CMS level has updated a whole number of times."""
  return math.lcm(1, *(int(level.update_every) for level in cfg.model.cms.levels.values()))


def random_tree(abstract, seed: int, scale: float):
  """A tree of the shapes of `abstract` with normal(0, scale) values (drawn by numpy:
  jax.random would compile one generator per leaf)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda x: jnp.asarray(scale * rng.standard_normal(x.shape, np.float32), x.dtype),
      abstract)


def tree_mib(tree) -> float:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)) / 2**20


def optim_candidates(config_name: str,
                     names: List[str]) -> Dict[str, optax.GradientTransformation]:
  """Plain optax.adamw (the baseline: no labels, no MultiSteps, constant lr), the same
  after the config's global-norm clip (one chain: what the level-routed chains add
  besides the routing), and the level-routed optimizers of the config with every label
  on each of `names`."""
  from nlmm_jax import config_lib
  from nlmm_jax.optim import levels

  o = config_lib.load_config(config_name).optim
  adamw = optax.adamw(o.lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
  out = {"optax.adamw": adamw,
         "clip + optax.adamw": optax.chain(levels.clip_by_global_norm(o.clip_norm), adamw)}
  for name in names:
    base, _, variant = name.partition("-")   # "anderson-bf16": bfloat16 history rings
    cfg = use_optimizer(config_lib.load_config(config_name), base)
    if variant == "bf16" and base == "anderson":
      cfg.optim.anderson.history_dtype = "bfloat16"
    elif variant:
      raise ValueError(f"unknown optimizer variant {name!r} (only anderson-bf16)")
    out[f"levels:{name}"] = levels.build_optimizer(cfg)
  return out


def optimizer_step(opt: optax.GradientTransformation) -> Callable:
  """(params, state), grads -> (params, state): update + apply, jitted, carry donated."""
  def step(carry, g):
    p, s = carry
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s
  return jax.jit(step, donate_argnums=0)


def measure_optimizer(opt, params, grads, steps: int) -> Row:
  """Mean and max step time over `steps` steps (after one warm-up step)."""
  state = jax.jit(opt.init)(params)
  step, compile_s, mem = compile_timed(optimizer_step(opt), (params, state), grads)
  state_mib = tree_mib(state)
  times, _ = carried_times(step, (params, state), grads, steps=steps)
  return dict(state_mib=state_mib, compile_s=compile_s, steps=len(times),
              ms_per_step=1e3 * statistics.mean(times), ms_max=1e3 * max(times),
              xla_temp_mib=mem.get("temp_mib", NAN))


def bracketed(names: List[str]) -> List[str]:
  """The baseline (first name) first and, when others follow, again last: a drift of the
  machine within the process (its memory state, clocks) then shows as the difference
  of the two baseline rows, and `ratio_to_baseline` divides by their mean."""
  return names + [names[0]] if len(names) > 1 else list(names)


def ratio_to_baseline(rows: List[Row], key: str, is_baseline: Callable[[Row], bool],
                      out: str = "vs_adamw") -> None:
  """rows[i][out] = rows[i][key] / the mean of `key` over the baseline rows."""
  base = statistics.mean(r[key] for r in rows if is_baseline(r))
  for r in rows:
    r[out] = r[key] / base


def bench_optim(args, done: Done) -> List[Row]:
  """One optimizer step (update + apply_updates, params and state donated) per optimizer.

  The parameter tree is the --optim_config model's (`nlmm.abstract_params`), filled with
  random values; random gradients, fixed across steps. Each optimizer is averaged over
  --optim_steps steps (default: one full period of the CMS levels, so that the steps on
  which slower levels update are counted as often as in training). Plain adamw runs
  first and again last (`bracketed`); `vs_adamw` divides by the mean of its two rows.
  """
  from nlmm_jax import config_lib
  from nlmm_jax.models import nlmm

  cfg = config_lib.load_config(args.optim_config)
  abstract = nlmm.abstract_params(cfg)
  n_params = nlmm.param_count(abstract)
  steps = args.optim_steps or cms_period(cfg)
  rows = []
  candidates = optim_candidates(args.optim_config, args.optim_names)
  for name in bracketed(list(candidates)):
    params, grads = random_tree(abstract, 0, 0.02), random_tree(abstract, 1, 1e-3)
    rows.append(dict(optimizer=name, params_m=n_params / 1e6,
                     **measure_optimizer(candidates[name], params, grads, steps)))
    del params, grads
  ratio_to_baseline(rows, "ms_per_step", lambda r: r["optimizer"] == "optax.adamw")
  print_table(f"optim: one step on the {args.optim_config} parameter tree "
              f"({n_params / 1e6:.1f}M params), mean of {steps} steps [{platform()}]", rows)
  return rows


def fresh_vs_in_place(n: int, repeats: int) -> List[Row]:
  """-x on an [n, n] float32 array, written in place (input donated) or into a fresh
  buffer: what a temporary the size of the array costs the runtime's allocator."""
  x = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32))
  rows = []
  for mode in ("in_place", "fresh"):
    donate = (0,) if mode == "in_place" else ()
    f = jax.jit(lambda a: -a, donate_argnums=donate)
    if mode == "in_place":
      times, _ = carried_times(f, x + 0, steps=repeats)
      ms = 1e3 * statistics.median(times)
    else:
      ms = 1e3 * time_fn(f, x, repeats=repeats)
    rows.append(dict(part=f"write {n}x{n} f32, {mode}", mib=n * n * 4 / 2**20, ms=ms,
                     xla_temp_mib=NAN, vs_adamw=NAN))
  return rows


def optim_part_candidates() -> Dict[str, optax.GradientTransformation]:
  """adamw, then DMGD at its defaults and with one cost removed at a time, then Anderson."""
  from nlmm_jax.optim import anderson as anderson_lib
  from nlmm_jax.optim import dmgd as dmgd_lib
  return {"optax.adamw": optax.adamw(1e-3),
          "dmgd": dmgd_lib.dmgd(1e-3),
          "dmgd hidden=2": dmgd_lib.dmgd(1e-3, hidden=2),
          "dmgd phi_sample=1024": dmgd_lib.dmgd(1e-3, phi_sample=1024),
          "dmgd hidden=0 (linear)": dmgd_lib.dmgd(1e-3, hidden=0),
          "anderson": anderson_lib.anderson(1e-3)}


def bench_optim_parts(args, done: Done) -> List[Row]:
  """Where the optimizers' time goes: a fresh buffer against an in-place write of the same
  size, and each optimizer on --parts_tensors tensors of --parts_shape (no level routing),
  DMGD with one of its costs removed at a time."""
  del done
  rows = fresh_vs_in_place(args.parts_fresh_n, args.repeats)
  shape = tuple(args.parts_shape)
  tree = {f"w{i}": jnp.full(shape, 0.01, jnp.float32) for i in range(args.parts_tensors)}
  grads = random_tree(tree, 1, 1e-3)
  for name, opt in optim_part_candidates().items():
    r = measure_optimizer(opt, jax.tree.map(lambda x: x + 0, tree), grads, args.optim_steps or 8)
    rows.append(dict(part=f"{name}, {args.parts_tensors} x {list(shape)}",
                     mib=tree_mib(tree), ms=r["ms_per_step"], xla_temp_mib=r["xla_temp_mib"]))
  base = rows[2]["ms"]
  for r in rows[2:]:
    r["vs_adamw"] = r["ms"] / base
  print_table(f"optim_parts [{platform()}]", rows)
  return rows


# HLO instruction names ("add_divide_fusion.3", "copy.38"); the trace's other events are
# "ThunkExecutor::Execute", "PjitFunction(step)", "$api.py:..." or "end: ...".
KERNEL_NAME = re.compile(r"^[a-z][a-z0-9_.-]*$")
CONTROL_FLOW = frozenset({"cond", "conditional", "while", "call"})


def kernel_profile(step: Callable, carry, *rest, steps: int) -> Dict[str, List[float]]:
  """{kernel kind: [kernels per step, ms per step]} over `steps` runs of
  `carry = step(carry, *rest)`, from a jax.profiler trace (the trace viewer's
  `<host>.trace.json.gz`, Chrome trace events).

  XLA's CPU runtime records every thunk it executes (a fusion, a library reduction, a
  copy) under its HLO name; the kind is that name without its ".N" / ".clone" suffixes
  ("multiply_add_fusion", "ynn_fusion", "copy"). Control-flow thunks (a conditional, a
  while loop, a call) are left out: their time is that of the kernels inside them,
  which are counted themselves. The durations are summed, so a kind's time is what it
  occupies the executor, not wall time.
  """
  carry = jax.block_until_ready(step(carry, *rest))              # compiled and warm
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    try:
      for _ in range(steps):
        carry = jax.block_until_ready(step(carry, *rest))
    finally:
      jax.profiler.stop_trace()
    files = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    if not files:
      raise RuntimeError(f"jax.profiler wrote no trace.json.gz under {trace_dir}")
    with gzip.open(files[0], "rt") as f:
      trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  kinds: Dict[str, List[float]] = {}
  for e in events:
    name = e.get("name", "")
    if e.get("ph") != "X" or not KERNEL_NAME.match(name):
      continue
    kind_name = re.sub(r"(\.(\d+|clone))+$", "", name)
    if kind_name in CONTROL_FLOW:
      continue
    kind = kinds.setdefault(kind_name, [0.0, 0.0])
    kind[0] += 1 / steps
    kind[1] += e.get("dur", 0) / 1e3 / steps
  return kinds


def top_kinds(kinds: Dict[str, List[float]], top: int) -> List[Row]:
  """The `top` kinds of `kernel_profile` by time, then "(other kinds)" and "(total)"."""
  ranked = sorted(kinds.items(), key=lambda kv: -kv[1][1])
  summed = lambda items: [sum(n for _, (n, _) in items), sum(ms for _, (_, ms) in items)]
  total = summed(ranked)[1]
  shown = ranked[:top] + [("(other kinds)", summed(ranked[top:])),
                          ("(total)", summed(ranked))]
  return [dict(kernel=kind, per_step=n, ms_per_step=ms, share=ms / total if total else NAN)
          for kind, (n, ms) in shown]


def bench_optim_kernels(args, done: Done) -> List[Row]:
  """Which kernels an optimizer step runs and how long each kind takes: adamw, dmgd and
  anderson on the optim_parts tree (--parts_tensors x --parts_shape), profiled over
  --optim_steps steps (0: 4); the --kernels_top kinds of each, the rest, and the total.
  The runtime runs independent kernels on several threads at once, so a total is the
  executor's busy time, not the step's wall time (`optim_parts` has that): compare the
  shares within an optimizer, not the totals between them."""
  del done
  shape = tuple(args.parts_shape)
  tree = {f"w{i}": jnp.full(shape, 0.01, jnp.float32) for i in range(args.parts_tensors)}
  grads = random_tree(tree, 1, 1e-3)
  candidates = optim_part_candidates()
  rows = []
  for name in ("optax.adamw", "dmgd", "anderson"):
    opt = candidates[name]
    params = jax.tree.map(lambda x: x + 0, tree)
    kinds = kernel_profile(optimizer_step(opt), (params, jax.jit(opt.init)(params)), grads,
                           steps=args.optim_steps or 4)
    rows += [dict(optimizer=name, **r) for r in top_kinds(kinds, args.kernels_top)]
  print_table(f"optim_kernels: {args.parts_tensors} x {list(shape)}, mean of "
              f"{args.optim_steps or 4} steps [{platform()}]", rows)
  return rows


# ----------------------------------------------------------------------------- model

def model_setup(args, name: str, dtype: str, optimizer: str):
  """(config, global batch) of a model row: configs in --own_shapes at their own
  train.batch_size and shapes, the others with --model_overrides at --model_batch."""
  from nlmm_jax import config_lib

  own = name in args.own_shapes
  cfg = config_lib.load_config(name, [] if own else args.model_overrides)
  cfg.model.dtype = dtype
  use_optimizer(cfg, optimizer)
  return cfg, int(cfg.train.batch_size) if own else args.model_batch


def random_batch(cfg, batch_size: int) -> dict:
  """Random inputs of the config's shapes with full-length masks (numpy)."""
  from nlmm_jax.models import nlmm

  rng = np.random.default_rng(0)
  batch = nlmm.example_batch(cfg.model, batch_size)
  batch["image"] = rng.standard_normal(batch["image"].shape).astype(np.float32)
  batch["audio"] = rng.standard_normal(batch["audio"].shape).astype(np.float32)
  batch["text"] = rng.integers(1, cfg.model.vocab_size, batch["text"].shape).astype(np.int32)
  return batch


def run_train_step(cfg, batch_size: int, repeats: int) -> Row:
  """The job's jitted train step of `cfg` (`train.train_step`, cfg.train.accum_steps) on
  all local devices (data-parallel mesh, as in training) at `batch_size` random rows:
  the compiled step, compile seconds, XLA's memory analysis, the median step time over
  `repeats` steps and the loss of the first step (from the initial state)."""
  from nlmm_jax import config_lib
  from nlmm_jax import train
  from nlmm_jax.models import nlmm
  from nlmm_jax.optim import levels

  accum_steps = int(cfg.train.accum_steps)
  config_lib.check_accum_steps(batch_size, accum_steps, len(jax.devices()))
  model = nlmm.build_model(cfg.model, cfg.loss)
  tx = levels.build_optimizer(cfg)
  mesh = train.make_mesh(cfg)
  data_sharding = train.batch_sharding(mesh)
  batch = train.to_global(random_batch(cfg, batch_size), data_sharding)
  init = train.make_init_fn(model, tx, cfg)
  state_sharding = train.state_sharding(jax.eval_shape(init, jax.random.PRNGKey(0)), mesh)
  state = jax.jit(init, out_shardings=state_sharding)(jax.random.PRNGKey(0))
  n_params = nlmm.param_count(state.params)
  step = jax.jit(lambda s, b: train.train_step(s, b, model=model, tx=tx, loss_cfg=cfg.loss,
                                               accum_steps=accum_steps),
                 in_shardings=(state_sharding, data_sharding),
                 out_shardings=(state_sharding, None), donate_argnums=0)
  step, compile_s, mem = compile_timed(step, state, batch)
  metrics = []

  def run(s, b):
    s, m = step(s, b)
    metrics.append(m)
    return s

  times, state = carried_times(run, state, batch, steps=repeats)
  if not all(bool(m["finite"]) for m in metrics):
    raise FloatingPointError("the benchmarked train step produced a non-finite loss")
  return dict(compiled=step, params_m=n_params / 1e6, compile_s=compile_s,
              step_s=statistics.median(times), loss=float(metrics[0]["loss"]), mem=mem)


def measure_train_step(args, done: Done, name: str, dtype: str, optimizer: str) -> Row:
  """The jitted train step of config `name` on all local devices (data-parallel mesh,
  as in training): compile time, step time, examples/s, FLOPs and memory."""
  cfg, batch_size = model_setup(args, name, dtype, optimizer)
  r = run_train_step(cfg, batch_size, args.model_repeats)
  sec, mem = r["step_s"], r["mem"]
  m = cfg.model
  return dict(config=name, optimizer=optimizer, dtype=dtype, params_m=r["params_m"],
              batch=batch_size, text=m.max_text_len, patches=(m.image_size // m.patch_size) ** 2,
              frames=m.max_frames, form=m.memory.form, devices=len(jax.devices()),
              compile_s=r["compile_s"], step_s=sec, examples_per_s=batch_size / sec,
              **throughput(r["compiled"], sec, dtype, done),
              xla_total_gib=mem.get("total_mib", NAN) / 1024,
              device_peak_gib=device_peak_mib() / 1024,
              host_peak_rss_gib=host_peak_rss_gib())


def host_peak_rss_gib() -> float:
  """The process's peak resident set so far (GiB; Linux reports ru_maxrss in KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def bench_model(args, done: Done) -> List[Row]:
  """The whole jitted train step (forward, backward, optimizer) per config, dtype and
  optimizer; `vs_adamw`: step time over the adamw step of the same config and dtype
  (with other optimizers, adamw runs first and again last, `bracketed`, and the ratio
  divides by the mean of its two rows: the steps of one process drift with the host's
  memory state, and the first-measured optimizer would otherwise carry all of it; the
  price is a second compile and run of the adamw step).

  Random inputs with full-length masks. Memory: XLA's compiled analysis of the step
  (params, optimizer state, batch, activations), the device's peak where reported, and
  the process's peak resident set (CPU).
  """
  optimizers = ["adamw"] + [o for o in args.model_optimizer if o != "adamw"]
  rows = []
  for name in args.model_config:
    for dtype in dtypes():
      group = [measure_train_step(args, done, name, dtype, o) for o in bracketed(optimizers)]
      ratio_to_baseline(group, "step_s", lambda r: r["optimizer"] == "adamw")
      rows += group
      print_table(f"model: train step of {name}, {dtype} [{platform()}]", group)
  return rows


# ----------------------------------------------------------------------------- accum

def bench_accum(args, done: Done) -> List[Row]:
  """The train step of --accum_config at batch --accum_batch with train.accum_steps =
  --accum_steps (gradient caching: the same loss and gradient from micro-batches of
  batch / accum_steps rows, `train.compute_grads`) against accum_steps = 1 (the whole
  batch at once). --accum_overrides apply to both; random inputs, full-length masks.

  Memory as in `model`: XLA's compiled analysis (temp: the activations) and the device's
  peak where reported. The device peak and the process's peak RSS only grow within a
  process, so the accumulated step (expected smaller) runs first; the full-batch row's
  peak is then its own. `loss` is the first step's (same state and batch in both rows:
  they agree up to float rounding); `*_vs_1`: ratio to the accum_steps = 1 row.
  """
  from nlmm_jax import config_lib

  rows = []
  for dtype in dtypes():
    group = []
    for accum_steps in sorted({args.accum_steps, 1}, reverse=True):
      cfg = config_lib.load_config(args.accum_config, args.accum_overrides)
      cfg.model.dtype = dtype
      cfg.train.accum_steps = accum_steps
      r = run_train_step(cfg, args.accum_batch, args.accum_repeats)
      sec, mem = r["step_s"], r["mem"]
      group.append(dict(
          config=args.accum_config, dtype=dtype, batch=args.accum_batch,
          accum_steps=accum_steps, micro_batch=args.accum_batch // accum_steps,
          params_m=r["params_m"], devices=len(jax.devices()), compile_s=r["compile_s"],
          step_s=sec, examples_per_s=args.accum_batch / sec, loss=r["loss"],
          xla_total_gib=mem.get("total_mib", NAN) / 1024,
          xla_temp_gib=mem.get("temp_mib", NAN) / 1024,
          device_peak_gib=device_peak_mib() / 1024, host_peak_rss_gib=host_peak_rss_gib()))
    base = group[-1]
    for r in group:
      r["step_vs_1"] = r["step_s"] / base["step_s"]
      r["temp_vs_1"] = r["xla_temp_gib"] / base["xla_temp_gib"]
    print_table(f"accum: train step of {args.accum_config} at batch {args.accum_batch}, "
                f"accum_steps {args.accum_steps} vs 1, {dtype} [{platform()}]", group)
    rows += group
  return rows


# ----------------------------------------------------------------------------- input

def input_config(args):
  """The demo config with its corpus and feature cache under --data_dir."""
  from nlmm_jax import config_lib

  cfg = config_lib.load_config("demo")
  cfg.data.root = os.path.join(args.data_dir, "demo_corpus")
  cfg.data.cache_dir = os.path.join(args.data_dir, "cache")
  return cfg


def step_consumption(args, done: Done) -> float:
  """Examples/s of the demo float32 adamw train step: --step_examples_per_s, else the
  `model` section's row of this run, else measured now."""
  if args.step_examples_per_s > 0:
    return args.step_examples_per_s
  for r in done.get("model", []):   # the first adamw row (with others: one of two)
    if (r["config"], r["dtype"], r["optimizer"]) == ("demo", "float32", "adamw"):
      return float(r["examples_per_s"])
  demo_args = argparse.Namespace(**{**vars(args), "own_shapes": ["demo"]})
  row = measure_train_step(demo_args, done, "demo", "float32", "adamw")
  print_table(f"input: the consuming train step of demo [{platform()}]", [row])
  return float(row["examples_per_s"])


def pipeline_rate(handle, cfg, workers: int, batches: int) -> Row:
  """Seconds to the first batch, then examples/s over `batches` batches."""
  from nlmm_jax.data import pipeline

  cfg.data.num_workers = workers
  t0 = time.perf_counter()
  it = pipeline.train_iterator(handle, cfg, seed=0)
  next(it)
  first_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(batches):
    next(it)
  sec = time.perf_counter() - t0
  it.close()
  bs = int(cfg.train.batch_size)
  return dict(workers=workers, batch=bs, batches=batches, first_batch_s=first_s,
              ms_per_batch=1e3 * sec / batches, examples_per_s=batches * bs / sec)


def bench_input(args, done: Done) -> List[Row]:
  """Examples/s of the grain training pipeline (demo config, feature cache under
  --data_dir, built on the first run) with 0 and 2 workers, against the train step.

  `input/step` > 1: the pipeline alone outruns the step (measured apart: in training
  both share the host's cores).
  """
  from absl import flags
  from nlmm_jax.data import pipeline

  flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
  cfg = input_config(args)
  t0 = time.perf_counter()
  handle = pipeline.prepare(cfg)
  prepare_s = time.perf_counter() - t0
  consumption = step_consumption(args, done)
  rows = []
  for workers in (0, 2):
    row = dict(config="demo", **pipeline_rate(handle, cfg, workers, args.input_batches))
    row.update(step_examples_per_s=consumption,
               **{"input/step": row["examples_per_s"] / consumption},
               prepare_s=prepare_s)
    rows.append(row)
  print_table(f"input: grain pipeline from the feature cache ({args.data_dir}) vs the "
              f"train step [{platform()}]", rows)
  return rows


# ----------------------------------------------------------------------------- main

SECTIONS: Dict[str, Callable[[argparse.Namespace, Done], List[Row]]] = {
    "peak": bench_peak,
    "memory": bench_memory,
    "hope": bench_hope,
    "optim": bench_optim,
    "optim_parts": bench_optim_parts,
    "optim_kernels": bench_optim_kernels,
    "model": bench_model,
    "accum": bench_accum,
    "input": bench_input,
}


def default_model_configs() -> List[str]:
  return ["small", "medium", "demo"] if jax.default_backend() == "gpu" else ["small", "demo"]


def make_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--only", type=csv(), default=[], help="sections: " + ", ".join(SECTIONS))
  p.add_argument("--json", default="", help="also write the figures to this path")
  p.add_argument("--quick", action="store_true", help="every section at small sizes")
  p.add_argument("--repeats", type=int, default=5, help="timed runs per figure")
  p.add_argument("--peak_n", type=int, default=0, help="0: 8192 on a GPU, else 2048")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq_len", type=int, default=1024)
  p.add_argument("--memory_width", type=int, default=512, help="d; heads of 64")
  p.add_argument("--chunk_size", type=int, default=64)
  p.add_argument("--sweep", type=csv(int), default=[256, 512, 1024])
  p.add_argument("--hope_seq_lens", type=csv(int), default=[256, 1024])
  p.add_argument("--hope_width", type=int, default=256, help="d; heads of 64")
  p.add_argument("--hope_batch", type=int, default=4)
  p.add_argument("--hope_hidden", type=int, default=32)
  p.add_argument("--hope_chunk_size", type=int, default=16)
  p.add_argument("--optim_config", default="small")
  p.add_argument("--optim_steps", type=int, default=0, help="0: one full CMS period")
  p.add_argument("--optim_names", type=csv(),
                 default=["adamw", "dmgd", "anderson", "anderson-bf16"])
  p.add_argument("--parts_shape", type=csv(int), default=[2048, 512])
  p.add_argument("--parts_tensors", type=int, default=40)
  p.add_argument("--parts_fresh_n", type=int, default=4096)
  p.add_argument("--kernels_top", type=int, default=6)
  p.add_argument("--model_config", type=csv(), default=default_model_configs())
  p.add_argument("--own_shapes", type=csv(), default=["demo"])
  p.add_argument("--model_overrides", type=csv(), default=["model.max_frames=400"])
  p.add_argument("--model_batch", type=int, default=8)
  p.add_argument("--model_repeats", type=int, default=3)
  p.add_argument("--model_optimizer", type=csv(), default=["adamw"])
  p.add_argument("--accum_config", default="small")
  p.add_argument("--accum_batch", type=int, default=128, help="global batch of both rows")
  p.add_argument("--accum_steps", type=int, default=8)
  p.add_argument("--accum_overrides", type=csv(), default=["model.max_frames=400"])
  p.add_argument("--accum_repeats", type=int, default=3)
  p.add_argument("--data_dir", default="data/bench")
  p.add_argument("--input_batches", type=int, default=200)
  p.add_argument("--step_examples_per_s", type=float, default=0.0)
  return p


def parse_args(argv=None) -> argparse.Namespace:
  """Parsed flags; with --quick, QUICK replaces the defaults (explicit flags still win)."""
  parser = make_parser()
  args = parser.parse_args(argv)
  if args.quick:
    parser.set_defaults(**QUICK)
    args = parser.parse_args(argv)
  unknown = [n for n in args.only if n not in SECTIONS]
  if unknown:
    parser.error(f"unknown section(s) {unknown}; available: {list(SECTIONS)}")
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  names = [n for n in SECTIONS if n in (args.only or SECTIONS)]
  if names and "peak" not in names:
    names.insert(0, "peak")
  from nlmm_jax import host_memory
  huge = host_memory.hugepages_on()
  print(f"jax {jax.__version__}, devices: {jax.devices()}, host malloc huge pages: {huge}")
  figures = {"meta": {"jax": jax.__version__, "hugepage_malloc": huge,
                      "platform": jax.devices()[0].platform,
                      "device": str(jax.devices()[0]), "devices": len(jax.devices()),
                      "argv": list(sys.argv[1:] if argv is None else argv),
                      "settings": vars(args)}}
  done: Done = {}
  for name in names:
    t0 = time.perf_counter()
    done[name] = SECTIONS[name](args, done)
    print(f"[{name}: {time.perf_counter() - t0:.0f} s]")
  figures.update(done)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(figures, f, indent=2, default=str)
    print(f"\nfigures written to {args.json}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
