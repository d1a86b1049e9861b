"""`train_and_evaluate(config, workdir)`: the training loop and nothing else.

One jitted train step over a `Mesh(('data', 'fsdp'))`: the global batch is sharded over
every device of every host, parameters and optimizer state are replicated (fsdp=1) or
sharded over the `fsdp` axis; the contrastive loss is computed on the global arrays, so
negatives come from the whole global batch and XLA inserts the collectives.
With `train.accum_steps` > 1 the step computes the same gradient by gradient caching over
micro-batches (`compute_grads`), so the negatives are still the whole global batch.
"""

import functools
import itertools
import json
import os
import signal
import time
from typing import Any, Callable

from absl import logging
import flax
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import optax

from nlmm_jax import checkpointing
from nlmm_jax import config_lib
from nlmm_jax import evaluate
from nlmm_jax import logging as nl_logging
from nlmm_jax import losses
from nlmm_jax.data import pipeline
from nlmm_jax.data import tokenizer as tokenizer_lib
from nlmm_jax.models import nlmm
from nlmm_jax.models import ttt as ttt_lib
from nlmm_jax.optim import levels

MODALITY_KEYS = {"image": ("image",), "text": ("text", "text_mask"),
                 "audio": ("audio", "audio_mask")}


@flax.struct.dataclass
class TrainState:
  step: jax.Array          # [] int32: optimizer steps taken
  params: Any
  opt_state: Any           # every CMS level's MultiSteps counters live here
  rng: jax.Array           # [2] uint32 raw PRNG key (checkpointable)


class NonFiniteLossError(FloatingPointError):
  pass


# ----------------------------------------------------------------------------- mesh


def make_mesh(config: ml_collections.ConfigDict, devices=None) -> jax.sharding.Mesh:
  """('data', 'fsdp') mesh over `devices` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else list(devices)
  n = len(devices)
  fsdp = int(config.train.mesh.fsdp)
  data = int(config.train.mesh.data)
  if fsdp < 1 or n % fsdp:
    raise ValueError(f"train.mesh.fsdp={fsdp} must divide the device count {n}")
  if data == -1:
    data = n // fsdp
  if data * fsdp != n:
    raise ValueError(f"train.mesh.data * train.mesh.fsdp = {data}*{fsdp} != {n} devices")
  auto = jax.sharding.AxisType.Auto
  return jax.make_mesh((data, fsdp), ("data", "fsdp"), axis_types=(auto, auto),
                       devices=devices)


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(("data", "fsdp")))


def state_sharding(abstract_tree: Any, mesh) -> Any:
  """Replicated, or each array's largest `fsdp`-divisible dimension sharded on `fsdp`."""
  n = mesh.shape["fsdp"]

  def leaf(x):
    if n > 1 and getattr(x, "ndim", 0) > 0:
      for dim in sorted(range(x.ndim), key=lambda i: -x.shape[i]):
        if x.shape[dim] % n == 0:
          spec = [None] * x.ndim
          spec[dim] = "fsdp"
          return NamedSharding(mesh, P(*spec))
    return NamedSharding(mesh, P())
  return jax.tree.map(leaf, abstract_tree)


def to_global(batch: dict, sharding: NamedSharding) -> dict:
  """Host-local numpy batch -> global jax.Arrays (each process holds its rows)."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


# ----------------------------------------------------------------------------- model


def make_init_fn(model, tx, config) -> Callable[[jax.Array], TrainState]:
  def init(rng):
    rng, init_rng = jax.random.split(rng)
    params = model.init(init_rng, nlmm.example_batch(config.model))["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), rng=rng)
  return init


def _full_batch_grads(params, batch, dropout_rng, *, model, loss_cfg):
  """(loss, metrics, logit_scale, grads): one forward and backward over the whole batch."""
  def loss_fn(params):
    embeddings, logit_scale = model.apply({"params": params}, batch, train=True,
                                          rngs={"dropout": dropout_rng})
    loss, metrics = losses.contrastive_loss(embeddings, logit_scale, loss_cfg,
                                            logit_bias=params.get("logit_bias"))
    return loss, (metrics, logit_scale)

  (loss, (metrics, logit_scale)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return loss, metrics, logit_scale, grads


def micro_batches(x: jax.Array, k: int) -> jax.Array:
  """[B, ...] -> [k, B/k, ...]: micro-batch j holds rows j, j + k, j + 2k, ...

  Strided, not contiguous: the batch is sharded over the devices in contiguous row
  blocks, so with B/k divisible by the device count every micro-batch takes B/(k n)
  rows from each device's own block (no data moves between devices)."""
  return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)


def from_micro_batches(x: jax.Array) -> jax.Array:
  """[k, B/k, ...] -> [B, ...]: the inverse of `micro_batches` (the batch's row order)."""
  return jnp.swapaxes(x, 0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _cached_grads(params, batch, dropout_rng, *, model, loss_cfg, accum_steps: int):
  """(loss, metrics, logit_scale, grads) by gradient caching over `accum_steps`
  micro-batches (Gao, Zhang, Han, Callan 2021, "Scaling Deep Contrastive Learning Batch
  Size under Memory Limited Setup", arXiv:2101.06983: the gradient cache).

  (a) embed every micro-batch without gradient (`lax.map`); (b) the contrastive loss of
  the whole batch on those embeddings (every other row of the batch a negative), with
  its gradient w.r.t. the embeddings and the loss's own parameters (log_logit_scale,
  logit_bias); (c) per micro-batch, a second forward under `jax.vjp` pulls the cached
  embedding gradient back to the parameters, summed over micro-batches (`lax.scan`).
  Each row's embedding depends on that row's inputs alone, so by the chain rule, without
  dropout, loss, metrics and logit_scale equal `_full_batch_grads(params, batch, ...)`'s
  and grads equal its grads up to float rounding (tests/test_accumulation.py: within
  1e-5 relative over all parameters, 1e-4 per parameter). Activations are held for one micro-batch at a time; the cost
  is one extra forward per micro-batch. Micro-batch j draws dropout from
  fold_in(dropout_rng, j) in both passes, so with dropout the masks differ from the
  full-batch step's (another sample of the same objective).
  """
  k = accum_steps
  index = jnp.arange(k)                                              # [k]
  parts = jax.tree.map(lambda x: micro_batches(x, k), batch)         # {key: [k, B/k, ...]}

  def embed(params, part, j):
    embeddings, _ = model.apply({"params": params}, part, train=True,
                                rngs={"dropout": jax.random.fold_in(dropout_rng, j)})
    return embeddings                                                # {m: [B/k, E]}

  frozen = jax.lax.stop_gradient(params)
  cached = jax.lax.map(lambda xs: embed(frozen, *xs), (parts, index))  # {m: [k, B/k, E]}
  cached = jax.tree.map(from_micro_batches, cached)                  # {m: [B, E]}

  def loss_fn(params, embeddings):
    logit_scale = model.apply({"params": params}, method=nlmm.NLMM.scale)
    loss, metrics = losses.contrastive_loss(embeddings, logit_scale, loss_cfg,
                                            logit_bias=params.get("logit_bias"))
    return loss, (metrics, logit_scale)

  (loss, (metrics, logit_scale)), (grads, emb_grads) = jax.value_and_grad(
      loss_fn, argnums=(0, 1), has_aux=True)(params, cached)       # emb_grads {m: [B, E]}
  cotangents = jax.tree.map(lambda g: micro_batches(g, k), emb_grads)  # {m: [k, B/k, E]}

  def backward(acc, xs):
    part, j, cotangent = xs
    _, pullback = jax.vjp(lambda p: embed(p, part, j), params)
    return jax.tree.map(jnp.add, acc, pullback(cotangent)[0]), None

  grads, _ = jax.lax.scan(backward, grads, (parts, index, cotangents))
  return loss, metrics, logit_scale, grads


def compute_grads(params, batch: dict, dropout_rng, *, model, loss_cfg, accum_steps: int = 1):
  """(loss, metrics, logit_scale, grads) of the contrastive loss over the whole batch.

  accum_steps == 1: one forward and backward. accum_steps > 1: gradient caching
  (`_cached_grads`), the same loss and gradient with one micro-batch's activations.
  """
  rows = jax.tree.leaves(batch)[0].shape[0]
  if accum_steps < 1 or rows % accum_steps:
    raise ValueError(f"accum_steps={accum_steps} must be >= 1 and divide the batch's "
                     f"{rows} rows")
  fn = _full_batch_grads if accum_steps == 1 else functools.partial(
      _cached_grads, accum_steps=accum_steps)
  return fn(params, batch, dropout_rng, model=model, loss_cfg=loss_cfg)


def train_step(state: TrainState, batch: dict, *, model, tx, loss_cfg, accum_steps: int = 1):
  """One optimizer step on the gradient of the whole batch (`compute_grads`; with
  accum_steps > 1 by gradient caching over micro-batches). A non-finite loss or gradient
  leaves the state unchanged."""
  rng, dropout_rng = jax.random.split(state.rng)
  loss, metrics, logit_scale, grads = compute_grads(
      state.params, batch, dropout_rng, model=model, loss_cfg=loss_cfg,
      accum_steps=accum_steps)
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

  def update(params, opt_state):
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    params = nlmm.clip_logit_scale(params, loss_cfg.max_logit_scale)  # after the update
    return params, opt_state

  # The update runs only when finite; otherwise params and optimizer state pass through
  # unchanged (a select between new and old state would read both and write a copy).
  params, opt_state = jax.lax.cond(finite, update, lambda p, o: (p, o), state.params,
                                   state.opt_state)
  new = TrainState(step=jnp.where(finite, state.step + 1, state.step), params=params,
                   opt_state=opt_state, rng=jnp.where(finite, rng, state.rng))
  metrics = dict(metrics)
  metrics.update({"loss": loss, "grad_norm": grad_norm,
                  "param_norm": optax.global_norm(params),
                  "temperature": 1.0 / logit_scale, "finite": finite})
  return new, metrics


# ----------------------------------------------------------------------------- eval


class Evaluator:
  """Embeds each modality of a split on its own and scores the retrieval protocol.

  With `config.ttt.steps` > 0 every item is embedded with test-time training
  (`models/ttt.py`: per-item key adapters fitted on its own tokens; params untouched).
  """

  def __init__(self, model, mesh, params_sharding, config):
    self.config = config
    self.mesh = mesh
    self.sharding = batch_sharding(mesh)
    replicated = NamedSharding(mesh, P())
    steps, lr, rank = ttt_lib.settings(config) if "ttt" in config else (0, 0.0, 0)
    self._embed = {}
    for modality, keys in MODALITY_KEYS.items():
      def fn(params, inputs, modality=modality):
        return ttt_lib.embed(model, params, inputs, modality, steps=steps, lr=lr, rank=rank)
      self._embed[modality] = jax.jit(
          fn, in_shardings=(params_sharding, {k: self.sharding for k in keys}),
          out_shardings=replicated)

  def _local_rows(self, batch: dict, keys) -> dict:
    """Every process loads the same eval batch and contributes its own rows."""
    n, i = jax.process_count(), jax.process_index()
    rows = len(batch[keys[0]]) // n
    return {k: np.asarray(batch[k])[i * rows:(i + 1) * rows] for k in keys}

  def __call__(self, params, data_handle, split: str) -> dict:
    """Metrics of `split`; for a mixture, each corpus's under "per_corpus" and their
    unweighted mean at top level (`evaluate.mean_over_corpora`)."""
    if isinstance(data_handle, pipeline.MixtureHandle):
      return evaluate.mean_over_corpora({c.label: self._one(params, c.handle, split)
                                         for c in data_handle.components})
    return self._one(params, data_handle, split)

  def _one(self, params, data_handle: pipeline.DataHandle, split: str) -> dict:
    iters = pipeline.eval_iterators(data_handle, self.config, split)
    sources = {"image": iters.images, "text": iters.captions}
    if getattr(data_handle, "has_audio", False):
      sources["audio"] = iters.audio

    def embed_fn(modality, batch):
      keys = MODALITY_KEYS[modality]
      inputs = to_global(self._local_rows(batch, keys), self.sharding)
      return np.asarray(self._embed[modality](params, inputs))

    embs, ids = evaluate.embed_all(embed_fn, sources)
    return evaluate.retrieval_metrics(embs, ids)


# ----------------------------------------------------------------------------- loop


def _check_config(config, steps_per_epoch: int) -> int:
  n = jax.device_count()
  if config.train.batch_size % n:
    raise ValueError(f"train.batch_size={config.train.batch_size} must be divisible by "
                     f"the {n} devices")
  config_lib.check_accum_steps(int(config.train.batch_size),
                               int(config.train.accum_steps), n)
  if config.data.eval_batch_size % n:
    raise ValueError(f"data.eval_batch_size={config.data.eval_batch_size} must be "
                     f"divisible by the {n} devices")
  total = (config.train.epochs * steps_per_epoch if config.train.epochs > 0
           else config.train.total_steps)
  if total <= 0:
    raise ValueError("set train.total_steps > 0 or train.epochs > 0")
  return int(total)


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, key + "."))
    elif isinstance(v, (int, float, str, bool)):
      out[key] = v
    else:
      out[key] = str(v)
  return out


def eval_scalars(split: str, metrics: dict) -> dict:
  """{"eval_<split>/<metric>": value}, and "eval_<split>/<corpus>/<metric>" for each
  corpus of a mixture's "per_corpus"."""
  out = {f"eval_{split}/{k}": v for k, v in metrics.items() if k != "per_corpus"}
  for label, per in metrics.get("per_corpus", {}).items():
    out.update({f"eval_{split}/{label}/{k}": v for k, v in per.items()})
  return out


class _Sigterm:
  """Turns SIGTERM into a flag the loop checks: save, then exit cleanly.

  One process only. With several, JAX's preemption service (started by
  `jax.distributed.initialize`) takes SIGTERM to any process: every process then sees
  `manager.reached_preemption(step)` at the same step, so all save together. A Python
  handler here would replace the service's.
  """

  def __init__(self):
    self.received = False
    self._previous = None

  def __enter__(self):
    if jax.process_count() > 1:
      return self
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. a notebook worker)
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint and stopping.")
    self.received = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


DATA_BARRIER_TIMEOUT_S = 6 * 3600  # processes > 0 wait this long for process 0's data
_BARRIER_IDS = itertools.count()     # a barrier's key is used once


def prepare_data(config: ml_collections.ConfigDict) -> pipeline.DataHandle:
  """`pipeline.prepare` in every process, process 0 first.

  Process 0 generates / indexes / caches while the others wait at a barrier; then they
  find the corpus and cache complete (a shared file system) or build their own copy (a
  disk per host). Concurrent writers into one folder would race.
  """
  if jax.process_count() == 1:
    return pipeline.prepare(config)
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  # A barrier of the coordination service (no device collective), with a timeout long
  # enough for building the Flickr8k cache on one host.
  barrier = ocp.multihost.get_barrier_sync_fn()
  data = pipeline.prepare(config) if jax.process_index() == 0 else None
  barrier(key=f"nlmm_jax_data_prepared_{next(_BARRIER_IDS)}",
          timeout_ms=DATA_BARRIER_TIMEOUT_S * 1000)
  return data if data is not None else pipeline.prepare(config)


def setup(config: ml_collections.ConfigDict, workdir: str, *, for_training: bool = True):
  """Data, model, optimizer, mesh, shardings and a freshly initialised state."""
  data = prepare_data(config)
  steps_per_epoch = pipeline.steps_per_epoch(data, config)
  total_steps = _check_config(config, steps_per_epoch)
  config = ml_collections.ConfigDict(config.to_dict())  # private, unlocked copy
  config.train.total_steps = total_steps
  if not data.has_audio:  # saved with the checkpoints: the audio tower is not trained
    config.data.use_audio = False
  mesh = make_mesh(config)
  model = nlmm.build_model(config.model, config.loss)
  tx = levels.build_optimizer(config)
  init_fn = make_init_fn(model, tx, config)
  rng = jax.random.PRNGKey(config.seed)
  abstract_state = jax.eval_shape(init_fn, rng)
  shardings = state_sharding(abstract_state, mesh)
  state = jax.jit(init_fn, out_shardings=shardings)(rng)
  return dict(config=config, data=data, mesh=mesh, model=model, tx=tx, state=state,
              shardings=shardings, total_steps=total_steps,
              steps_per_epoch=steps_per_epoch)


def check_same_data(workdir: str, step: int, config, data) -> None:
  """Raises ValueError when resuming `workdir` at `step` would read other data than the
  checkpoint was trained on: another tokenizer (the corpus's train captions, or
  model.vocab_size, changed: the trained embedding rows would get other words) or another
  data.mixture (the saved iterator position would index another stream)."""
  saved, _ = checkpointing.restore_items(checkpointing.checkpoint_dir(workdir), step,
                                         ("config", "tokenizer"), "resume")
  fix = (f"Restore the data and config it was trained with, or start a new workdir from "
         f"its weights with --config.init_from={workdir}")
  tok = tokenizer_lib.Tokenizer.from_json(saved["tokenizer"], "the checkpoint's tokenizer")
  if tok != data.tokenizer:
    raise ValueError(f"cannot resume {workdir} at step {step}: the tokenizer fitted on "
                     f"today's data ({data.tokenizer.vocab_size} ids) differs from the "
                     f"checkpoint's ({tok.vocab_size} ids), so the corpus's train captions "
                     f"or model.vocab_size changed. {fix}.")
  def plain(mixture):  # tuples -> lists, as the checkpoint's JSON holds them
    return json.loads(json.dumps(mixture or []))
  old = plain(saved["config"].get("data", {}).get("mixture"))
  new = plain(config.data.to_dict().get("mixture"))
  if old != new:
    raise ValueError(f"cannot resume {workdir} at step {step}: data.mixture differs from "
                     f"the checkpoint's ({old} then, {new} now), so the saved data position "
                     f"would index another stream. {fix}.")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains, evaluates on dev every `eval_every` steps and on test at the end.

  Restarting with the same workdir resumes from the latest checkpoint exactly (state,
  optimizer counters, RNG, data iterator). Returns the final test metrics.
  """
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  s = setup(config, workdir)
  config, data, mesh, model, tx, state, shardings, total_steps = (
      s["config"], s["data"], s["mesh"], s["model"], s["tx"], s["state"],
      s["shardings"], s["total_steps"])
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  logging.info("devices=%d (%s) processes=%d mesh=%s params=%s steps=%d (%d/epoch)",
               jax.device_count(), jax.devices()[0].platform, jax.process_count(),
               dict(mesh.shape), f"{n_params:,}", total_steps, s["steps_per_epoch"])

  b_sharding = batch_sharding(mesh)
  step_fn = jax.jit(
      functools.partial(train_step, model=model, tx=tx, loss_cfg=config.loss,
                        accum_steps=int(config.train.accum_steps)),
      in_shardings=(shardings, b_sharding), out_shardings=(shardings, None),
      donate_argnums=(0,))
  evaluator = Evaluator(model, mesh, shardings.params, config)
  train_iter = pipeline.train_iterator(data, config, seed=config.seed,
                                       process_index=jax.process_index(),
                                       process_count=jax.process_count())
  manager = checkpointing.make_manager(workdir, config)
  latest = manager.latest_step()
  if latest is not None:
    check_same_data(workdir, latest, config, data)
    state, train_iter = checkpointing.restore(manager, latest, state, train_iter)
    logging.info("Resumed from %s step %d", checkpointing.checkpoint_dir(workdir), latest)
    if is_main:
      for name in (nl_logging.TRAIN_JSONL, nl_logging.EVAL_JSONL):
        nl_logging.truncate_jsonl(os.path.join(workdir, name), latest)
  elif config.init_from:
    params, src_step = checkpointing.restore_params(config.init_from, state.params)
    state = state.replace(params=params)
    logging.info("New run initialised from %s (step %d)", config.init_from, src_step)
  step = int(state.step)

  writer = nl_logging.create_writer(workdir, is_main)
  if step == 0:
    writer.write_hparams(_flatten(config.to_dict()))
  from clu import periodic_actions  # pylint: disable=g-import-not-at-top
  report = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                           every_secs=None, every_steps=config.train.log_every)
  bar = None
  if is_main and config.train.progress_bar:
    from tqdm import auto as tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm.tqdm(total=total_steps, initial=step, desc="train", unit="step",
                    dynamic_ncols=True)

  pending: list[tuple[int, dict]] = []
  t_last, examples = time.time(), 0

  def last_good() -> str:
    manager.wait_until_finished()
    good = manager.latest_step()
    return (f"step {good} in {checkpointing.checkpoint_dir(workdir)} (rerunning with this "
            "workdir resumes from it)" if good is not None else
            "none yet (the run had not saved one)")

  def flush_metrics(upto_step: int):
    nonlocal t_last, examples
    if not pending:
      return
    fetched = jax.device_get([m for _, m in pending])
    bad = [st for (st, _), m in zip(pending, fetched) if not bool(m["finite"])]
    if bad:
      raise NonFiniteLossError(
          f"non-finite loss or gradient at step {bad[0]}; that update was not applied. "
          f"Last good checkpoint: {last_good()}. Lower optim.lr, raise optim.warmup_steps or "
          "check the data before restarting.")
    scalars = {}
    for key in fetched[0]:
      if key == "finite":
        continue
      name = key if "/" in key else f"train/{key}"
      name = name if name.startswith("train/") else f"train/{name}"
      scalars[name] = float(np.mean([m[key] for m in fetched]))
    dt = time.time() - t_last
    scalars["train/examples_per_sec"] = examples / max(dt, 1e-9)
    for label, lr in levels.learning_rates(config, upto_step).items():
      scalars[f"lr/{label}"] = float(lr)
    writer.write_scalars(upto_step, scalars)
    if is_main:
      nl_logging.append_jsonl(os.path.join(workdir, nl_logging.TRAIN_JSONL),
                              {"step": upto_step, **scalars})
      if bar is not None:
        bar.set_postfix(loss=f"{scalars['train/loss']:.3f}")
    pending.clear()
    t_last, examples = time.time(), 0

  def run_eval(split: str, params, at_step: int) -> dict:
    t0 = time.time()
    try:
      metrics = evaluator(params, data, split)
    except evaluate.NonFiniteEmbeddingError as e:
      raise evaluate.NonFiniteEmbeddingError(
          f"eval {split} at step {at_step}: {e} This state was not saved. Last good "
          f"checkpoint: {last_good()}.") from None
    metrics["eval_seconds"] = time.time() - t0
    writer.write_scalars(at_step, eval_scalars(split, metrics))
    if is_main:
      nl_logging.append_jsonl(os.path.join(workdir, nl_logging.EVAL_JSONL),
                              {"step": at_step, "split": split, **metrics})
      with open(os.path.join(workdir, f"eval_{split}.json"), "w") as f:
        json.dump({"step": at_step, **metrics}, f, indent=2)
    logging.info("eval %s step %d: mean_R@1=%.2f rsum_all=%.1f rsum_it=%.1f", split, at_step,
                 metrics["mean_R@1"], metrics["rsum_all"], metrics.get("rsum_it", float("nan")))
    return metrics

  try:  # on any error the metrics already computed still reach TensorBoard
    global_batch = config.train.batch_size
    with _Sigterm() as sigterm:
      while step < total_steps:
        batch = to_global(next(train_iter), b_sharding)
        state, metrics = step_fn(state, batch)
        step += 1
        examples += global_batch
        pending.append((step, metrics))
        report(step)
        if bar is not None:
          bar.update(1)
        last = step == total_steps
        if step % config.train.log_every == 0 or last:
          flush_metrics(step)
        if step % config.train.eval_every == 0 or last:
          flush_metrics(step)
          dev = run_eval("dev", state.params, step)
          if is_main:
            nl_logging.plot_progress(workdir)
          checkpointing.save(manager, step, state, train_iter, config,
                             tokenizer=data.tokenizer,
                             metrics={checkpointing.BEST_METRIC: dev[checkpointing.BEST_METRIC]})
        elif step % config.train.checkpoint_every == 0:
          flush_metrics(step)
          checkpointing.save(manager, step, state, train_iter, config,
                             tokenizer=data.tokenizer)
        preempted = sigterm.received or manager.reached_preemption(step)
        if preempted and not last:
          flush_metrics(step)
          if step not in manager.all_steps():
            checkpointing.save(manager, step, state, train_iter, config,
                               tokenizer=data.tokenizer)
          manager.wait_until_finished()
          writer.flush()
          logging.warning("Stopped at step %d after SIGTERM (a preemption notice); rerun the "
                          "same command to resume.", step)
          if bar is not None:
            bar.close()
          return {"stopped_at": step}
    if bar is not None:
      bar.close()
    manager.wait_until_finished()

    # Test with the best checkpoint by dev rsum_all (checkpointing.BEST_METRIC).
    best = manager.best_step() or step
    if best != step:
      restored, _ = checkpointing.restore(manager, best, state)
      params = restored.params
    else:
      params = state.params
    test = run_eval("test", params, step)
    test["best_step"] = best
    if is_main:
      with open(os.path.join(workdir, "eval_test.json"), "w") as f:
        json.dump({"step": step, "best_step": best, **test}, f, indent=2)
      nl_logging.plot_progress(workdir)
    writer.flush()
    manager.close()
    return test
  finally:
    writer.flush()


def ttt_suffix(config) -> str:
  """'' without test-time training, else e.g. '_ttt3_lr0.1_r4' (eval file names)."""
  steps, lr, rank = ttt_lib.settings(config) if "ttt" in config else (0, 0.0, 0)
  return f"_ttt{steps}_lr{lr:g}_r{rank}" if steps else ""


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                        splits=None) -> dict:
  """--mode=eval: the best checkpoint of `workdir` (or `config.init_from`) on `splits`
  (default `config.train.eval_splits`), each written to `eval_<split>.json`, or
  `eval_<split>_ttt<steps>_lr<lr>_r<rank>.json` with test-time training (`config.ttt`)."""
  workdir = os.path.abspath(workdir)
  if splits is None:
    splits = config.train.eval_splits
  splits = (splits,) if isinstance(splits, str) else tuple(splits)
  splits = tuple(p.strip() for sp in splits for p in sp.split(",") if p.strip())  # "dev,test"
  s = setup(config, workdir)
  config, state = s["config"], s["state"]
  suffix = ttt_suffix(config)
  if config.init_from:
    params, step = checkpointing.restore_params(config.init_from, state.params)
  else:
    manager = checkpointing.make_manager(workdir, config, read_only=True)
    step = manager.best_step()
    if step is None:
      raise FileNotFoundError(
          f"no checkpoint in {checkpointing.checkpoint_dir(workdir)}; train first or set "
          "--config.init_from=PATH")
    restored, _ = checkpointing.restore(manager, step, state)
    params = restored.params
  evaluator = Evaluator(s["model"], s["mesh"], s["shardings"].params, config)
  out = {}
  for split in splits:
    t0 = time.time()
    metrics = evaluator(params, s["data"], split)
    metrics["eval_seconds"] = time.time() - t0
    out[split] = metrics
    if jax.process_index() == 0:
      os.makedirs(workdir, exist_ok=True)
      extra = {"ttt": config.ttt.to_dict()} if suffix else {}
      with open(os.path.join(workdir, f"eval_{split}{suffix}.json"), "w") as f:
        json.dump({"step": int(step), **extra, **metrics}, f, indent=2)
    logging.info("eval %s%s (checkpoint step %d): mean_R@1=%.2f rsum_all=%.1f rsum_it=%.1f",
                 split, suffix, step, metrics["mean_R@1"], metrics["rsum_all"],
                 metrics.get("rsum_it", float("nan")))
  return out
