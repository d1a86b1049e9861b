"""Universal Anderson: Adam's direction with type-II Anderson acceleration (AA).

The Adam(W) step defines a fixed-point map G(x) = x - lr * d(x), d the bias-corrected
Adam direction plus decoupled weight decay (wd * x on the decayed parameters). AA
assumes G depends on x alone, which Adam's first moment breaks (the step then depends on
the path), so its decay b1 defaults to 0 here: d = g / (sqrt(v_hat) + eps), whose
preconditioner v changes slowly (b2), and AA supplies the acceleration that momentum
would (on the ill-conditioned test quadratic, b1 = 0.9 left AA no faster than Adam). Its
residual at step k is f_k = G(x_k) - x_k = -lr_k d_k, which is exactly the plain Adam
step. Type-II AA (Walker & Ni 2011, "Anderson acceleration for fixed-point iterations")
combines it with the last m steps. With the differences

  dX_j = x_{j+1} - x_j  (the update applied at step j),   dF_j = f_{j+1} - f_j,

stacked as the columns of dX, dF (the last n = min(k, m) of them, in fixed-size ring
buffers [m, ...] per parameter), the weights gamma in R^n solve the regularised least
squares problem

  gamma = argmin ||f_k - dF gamma||^2 + lam ||gamma||^2,
  lam   = reg * mean_j ||dF_j||^2     (relative: scale-free in lr and gradient size),

i.e. (dF^T dF + lam I) gamma = dF^T f_k, an (m x m) system whose unfilled slots are
masked (identity rows, zero right-hand side, so their weights are 0). The AA step is

  s_AA = beta f_k - (dX + beta dF) gamma          (beta: mixing; beta = 1 standard)

then, safeguarded:
  trust region  s_AA <- s_AA * min(1, trust_region * ||f_k|| / ||s_AA||)
  descent check if <s_AA, g_k> >= 0 (not a descent direction for the loss gradient g_k)
                or s_AA is not finite, take the Adam step f_k instead.

Inner products and norms run over the whole tree this transform sees (one AA over the
concatenated parameters of a label). With no history (k = 0) s_AA = beta f_0. All of it
is jnp arithmetic with jnp.where for the safeguards: no Python branching on values, no
host synchronisation, so it runs inside jax.jit (tested on the jaxpr). State: Adam's
(2 buffers the size of the parameters), the rings dX, dF (2m), the previous update and
residual (2): 2m + 4 buffers, 10 with m = 3.

"Universal": the same acceleration wraps any base direction; this module uses Adam's.
"""

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

_TINY = 1e-30


class AndersonState(NamedTuple):
  count: jax.Array       # [] int32, steps taken
  adam: Any              # optax.ScaleByAdamState
  dx: Any                # ring [m, ...] per parameter: x_{j+1} - x_j
  df: Any                # ring [m, ...] per parameter: f_{j+1} - f_j
  prev_update: Any       # the update returned at the previous step
  prev_f: Any            # the residual f of the previous step


def _vdot(a, b):
  return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _gram(rings, m):
  """G_ij = sum over leaves of <ring_i, ring_j>: [m, m] (elementwise + reduce per pair,
  which XLA runs much faster than a [m, N] x [N, m] matmul with a huge N)."""
  entries = {}
  for i in range(m):
    for j in range(i, m):
      entries[i, j] = sum(jnp.sum(r[i] * r[j]) for r in jax.tree.leaves(rings))
  return jnp.stack([jnp.stack([entries[min(i, j), max(i, j)] for j in range(m)])
                    for i in range(m)])


def _ring_dot(rings, tree, m):
  """sum over leaves of <ring_j, t>: [m]."""
  return jnp.stack([sum(jnp.sum(r[j] * t) for r, t in zip(jax.tree.leaves(rings),
                                                           jax.tree.leaves(tree)))
                    for j in range(m)])


def anderson(learning_rate: optax.ScalarOrSchedule,
             history: int = 3,
             reg: float = 1e-3,
             trust_region: float = 10.0,
             beta: float = 1.0,
             b1: float = 0.0,
             b2: float = 0.999,
             eps: float = 1e-8,
             weight_decay: float = 0.0,
             mask: Optional[Any] = None) -> optax.GradientTransformation:
  """Adam(W) + safeguarded type-II Anderson acceleration over `history` steps."""
  m = int(history)
  if m < 1:
    raise ValueError(f"anderson history must be >= 1, got {history}")
  adam = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)
  decay = optax.add_decayed_weights(weight_decay, mask) if weight_decay else None
  lr_fn = learning_rate if callable(learning_rate) else (lambda _: learning_rate)

  def init_fn(params):
    zeros = lambda p: jnp.zeros(jnp.shape(p), jnp.float32)
    ring = lambda p: jnp.zeros((m,) + jnp.shape(p), jnp.float32)
    return AndersonState(
        count=jnp.zeros([], jnp.int32), adam=adam.init(params),
        dx=jax.tree.map(ring, params), df=jax.tree.map(ring, params),
        prev_update=jax.tree.map(zeros, params), prev_f=jax.tree.map(zeros, params))

  def update_fn(grads, state, params=None):
    k = state.count
    grads32 = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
    d, adam_state = adam.update(grads32, state.adam, params)
    if decay is not None:
      d, _ = decay.update(d, decay.init(params), params)
    lr = jnp.asarray(lr_fn(k), jnp.float32)
    f = jax.tree.map(lambda x: -lr * x, d)                  # Adam step = AA residual

    # Push (dX, dF) of the previous step into slot (k - 1) mod m (not at k = 0).
    has_prev = k > 0
    slot = jnp.mod(k - 1, m)
    def push(ring, new):
      new = jnp.where(has_prev, new, jnp.zeros_like(new))
      return jax.lax.dynamic_update_index_in_dim(ring, new, slot, 0)
    dx = jax.tree.map(push, state.dx, state.prev_update)
    df = jax.tree.map(lambda r, a, b: push(r, a - b), state.df, f, state.prev_f)

    filled = (jnp.arange(m) < jnp.minimum(k, m)).astype(jnp.float32)   # [m]
    gram = _gram(df, m)                                             # [m, m]
    n_filled = jnp.maximum(jnp.sum(filled), 1.0)
    lam = reg * jnp.sum(jnp.diag(gram) * filled) / n_filled + _TINY
    a = gram * filled[:, None] * filled[None, :] + jnp.diag(lam * filled + (1.0 - filled))
    rhs = _ring_dot(df, f, m) * filled
    gamma = jnp.linalg.solve(a, rhs) * filled                           # [m]

    s_aa = jax.tree.map(
        lambda fk, rx, rf: beta * fk - sum(gamma[j] * (rx[j] + beta * rf[j]) for j in range(m)),
        f, dx, df)
    f_norm = jnp.sqrt(_vdot(f, f))
    aa_norm = jnp.sqrt(_vdot(s_aa, s_aa))
    shrink = jnp.minimum(1.0, trust_region * f_norm / (aa_norm + _TINY))
    s_aa = jax.tree.map(lambda s: s * shrink, s_aa)
    accept = (_vdot(s_aa, grads32) < 0) & jnp.isfinite(aa_norm) & jnp.all(
        jnp.isfinite(gamma))
    step = jax.tree.map(lambda sa, fk: jnp.where(accept, sa, fk), s_aa, f)

    new_state = AndersonState(count=optax.safe_increment(k), adam=adam_state, dx=dx,
                              df=df, prev_update=step, prev_f=f)
    updates = jax.tree.map(lambda s, g: s.astype(g.dtype), step, grads)
    return updates, new_state

  return optax.GradientTransformation(init_fn, update_fn)
