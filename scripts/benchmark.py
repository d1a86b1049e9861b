"""Project benchmarks: one function per section, each printing a table of its figures.

  python scripts/benchmark.py                      # all sections
  python scripts/benchmark.py --only memory        # some sections (comma-separated)
  python scripts/benchmark.py --json figures.json  # also write the figures

Times are wall-clock seconds after compilation (median of --repeats runs, each ended by
`block_until_ready`). Memory: the device's peak bytes in use where the backend reports
it (GPU/TPU `memory_stats()`), and always XLA's compiled memory analysis
(argument + output + temp bytes of the jitted function).

To add a section: write `bench_<name>(args) -> list[dict]` (one dict per table row) and
register it in SECTIONS.
"""

import argparse
import json
import statistics
import sys
import time
from typing import Callable, Dict, List

import jax
import jax.numpy as jnp
import optax

Row = Dict[str, object]


# ----------------------------------------------------------------------------- helpers

def time_fn(fn: Callable, *args, repeats: int = 5) -> float:
  """Median wall time (s) of fn(*args) over `repeats` runs, after one warm-up run."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(max(1, repeats)):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def compile_timed(jitted, *args):
  """(compiled executable, compile seconds, XLA memory analysis) of jitted(*args).

  Call the returned executable (not `jitted`) so that the program compiles once."""
  t0 = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - t0, compiled_memory(compiled)


def time_carried(step: Callable, carry, *rest, repeats: int):
  """Median wall time (s) of `carry = step(carry, *rest)` (a step that donates its carry),
  after one warm-up run; returns (median seconds, last carry)."""
  carry = jax.block_until_ready(step(carry, *rest))
  times = []
  for _ in range(max(1, repeats)):
    t0 = time.perf_counter()
    carry = jax.block_until_ready(step(carry, *rest))
    times.append(time.perf_counter() - t0)
  return statistics.median(times), carry


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


def device_peak_mib() -> float:
  """Peak bytes in use on device 0 (MiB) where the backend reports it, else NaN."""
  stats = jax.devices()[0].memory_stats() if hasattr(jax.devices()[0], "memory_stats") else None
  if not stats or "peak_bytes_in_use" not in stats:
    return float("nan")
  return stats["peak_bytes_in_use"] / 2**20


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


# ----------------------------------------------------------------------------- memory

def bench_memory(args) -> List[Row]:
  """Fast-weight memory (nlmm_jax.models.fast_weights), forward + backward.

  Recurrent (lax.scan over tokens) vs chunked (C = --chunk_size), both rules, at
  T = --seq_len, 8 heads of 64 (d = 512), batch --batch; then a T sweep of the chunked
  form. Gradients w.r.t. q, k, v (and beta for delta) of <y, w>.
  """
  from nlmm_jax.models import fast_weights as fw

  b, h, e, c = args.batch, 8, 64, args.chunk_size

  def inputs(t):
    ks = jax.random.split(jax.random.PRNGKey(0), 5)
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    q = unit(jax.random.normal(ks[0], (b, h, t, e)))
    k = unit(jax.random.normal(ks[1], (b, h, t, e)))
    v = jax.random.normal(ks[2], (b, h, t, e))
    beta = jax.nn.sigmoid(jax.random.normal(ks[3], (b, h, t)))
    w = jax.random.normal(ks[4], (b, h, t, e))
    mask = jnp.ones((b, t), bool)
    return q, k, v, beta, mask, w

  def fwd_bwd(form, rule):
    def loss(q, k, v, beta, mask, w):
      y = fw.fast_weight_memory(q, k, v, beta, None, mask, rule=rule, form=form,
                                chunk_size=c)
      return jnp.sum(y * w)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))

  def measure(form, rule, t, repeats):
    args_t = inputs(t)
    fn, compile_s, mem = compile_timed(fwd_bwd(form, rule), *args_t)
    sec = time_fn(fn, *args_t, repeats=repeats)
    return dict(form=form, rule=rule, T=t, B=b, H=h, e=e,
                C=c if form == "chunked" else "-", compile_s=compile_s, fwd_bwd_s=sec,
                tok_per_s=b * t / sec, xla_total_mib=mem.get("total_mib", float("nan")),
                xla_temp_mib=mem.get("temp_mib", float("nan")),
                device_peak_mib=device_peak_mib())

  rows = []
  t = args.seq_len
  for rule in ("hebbian", "delta"):
    rec = measure("recurrent", rule, t, max(1, args.repeats // 2))
    chk = measure("chunked", rule, t, args.repeats)
    ratio = rec["fwd_bwd_s"] / chk["fwd_bwd_s"]
    rec["rec/chunked"] = ratio
    chk["rec/chunked"] = ratio
    rows += [rec, chk]
  print_table(f"memory: recurrent vs chunked, fwd+bwd, T={t}, d={h * e}, batch={b} "
              f"[{jax.devices()[0].platform}]", rows)

  sweep = []
  for rule in ("hebbian", "delta"):
    for t in args.sweep:
      r = measure("chunked", rule, t, args.repeats)
      r["rec/chunked"] = float("nan")
      sweep.append(r)
  print_table(f"memory: chunked T sweep (C={c}) [{jax.devices()[0].platform}]", sweep)
  return rows + sweep


# ----------------------------------------------------------------------------- optim

def bench_optim(args) -> List[Row]:
  """One optimizer step (update + apply_updates, params and state donated) by optimizer.

  The parameter tree is the --optim_config model's (`nlmm.abstract_params`, via
  jax.eval_shape of the model init), filled with random values. Every label (default and
  the CMS levels, with their configured update_every) uses the optimizer of the row, as
  built by `levels.build_optimizer`. Random gradients, fixed across steps.
  """
  from nlmm_jax import config_lib
  from nlmm_jax.models import nlmm
  from nlmm_jax.optim import levels

  base = config_lib.load_config(args.optim_config)
  abstract = nlmm.abstract_params(base)
  n_params = nlmm.param_count(abstract)
  leaves, treedef = jax.tree.flatten(abstract)

  @jax.jit
  def random_tree(key, scale):
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten([scale * jax.random.normal(k, x.shape, x.dtype)
                              for k, x in zip(keys, leaves)])

  params = random_tree(jax.random.PRNGKey(0), 0.02)
  grads = random_tree(jax.random.PRNGKey(1), 1e-3)
  mib = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)) / 2**20

  rows = []
  for name in ("adamw", "dmgd", "anderson"):
    cfg = config_lib.load_config(args.optim_config)
    cfg.optim.optimizer = name
    for level in cfg.model.cms.levels.values():
      level.optimizer = name
    opt = levels.build_optimizer(cfg)
    state = jax.jit(opt.init)(params)

    def step(carry, g):
      p, s = carry
      u, s = opt.update(g, s, p)
      return optax.apply_updates(p, u), s

    step, compile_s, mem = compile_timed(jax.jit(step, donate_argnums=0), (params, state),
                                         grads)
    sec, (params, state) = time_carried(step, (params, state), grads, repeats=args.repeats)
    rows.append(dict(optimizer=name, params_m=n_params / 1e6, state_mib=mib(state),
                     compile_s=compile_s, ms_per_step=1e3 * sec,
                     xla_temp_mib=mem.get("temp_mib", float("nan"))))
    del state
  for r in rows:
    r["vs_adamw"] = r["ms_per_step"] / rows[0]["ms_per_step"]
  print_table(f"optim: one step on the {args.optim_config} parameter tree "
              f"({n_params / 1e6:.1f}M params) [{jax.devices()[0].platform}]", rows)
  return rows


# ----------------------------------------------------------------------------- model

def bench_model(args) -> List[Row]:
  """The whole jitted train step (forward, backward, optimizer) of a config's model.

  Default: `small` at the Flickr8k shapes of design section 1 (77 tokens, 224 px images in
  8 px patches = 784 patches, 400 log-mel frames), global batch --model_batch, on all
  local devices (data-parallel mesh, as in training). Random inputs with full-length masks.
  Examples/s after compilation; memory: XLA's compiled analysis of the step (params,
  optimizer state, batch, activations), the device's peak where reported, and the
  process's peak resident set (CPU).
  """
  import resource

  import numpy as np
  from nlmm_jax import config_lib
  from nlmm_jax import train
  from nlmm_jax.models import nlmm
  from nlmm_jax.optim import levels

  cfg = config_lib.load_config(args.model_config, args.model_overrides)
  model = nlmm.build_model(cfg.model, cfg.loss)
  tx = levels.build_optimizer(cfg)
  mesh = train.make_mesh(cfg)
  rng = np.random.default_rng(0)
  batch = nlmm.example_batch(cfg.model, args.model_batch)
  batch["image"] = rng.standard_normal(batch["image"].shape).astype(np.float32)
  batch["audio"] = rng.standard_normal(batch["audio"].shape).astype(np.float32)
  batch["text"] = rng.integers(1, cfg.model.vocab_size, batch["text"].shape).astype(np.int32)
  data_sharding = train.batch_sharding(mesh)
  batch = train.to_global(batch, data_sharding)

  init = train.make_init_fn(model, tx, cfg)
  abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
  state_sharding = train.state_sharding(abstract, mesh)
  state = jax.jit(init, out_shardings=state_sharding)(jax.random.PRNGKey(0))
  step = jax.jit(lambda s, b: train.train_step(s, b, model=model, tx=tx, loss_cfg=cfg.loss),
                 in_shardings=(state_sharding, data_sharding),
                 out_shardings=(state_sharding, None), donate_argnums=0)
  step, compile_s, mem = compile_timed(step, state, batch)
  finite = []

  def run(s, b):
    s, metrics = step(s, b)
    finite.append(metrics["finite"])
    return s

  sec, state = time_carried(run, state, batch, repeats=args.model_repeats)
  if not all(bool(f) for f in finite):
    raise FloatingPointError("the benchmarked train step produced a non-finite loss")
  n_params = nlmm.param_count(state.params)
  m = cfg.model
  row = dict(config=args.model_config, params_m=n_params / 1e6, batch=args.model_batch,
             text=m.max_text_len, patches=(m.image_size // m.patch_size) ** 2,
             frames=m.max_frames, form=m.memory.form, dtype=m.dtype,
             devices=len(jax.devices()), compile_s=compile_s, step_s=sec,
             examples_per_s=args.model_batch / sec,
             xla_total_gib=mem.get("total_mib", float("nan")) / 1024,
             device_peak_gib=device_peak_mib() / 1024,
             host_peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
  print_table(f"model: train step of {args.model_config} "
              f"[{jax.devices()[0].platform} x{len(jax.devices())}]", [row])
  return [row]


# ----------------------------------------------------------------------------- main

SECTIONS: Dict[str, Callable[[argparse.Namespace], List[Row]]] = {
    "memory": bench_memory,
    "optim": bench_optim,
    "model": bench_model,
}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--only", default="", help="comma-separated sections: "
                      + ", ".join(SECTIONS) + " (default: all)")
  parser.add_argument("--json", default="", help="also write the figures to this path")
  parser.add_argument("--repeats", type=int, default=5, help="timed runs per figure")
  # memory section
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq_len", type=int, default=1024)
  parser.add_argument("--chunk_size", type=int, default=64)
  parser.add_argument("--sweep", type=lambda s: [int(x) for x in s.split(",")],
                      default=[256, 512, 1024], help="T values of the chunked sweep")
  # optim section
  parser.add_argument("--optim_config", default="small",
                      help="config whose model parameter tree the optimizers step")
  # model section
  parser.add_argument("--model_config", default="small")
  parser.add_argument("--model_overrides", default="model.max_frames=400",
                      type=lambda s: [o for o in s.split(",") if o],
                      help="comma-separated config overrides (key=value)")
  parser.add_argument("--model_batch", type=int, default=8)
  parser.add_argument("--model_repeats", type=int, default=3)
  args = parser.parse_args(argv)

  names = [n.strip() for n in args.only.split(",") if n.strip()] or list(SECTIONS)
  unknown = [n for n in names if n not in SECTIONS]
  if unknown:
    parser.error(f"unknown section(s) {unknown}; available: {list(SECTIONS)}")

  print(f"jax {jax.__version__}, devices: {jax.devices()}")
  figures = {"meta": {"jax": jax.__version__, "platform": jax.devices()[0].platform,
                      "device": str(jax.devices()[0]), "argv": sys.argv[1:]}}
  for name in names:
    figures[name] = SECTIONS[name](args)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(figures, f, indent=2, default=str)
    print(f"\nfigures written to {args.json}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
