"""Test-time training (TTT): per-example low-rank key adapters, fitted by a few SGD steps
on the fast-weight memories' own associative objective (design section 3).

Adapters. Every fast-weight memory on a modality's path (its encoder's NL blocks and the
central latent memory's memory) gets a rank-r adapter on its key projection:

  k_t = gamma_k,t * normalize_h(x_t (W_k + A B)),   A [d, r], B [r, width]

(row convention of `fast_weights.py`: x_t, k_t, v_t, q_t are row vectors, reads are
q_t S). B = 0 at initialisation, so x A B = 0 exactly and the adapted model computes the
trained model's embedding; A is a fixed Gaussian N(0, 1/d) drawn from a seed derived
from the layer's path (the same for every example, never trained). The adapters live in
their own Flax variable collection "ttt", made from the parameter tree by
`init_adapters`: the parameters, `nlmm.abstract_params` and checkpoints are untouched,
and a model trained without TTT is adapted at inference as it is.

Inner objective. For one example and one memory layer l with input x (its RMS-normed
residual stream, a constant for differentiation: stop_gradient inside the layer), real
tokens m_t, heads h, and the layer's passes p (causal: the forward pass; bidirectional:
the forward and the time-reversed pass):

  L_l(A_l, B_l) = (1 / sum_t m_t) sum_p sum_t m_t sum_h | v_th - k_th S~^p_h,t-1 |^2

where S~^p_t-1 = alpha_t S^p_t-1 is the state token t is written against in pass p
(built by the layer's rule, Eq. 65: S_t = alpha_t (I - beta_t k_t^T k_t) S_t-1 +
beta_t k_t^T v_t, from the tokens before t in that pass; alpha_t = 1 ungated) and
v_t - k_t S~_t-1 is exactly the delta rule's prediction error r_t: L_l is the mean over
real tokens of Eq. 65's inner (online regression) objective |v_t - k_t S|^2, summed over
heads and passes. The example's objective is L = sum_l L_l. Each step is plain SGD:

  (A_l, B_l) <- (A_l, B_l) - lr grad_{A_l, B_l} L_l       for every layer l, `steps` times

(grad_{A_l, B_l} L = grad_{A_l, B_l} L_l: a later layer's input is a constant). The
forward of each step runs the current adapters of every layer, so a layer's input
reflects the adapted layers below it. After the last step the example is embedded with
its adapters, which are then discarded.

What the adapters change, and why the objective is not trivial: only the keys, i.e. where
each token is written and what the memory is asked to predict it from. The values v_t,
write strengths beta_t, gates, context gains and queries are functions of the constant
layer input and do not move, so the objective cannot be lowered by shrinking or
collapsing v; the keys stay unit-norm per head (times their fixed gain), so the memory
cannot be switched off either (orthogonal keys give the no-memory error sum |v_t|^2).
The only way down is keys under which earlier tokens' values predict later ones (for a
bidirectional layer, later ones' too). Queries are not adapted: they do not enter the
objective, so a query adapter would never receive a gradient. A known degenerate
direction: aligning all keys makes the memory predict a running average of the values,
which lowers L when the values share a mean; a rank-r adapter fitted by a few small
steps stays far from it.

Batch independence: `embed` vmaps over examples, each with its own zero-initialised
adapter copy adapted on its own tokens only (the objective is normalised by its own
real-token count, and padding writes nothing), so an embedding does not depend on its
batch mates or on how much padding follows it. Everything runs inside `jax.jit`
(`lax.scan` over the inner steps).

Cost: each step is one forward up to the last memory plus the local backward of every
memory layer (the input stop_gradient cuts the rest), so steps = 3 costs about 5-8 plain
forwards. `steps = 0` (the default, `config.ttt.steps`) is the plain embedding: the
adapters are not even created.
"""

import zlib
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import ml_collections

from nlmm_jax.models import fast_weights
from nlmm_jax.models import nlmm

Array = jax.Array
COLLECTION = fast_weights.TTT_COLLECTION
LOSS_COLLECTION = fast_weights.TTT_LOSS_COLLECTION
MEMORY_PARAMS = ("query", "key", "value", "out", "query_scale")  # a FastWeightMemory's


def check_settings(steps: int, lr: float, rank: int) -> tuple[int, float, int]:
  steps, lr, rank = int(steps), float(lr), int(rank)
  if steps < 0:
    raise ValueError(f"ttt.steps must be >= 0 (0: off), got {steps}")
  if steps > 0 and not lr > 0:
    raise ValueError(f"ttt.lr must be > 0, got {lr}")
  if steps > 0 and rank < 1:
    raise ValueError(f"ttt.rank must be >= 1, got {rank}")
  return steps, lr, rank


def settings(config: ml_collections.ConfigDict) -> tuple[int, float, int]:
  """(steps, lr, rank) from a full config's `ttt` section (checked)."""
  t = config.ttt
  steps, lr, rank = check_settings(t.steps, t.lr, t.rank)
  block = config.model.block
  if steps > 0 and block != "nl":
    raise ValueError(f"test-time training adapts the fast-weight memories' keys: it needs "
                     f"model.block='nl', this model has {block!r} (set ttt.steps=0)")
  return steps, lr, rank


def _memory_paths(params: Mapping[str, Any], modality: Optional[str]) -> list:
  """Paths (tuples of names) of the FastWeightMemory layers in a parameter tree."""
  found = []

  def walk(node, path):
    if not isinstance(node, Mapping):
      return
    if all(k in node for k in MEMORY_PARAMS):
      found.append(path)
      return
    for k, v in node.items():
      walk(v, path + (k,))

  tops = None if modality is None else (f"{modality}_encoder", "clm")
  for top, node in params.items():
    if tops is None or top in tops:
      walk(node, (top,))
  return sorted(found)


def init_adapters(params: Mapping[str, Any], rank: int,
                  modality: Optional[str] = None) -> dict:
  """The "ttt" collection: {path...: {key_a [d, r], key_b [r, width]}} for every memory
  (of `modality`'s encoder and the CLM, or all when None). B = 0: the identity."""
  out: dict = {}
  for path in _memory_paths(params, modality):
    node = params
    for name in path:
      node = node[name]
    d, width = node["key"]["kernel"].shape
    seed = zlib.crc32("/".join(path).encode())
    a = jax.random.normal(jax.random.key(seed), (d, rank), jnp.float32) / jnp.sqrt(d)
    leaf = out
    for name in path:
      leaf = leaf.setdefault(name, {})
    leaf["key_a"] = a
    leaf["key_b"] = jnp.zeros((rank, width), jnp.float32)
  if not out:
    raise ValueError(f"no fast-weight memory found in the parameters for {modality!r}")
  return out


def objective(model: nlmm.NLMM, params, adapters, inputs: Mapping[str, Array],
              modality: str) -> Array:
  """Per-row inner objective L [B] = sum over the memory layers of L_l (module docstring)."""
  _, state = model.apply({"params": params, COLLECTION: adapters}, inputs, modality,
                         method=nlmm.NLMM.embed, mutable=[LOSS_COLLECTION])
  return sum(jax.tree.leaves(state[LOSS_COLLECTION]))


def adapt(model: nlmm.NLMM, params, example: Mapping[str, Array], modality: str, *,
          steps: int, lr: float, rank: int, adapters=None) -> tuple[dict, Array]:
  """`steps` SGD steps on ONE example (a batch of 1) -> (adapters, L before each step).

  adapters: the starting point (default: `init_adapters`, the identity).
  """
  if adapters is None:
    adapters = init_adapters(params, rank, modality)
  loss = lambda ad: objective(model, params, ad, example, modality)[0]

  def step(ad, _):
    value, grads = jax.value_and_grad(loss)(ad)
    return jax.tree.map(lambda a, g: a - lr * g, ad, grads), value

  return jax.lax.scan(step, adapters, None, length=steps)


def embed(model: nlmm.NLMM, params, inputs: Mapping[str, Array], modality: str, *,
          steps: int, lr: float = 0.1, rank: int = 4) -> Array:
  """`NLMM.embed` with test-time training: [B, E]. steps = 0: the plain embedding.

  Each row gets its own adapters (vmap), adapted on its own tokens; `params` are only
  read. Call it inside `jax.jit` with steps, lr and rank static.
  """
  steps, lr, rank = check_settings(steps, lr, rank)
  if steps == 0:
    return model.apply({"params": params}, inputs, modality, method=nlmm.NLMM.embed)
  adapters0 = init_adapters(params, rank, modality)

  def one(row):
    example = jax.tree.map(lambda a: a[None], row)
    adapters, _ = adapt(model, params, example, modality, steps=steps, lr=lr, rank=rank,
                        adapters=adapters0)
    return model.apply({"params": params, COLLECTION: adapters}, example, modality,
                       method=nlmm.NLMM.embed)[0]

  return jax.vmap(one)(dict(inputs))
