"""Multi-timescale optimizer: one optax chain per CMS level (design section 4).

Every parameter gets a label from its path: `<level>` when a path component equals
`cms_<level>` (the Continuum Memory System's level modules), `default` otherwise.
`optax.multi_transform` sends each label to its own chain

  every_k(update_every, inner =
      clip_by_global_norm(clip_norm) -> base optimizer (schedule, weight-decay mask))

`every_k` wraps the whole chain: it accumulates the RAW gradients of the window, and at
the window's end their mean is clipped (by the global norm of that label's parameters
only), then the base optimizer (weight decay, momentum, moments) steps once. It has the
semantics of `optax.MultiSteps(inner, every_k_schedule=k)` (same state fields, same
running mean, equal updates: tested against it), but MultiSteps runs the inner chain on
EVERY step and then selects its result with jnp.where, so a level paid a full optimizer
step (plus a select over its state) at every outer step. `every_k` accumulates the mean
gradient (one elementwise pass) and runs the inner chain only on the window's last step,
inside jax.lax.cond. `clip_by_global_norm` has optax's semantics, computed as one scale
factor (so that XLA fuses it into the optimizer instead of writing the clipped gradient
out).

The chains are built from the config alone: the `default` label uses config.optim (optimizer, lr,
update_every 1); a level uses its own `optimizer`, `lr` and `update_every` from
config.model.cms.levels, and the shared hyper-parameters of config.optim.

Update frequency (paper: the CMS levels learn at their own time scales; Eq. 71 counts
TOKENS in context, C^(l) tokens between a level's updates. Here the unit is OUTER
OPTIMIZER STEPS, not tokens, and the update uses the mean gradient of the steps in
between). Counting outer steps n = 1, 2, ..., a level with period k updates its
parameters exactly at the steps
n with n % k == 0, and leaves them untouched in between. Between its updates,
`every_k` accumulates the gradients in its state (also across a checkpoint), and the
level's optimizer sees their MEAN over the k steps. Why the mean: it is the gradient of
the mean loss over the k batches, i.e. one step on a k times larger batch, so the
level's lr, its clip threshold and its optimizer's statistics (Adam's moments, the DMGD
memory's scale) mean the same for every period; with the sum they would grow with k.
(A level with k = 1, like `default`, is not wrapped: `every_k` with k = 1 is the
identity and would only hold a useless accumulator.)

Learning rate schedule: linear warm-up over optim.warmup_steps then cosine decay to
optim.lr_floor * peak at train.total_steps, counted in OUTER steps for every label: the
update at outer step n uses lr(n) = schedule(n) (so the first step has peak /
warmup_steps, never 0). A slow level therefore warms up and decays on the same clock as
the rest of the model (counting its own updates would stretch its warm-up k times);
inside `every_k` its c-th update (c = 0, 1, ...) happens at n = (c + 1) k and uses
schedule((c + 1) k). `learning_rates(config, step)` reports these values.

Weight decay is decoupled (AdamW style: lr * wd * W) for adamw, dmgd and anderson; for
sgd (Nesterov) it is added to the gradient before the momentum (PyTorch's SGD
convention). `weight_decay_mask` exempts norms, biases, embeddings, positions, the
temperature and every parameter with ndim <= 1.
"""

from typing import Any, Callable, Dict, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from nlmm_jax.optim import anderson as anderson_lib
from nlmm_jax.optim import dmgd as dmgd_lib

DEFAULT = "default"
OPTIMIZERS = ("adamw", "sgd", "dmgd", "anderson")
NO_DECAY_NAMES = frozenset(
    {"bias", "scale", "embedding", "pos_embedding", "log_logit_scale", "logit_bias"})


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _path_names(path) -> list:
  return [_key_name(k) for k in path]


def label_params(params: Any, level_names: Sequence[str]) -> Any:
  """Tree of labels like `params`: `<level>` if a path component is `cms_<level>`."""
  modules = {f"cms_{name}": name for name in level_names}

  def label(path, _):
    for name in _path_names(path):
      if name in modules:
        return modules[name]
    return DEFAULT

  return jax.tree_util.tree_map_with_path(label, params)


def weight_decay_mask(params: Any) -> Any:
  """True where weight decay applies (not norms, biases, embeddings, 1-D, ...)."""
  def decays(path, p):
    names = _path_names(path)
    return not ((names and names[-1] in NO_DECAY_NAMES) or jnp.ndim(p) <= 1)

  return jax.tree_util.tree_map_with_path(decays, params)


def _label_specs(config) -> Dict[str, dict]:
  """label -> {optimizer, lr, update_every}, `default` first."""
  specs = {DEFAULT: dict(optimizer=config.optim.optimizer, lr=float(config.optim.lr),
                         update_every=1)}
  for name, level in config.model.cms.levels.items():
    if name == DEFAULT:
      raise ValueError(f"a CMS level cannot be named {DEFAULT!r}")
    specs[name] = dict(optimizer=level.optimizer, lr=float(level.lr),
                       update_every=int(level.update_every))
  for name, spec in specs.items():
    if spec["optimizer"] not in OPTIMIZERS:
      raise ValueError(
          f"label {name!r}: optimizer must be one of {OPTIMIZERS}, got {spec['optimizer']!r}")
    if spec["update_every"] < 1:
      raise ValueError(f"level {name!r}: update_every must be >= 1, got {spec['update_every']}")
  return specs


def outer_schedule(config, peak: float) -> Callable[[Any], Any]:
  """lr at outer step n (1-based): warm-up to `peak`, cosine to lr_floor * peak."""
  o = config.optim
  total = max(int(config.train.total_steps), 1)
  warmup = max(int(o.warmup_steps), 0)
  end = float(o.lr_floor) * peak
  if warmup > 0:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup,
        decay_steps=max(total, warmup + 1), end_value=end)
  return optax.cosine_decay_schedule(peak, max(total, 1), alpha=end / peak if peak else 0.0)


def learning_rates(config, step) -> Dict[str, float]:
  """{label: lr} used by an update at outer step `step` (0 for the first step).

  A level with period k only updates when (step + 1) % k == 0; the value reported for
  it at other steps is the one it would use.
  """
  return {name: float(outer_schedule(config, spec["lr"])(step + 1))
          for name, spec in _label_specs(config).items()}


def _base_optimizer(name: str, schedule, config) -> optax.GradientTransformation:
  o = config.optim
  wd = float(o.weight_decay)
  if name == "adamw":
    return optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=wd,
                       mask=weight_decay_mask)
  if name == "sgd":
    sgd = optax.sgd(schedule, momentum=o.momentum, nesterov=True)
    return optax.chain(optax.add_decayed_weights(wd, weight_decay_mask), sgd) if wd else sgd
  if name == "dmgd":
    d = o.dmgd
    return dmgd_lib.dmgd(schedule, hidden=d.hidden, inner_lr=d.inner_lr,
                         objective=d.objective, alpha=d.alpha, sigma=d.sigma,
                         ns_steps=d.ns_steps, phi_sample=d.phi_sample,
                         activation=d.activation, b2=o.b2, eps=o.eps, weight_decay=wd,
                         mask=weight_decay_mask)
  if name == "anderson":
    a = o.anderson
    return anderson_lib.anderson(schedule, history=a.history, reg=a.reg,
                                 trust_region=a.trust_region, beta=a.beta, b1=a.b1,
                                 b2=o.b2, eps=o.eps, weight_decay=wd,
                                 mask=weight_decay_mask,
                                 history_dtype=a.get("history_dtype", "float32"))
  raise ValueError(f"unknown optimizer {name!r}; choose from {OPTIMIZERS}")


class EveryKState(NamedTuple):
  """`every_k`'s state: optax.MultiStepsState's fields, so that a checkpoint written
  with MultiSteps restores into it; the same values, but for acc_grads after an update."""
  mini_step: jax.Array       # [] int32: gradients accumulated in the current window
  gradient_step: jax.Array   # [] int32: windows completed (inner updates)
  inner_opt_state: Any
  acc_grads: Any             # float32 mean of the window's raw gradients so far (when
                             # mini_step > 0; after an update it holds that update)
  skip_state: Any = ()       # always empty (MultiSteps' should_skip_update_fn state)


def every_k(inner: optax.GradientTransformation, k: int) -> optax.GradientTransformation:
  """`inner` applied once every k steps to the mean of the k raw gradients.

  optax.MultiSteps(inner, every_k_schedule=k, use_grad_mean=True)'s semantics and
  arithmetic (running mean acc + (g - acc) / (n + 1) over the window's n-th gradient;
  zero updates between emissions), with the inner chain run only on the emitting step,
  under jax.lax.cond, instead of on every step with its results discarded by jnp.where.
  """
  k = int(k)
  if k < 1:
    raise ValueError(f"every_k needs k >= 1, got {k}")

  def init_fn(params):
    return EveryKState(
        mini_step=jnp.zeros([], jnp.int32), gradient_step=jnp.zeros([], jnp.int32),
        inner_opt_state=inner.init(params),
        acc_grads=jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params))

  def update_fn(grads, state, params=None):
    n = state.mini_step
    emit = n == k - 1
    # MultiSteps' running mean (its accumulator is 0 when n = 0, giving g exactly).
    acc = jax.tree.map(
        lambda g, a: jnp.where(n == 0, g.astype(jnp.float32),
                               a + (g.astype(jnp.float32) - a) / (n + 1)),
        grads, state.acc_grads)

    # One float32 tree leaves the cond: the updates on the emitting step, the running
    # mean (passed through) on the others. It is the new accumulator as it is (after an
    # emitting step mini_step is 0, and the next step does not read it), so XLA keeps
    # it in the accumulator's buffer, and a holding step writes no new buffer (zero
    # updates or a zeroed accumulator would each be one, the size of the level).
    def run(acc, inner_state, params):
      mean = jax.tree.map(lambda a, g: a.astype(g.dtype), acc, grads)
      updates, inner_state = inner.update(mean, inner_state, params)
      return jax.tree.map(lambda u: u.astype(jnp.float32), updates), inner_state

    def hold(acc, inner_state, params):
      del params
      return acc, inner_state

    out, inner_state = jax.lax.cond(emit, run, hold, acc, state.inner_opt_state, params)
    updates = jax.tree.map(lambda o, g: jnp.where(emit, o, 0.0).astype(g.dtype), out, grads)
    new_state = EveryKState(
        mini_step=jnp.where(emit, 0, n + 1).astype(jnp.int32),
        gradient_step=state.gradient_step + emit.astype(jnp.int32),
        inner_opt_state=inner_state, acc_grads=out)
    return updates, new_state

  return optax.GradientTransformation(init_fn, update_fn)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """optax.clip_by_global_norm as one scale: g * min(1, max_norm / ||g||).

  optax computes where(||g|| < max_norm, g, g / ||g|| * max_norm), whose elementwise
  division XLA does not repeat in each consumer of the clipped gradient (the optimizer's
  moment and parameter updates): it writes the clipped gradient to a new buffer, on CPU
  as costly as a third of the AdamW step. A scalar factor fuses into every consumer.
  Equal to optax's up to rounding (the scale is computed once); a non-finite norm gives
  non-finite updates in both.
  """
  def update_fn(updates, state, params=None):
    del params
    scale = jnp.minimum(1.0, max_norm / optax.global_norm(updates))
    return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def label_chain(config, optimizer: str, lr: float,
                update_every: int) -> optax.GradientTransformation:
  """clip -> base optimizer (outer-step schedule) -> every_k(update_every)."""
  k = int(update_every)
  outer = outer_schedule(config, lr)
  schedule = lambda count: outer((count + 1) * k)      # count: this chain's own updates
  parts = []
  if config.optim.clip_norm and config.optim.clip_norm > 0:
    parts.append(clip_by_global_norm(config.optim.clip_norm))
  parts.append(_base_optimizer(optimizer, schedule, config))
  chain = optax.chain(*parts)
  if k == 1:
    return chain
  return every_k(chain, k)


def build_optimizer(config) -> optax.GradientTransformation:
  """The whole optimizer, from config.optim, config.model.cms.levels, config.train."""
  specs = _label_specs(config)
  transforms = {name: label_chain(config, **spec) for name, spec in specs.items()}
  level_names = [name for name in specs if name != DEFAULT]
  return optax.multi_transform(transforms, lambda p: label_params(p, level_names))
