"""Orbax checkpoints: train state + grain iterator state + config, latest N and best.

Layout of `<workdir>/checkpoints/<step>/`:
  state/   the TrainState pytree (params, full optimizer state with every CMS level's
           MultiSteps counters, step, RNG) — restorable with plain orbax;
  data/    the grain iterator state (JSON). Every process consumes the same number of
           batches from its own shard, so the iterator positions of all processes
           agree and one state restores each of them;
  config/  the run's config as JSON.
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

BEST_METRIC = "rsum"


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def make_manager(workdir: str, config: ml_collections.ConfigDict,
                 read_only: bool = False) -> ocp.CheckpointManager:
  """Keeps the latest `train.keep_checkpoints` and the best by dev `rsum`."""
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
         force: bool = True) -> bool:
  items = dict(state=ocp.args.StandardSave(state),
               config=ocp.args.JsonSave(config.to_dict()))
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


def restore_params(init_from: str, params_target: Any) -> tuple[Any, int]:
  """Parameters only, for a new run (fresh optimizer state and schedule).

  Reads the best step of a workdir (or the given step folder), checks that the stored
  parameter tree has exactly the structure and shapes of `params_target`, and places
  the arrays with `params_target`'s shardings.
  """
  directory, step = resolve_init_from(init_from)
  with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
      read_only=True, best_fn=lambda m: m[BEST_METRIC], best_mode="max")) as mngr:
    if step is None:
      step = mngr.best_step()
    if step is None:
      raise FileNotFoundError(f"no checkpoint found under {directory} (config.init_from)")
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
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
        f"config.init_from={init_from!r} (step {step}) does not match this model: "
        + "; ".join(problems[:10]) + (f" (+{len(problems) - 10} more)" if len(problems) > 10 else "")
        + ("" if len(got) == len(want) else f"; checkpoint has {len(got)} arrays, model {len(want)}"))
  params = jax.tree.map(
      lambda x, t: jax.device_put(x.astype(t.dtype), getattr(t, "sharding", None)),
      jax.tree.unflatten(jax.tree.structure(params_target),
                         [got[p] for p, _ in want]), params_target)
  logging.info("Initialised params from %s step %d", directory, step)
  return params, step
