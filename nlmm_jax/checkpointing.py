"""Orbax checkpoints: train state + grain iterator state + config, latest N and best.

Layout of `<workdir>/checkpoints/<step>/`:
  state/   the TrainState pytree (params, full optimizer state with every CMS level's
           MultiSteps counters, step, RNG) — restorable with plain orbax;
  data/    the grain iterator state (JSON). Every process consumes the same number of
           batches from its own shard, so the iterator positions of all processes
           agree and one state restores each of them;
  config/  the run's config as JSON;
  tokenizer/ the run's caption vocabulary as JSON (so a checkpoint embeds text alone).
Every item has a default restore type, so `ocp.CheckpointManager(dir).restore(step)`
works with no project code.
Saves are asynchronous; orbax writes into a temporary directory and renames it when
complete, so a process killed mid-save leaves the previous checkpoints intact and the
partial one is ignored on restart.
"""

import os
from typing import Any, Optional

from absl import logging
import jax
import ml_collections
import orbax.checkpoint as ocp

from orbax.checkpoint import checkpoint_managers

BEST_METRIC = "rsum_all"  # evaluate.py: all 18 recalls (max 1800); see rsum_it for the literature's


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def make_manager(workdir: str, config: ml_collections.ConfigDict,
                 read_only: bool = False) -> ocp.CheckpointManager:
  """Keeps the latest `train.keep_checkpoints` and the best by dev `rsum_all`."""
  options = ocp.CheckpointManagerOptions(
      best_fn=lambda metrics: metrics[BEST_METRIC],
      best_mode="max",
      preservation_policy=checkpoint_managers.AnyPreservationPolicy([
          checkpoint_managers.LatestN(n=config.train.keep_checkpoints),
          checkpoint_managers.BestN(get_metric_fn=lambda m: m[BEST_METRIC], n=1,
                                    keep_checkpoints_without_metrics=False),
      ]),
      enable_async_checkpointing=True,
      create=not read_only,
      read_only=read_only,
  )
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def abstract(tree: Any) -> Any:
  """Shape/dtype/sharding target for a restore (keeps optax NamedTuple types)."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iter: Any,
         config: ml_collections.ConfigDict, metrics: Optional[dict] = None,
         force: bool = True, tokenizer: Any = None) -> bool:
  items = dict(state=ocp.args.StandardSave(state),
               config=ocp.args.JsonSave(config.to_dict()))
  if tokenizer is not None:
    items["tokenizer"] = ocp.args.JsonSave(tokenizer.to_json())
  if data_iter is not None:
    items["data"] = ocp.args.JsonSave(data_iter.get_state())
  return manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)


def restore(manager: ocp.CheckpointManager, step: int, state_target: Any,
            data_iter: Any = None) -> tuple[Any, Any]:
  """Restores (state, data_iter) at `step`; `state_target` gives shapes and shardings."""
  items = dict(state=ocp.args.StandardRestore(abstract(state_target)))
  if data_iter is not None:
    items["data"] = ocp.args.JsonRestore()
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  if data_iter is not None:
    data_iter.set_state(restored["data"])
  return restored["state"], data_iter


def resolve_init_from(path: str) -> tuple[str, Optional[int]]:
  """`init_from` accepts a workdir, its checkpoints/ folder, or a step folder."""
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.exists(path):
    raise FileNotFoundError(f"config.init_from={path!r} does not exist")
  base = os.path.basename(path.rstrip("/"))
  if base.isdigit() and os.path.isdir(os.path.join(path, "state")):
    return os.path.dirname(path), int(base)
  if os.path.isdir(os.path.join(path, "checkpoints")):
    return os.path.join(path, "checkpoints"), None
  return path, None


def _read_only_manager(directory: str) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
      read_only=True, best_fn=lambda m: m[BEST_METRIC], best_mode="max"))


def find_step(mngr: ocp.CheckpointManager, step: Any, directory: str, what: str) -> int:
  """The step that `step` ("best", "latest", a number) names in `mngr`, or a clear error."""
  steps = sorted(mngr.all_steps())
  if not steps:
    raise FileNotFoundError(f"no checkpoint found under {directory} ({what})")
  if step == "latest":
    return steps[-1]
  if step == "best":
    best = mngr.best_step()
    if best is None:
      raise FileNotFoundError(
          f"no evaluated checkpoint under {directory} ({what}): 'best' needs a dev "
          f"evaluation; the checkpoints there are steps {steps} (ask for 'latest' or one "
          "of them)")
    return best
  try:
    number = int(step)
  except (TypeError, ValueError):
    raise ValueError(f"step must be 'best', 'latest' or a step number, got {step!r}") from None
  if number not in steps:
    raise FileNotFoundError(f"no checkpoint of step {number} under {directory} ({what}); "
                            f"steps there: {steps}")
  return number


def _local_target(directory: str, step: int) -> Any:
  """The saved state's shapes and dtypes, placed on this process' first device.

  Without a target orbax restores each array with the sharding it was saved with, which
  fails on another device topology (trained on 2 devices, loaded on 1); the caller
  places the arrays where it needs them.
  """
  meta = ocp.StandardCheckpointer().metadata(
      os.path.join(directory, str(step), "state")).item_metadata
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                      getattr(meta, "tree", meta))


def restore_items(path: str, step: Any = "best", items=("state",), what: str = "checkpoint"
                  ) -> tuple[dict, int]:
  """Plain (target-free) restore of `items` of a checkpoint: a workdir, its checkpoints/
  folder or a step folder (which fixes the step), at `step` ("best", "latest", a number).

  Returns ({item: restored}, step). A damaged or incomplete checkpoint raises ValueError
  naming the folder and orbax's complaint.
  """
  directory, fixed = resolve_init_from(path)
  with _read_only_manager(directory) as mngr:
    step = fixed if fixed is not None else find_step(mngr, step, directory, what)
    try:
      args = {name: (ocp.args.StandardRestore(_local_target(directory, step)) if name == "state"
                     else ocp.args.JsonRestore()) for name in items}
      restored = mngr.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # orbax raises many types for missing or corrupt files
      raise ValueError(f"cannot read the checkpoint {directory}/{step} ({what}): "
                       f"{type(e).__name__}: {e}") from e
  return {name: restored[name] for name in items}, int(step)


def restore_params(init_from: str, params_target: Any, step: Any = "best",
                   what: str = "config.init_from") -> tuple[Any, int]:
  """Parameters only (for a new run, or for inference), at `step` of `init_from`.

  Reads the step of a workdir (or the given step folder), checks that the stored
  parameter tree has exactly the structure and shapes of `params_target`, and places
  the arrays with `params_target`'s shardings.
  """
  restored, step = restore_items(init_from, step, ("state",), what)
  directory = resolve_init_from(init_from)[0]
  params = restored["state"]["params"]
  want = jax.tree_util.tree_flatten_with_path(params_target)[0]
  got = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  problems = []
  for path, leaf in want:
    if path not in got:
      problems.append(f"missing {jax.tree_util.keystr(path)}")
    elif tuple(got[path].shape) != tuple(leaf.shape):
      problems.append(f"{jax.tree_util.keystr(path)}: checkpoint {got[path].shape} "
                      f"vs model {leaf.shape}")
  if problems or len(got) != len(want):
    raise ValueError(
        f"{what}={init_from!r} (step {step}) does not match this model: "
        + "; ".join(problems[:10]) + (f" (+{len(problems) - 10} more)" if len(problems) > 10 else "")
        + ("" if len(got) == len(want) else f"; checkpoint has {len(got)} arrays, model {len(want)}"))
  params = jax.tree.map(
      lambda x, t: jax.device_put(x.astype(t.dtype), getattr(t, "sharding", None)),
      jax.tree.unflatten(jax.tree.structure(params_target),
                         [got[p] for p, _ in want]), params_target)
  logging.info("Initialised params from %s step %d", directory, step)
  return params, step
