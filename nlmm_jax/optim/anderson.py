"""Universal Anderson: Adam's direction with type-II Anderson acceleration (AA).

The Adam(W) step at step k is x_{k+1} = x_k - lr_k d_k, d the bias-corrected Adam
direction plus decoupled weight decay (wd * x on the decayed parameters). AA assumes a
fixed-point map that depends on x alone, which Adam's first moment breaks (the step then
depends on the path), so its decay b1 defaults to 0 here: d = g / (sqrt(v_hat) + eps),
whose preconditioner v changes slowly (b2), and AA supplies the acceleration that
momentum would (on the ill-conditioned test quadratic, b1 = 0.9 left AA no faster than
Adam).

The acceleration runs on the DIRECTION, free of the learning rate: it accelerates the
iteration x_{k+1} = x_k + lr_k s_k whose plain form is s_k = -d_k (residual r_k = -d_k),
and the lr multiplies its result. (With the residual f_k = -lr_k d_k, the history would
also record the warm-up and cosine changes of lr: f_{j+1} - f_j = lr_{j+1} (r_{j+1} - r_j)
+ (lr_{j+1} - lr_j) r_j.) For a constant lr this is exactly AA on G(x) = x - lr d(x).
Type-II AA (Walker & Ni 2011, "Anderson acceleration for fixed-point iterations")
combines d_k with the last m steps. With the differences

  dS_j = s_j          (the lr-free step taken at step j: (x_{j+1} - x_j) / lr_j),
  dD_j = d_{j+1} - d_j,

stacked as the columns of dS, dD (the last n = min(k, m) of them, in ring buffers
[m, ...] per parameter), the weights gamma in R^n solve the regularised least squares
problem

  gamma = argmin ||d_k - dD gamma||^2 + lam ||gamma||^2,
  lam   = reg * mean_j ||dD_j||^2     (relative: scale-free in gradient size),

i.e. (dD^T dD + lam I) gamma = dD^T d_k, an (m x m) system whose unfilled slots are
masked (identity rows, zero right-hand side, so their weights are 0). The AA direction is

  s_AA = -beta d_k - (dS - beta dD) gamma          (beta: mixing; beta = 1 standard)

(in the usual notation, with r = -d and dR = -dD: s_AA = beta r_k - (dS + beta dR) gamma),
then, safeguarded:
  trust region  s_AA <- s_AA * min(1, trust_region * ||d_k|| / ||s_AA||)
  descent check if <s_AA, g_k> >= 0 (not a descent direction for the loss gradient g_k)
                or s_AA is not finite, take the Adam direction -d_k instead;

and the update is lr_k s_k. A change of the learning rate alone (same gradients, no
weight decay) therefore leaves the directions s_k unchanged.

Inner products and norms run over the whole tree this transform sees (one AA over the
concatenated parameters of a label). With no history (k = 0) s_AA = -beta d_0. All of it
is jnp arithmetic with jnp.where for the safeguards: no Python branching on values, no
host synchronisation, so it runs inside jax.jit (tested on the jaxpr).

Cost. The Gram matrix dD^T dD is kept in the state ([m, m], exact, not a running
estimate): a step changes one column of dD, so it needs only that column's inner
products with the ring, <dD_i, dD_p> for i = 0..m-1 in one stacked reduction over each
leaf's [m, ...] ring, plus dD^T d_k (another) and the norms of the safeguards: a fixed
number of reductions, whatever m. State per parameter, counted in buffers the size of
the parameters: Adam's second moment (1; the first moment only when b1 > 0) and the
rings dS and dD (2m). The ring dD also holds -d_{k-1} in the slot that completes at the
next step (dD_{k-1} = d_k + (-d_{k-1})), which is exact in float32: 2m + 1 buffers, 7
with m = 3 (previously 2m + 4 = 10: Adam's unused first moment, and the previous update
and residual next to the rings). With `history_dtype` narrower than float32 (bfloat16)
the rings are stored in that dtype and d_{k-1} in its own float32 buffer, so that the
difference dD_{k-1} is rounded once rather than formed from two rounded directions:
2 float32 buffers and 2m half-size ones, 5 float32 buffers' worth with m = 3.

"Universal": the same acceleration wraps any base direction; this module uses Adam's.
"""

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

_TINY = 1e-30


class AndersonState(NamedTuple):
  count: jax.Array       # [] int32, steps taken
  mu: Any                # Adam's first moment; () when b1 == 0
  nu: Any                # Adam's second moment
  ds: Any                # ring [m, ...] per parameter: lr-free steps s_j
  dd: Any                # ring [m, ...] per parameter: d_{j+1} - d_j (and -d_{k-1})
  prev_d: Any            # d_{k-1} (float32) when history_dtype is narrower; else ()
  gram: jax.Array        # [m, m] float32: <dD_i, dD_j> of the ring's slots


def _ring_dot(ring, x):
  """<ring_j, x> for every slot j: [m] (one stacked reduction over the leaf)."""
  prod = ring.astype(jnp.float32) * x[None]
  return jnp.sum(prod, axis=tuple(range(1, prod.ndim)))


def _tree_sum(values):
  return sum(jax.tree.leaves(values))


def anderson(learning_rate: optax.ScalarOrSchedule,
             history: int = 3,
             reg: float = 1e-3,
             trust_region: float = 10.0,
             beta: float = 1.0,
             b1: float = 0.0,
             b2: float = 0.999,
             eps: float = 1e-8,
             weight_decay: float = 0.0,
             mask: Optional[Any] = None,
             history_dtype: Any = jnp.float32) -> optax.GradientTransformation:
  """Adam(W) direction + safeguarded type-II Anderson acceleration over `history` steps.

  The acceleration works on the lr-free direction; `learning_rate` scales its result.
  `history_dtype`: dtype of the ring buffers (float32, or bfloat16 to halve them).
  """
  m = int(history)
  if m < 1:
    raise ValueError(f"anderson history must be >= 1, got {history}")
  hist = jnp.dtype(history_dtype)
  if not jnp.issubdtype(hist, jnp.floating):
    raise ValueError(f"anderson history_dtype must be a float dtype, got {hist}")
  pending_in_ring = hist == jnp.float32     # -d_{k-1} stored exactly in the dD ring
  decay = optax.add_decayed_weights(weight_decay, mask) if weight_decay else None
  lr_fn = learning_rate if callable(learning_rate) else (lambda _: learning_rate)

  def init_fn(params):
    zeros = lambda p: jnp.zeros(jnp.shape(p), jnp.float32)
    ring = lambda p: jnp.zeros((m,) + jnp.shape(p), hist)
    return AndersonState(
        count=jnp.zeros([], jnp.int32),
        mu=jax.tree.map(zeros, params) if b1 else (),
        nu=jax.tree.map(zeros, params),
        ds=jax.tree.map(ring, params), dd=jax.tree.map(ring, params),
        prev_d=() if pending_in_ring else jax.tree.map(zeros, params),
        gram=jnp.zeros((m, m), jnp.float32))

  def update_fn(grads, state, params=None):
    k = state.count
    k1 = optax.safe_increment(k)
    g32 = jax.tree.map(lambda g: g.astype(jnp.float32), grads)

    # Adam's direction (optax.scale_by_adam's formulas) + decoupled weight decay.
    nu = jax.tree.map(lambda g, v: (1 - b2) * (g * g) + b2 * v, g32, state.nu)
    nu_corr = (1 - b2 ** k1).astype(jnp.float32)
    if b1:
      mu = jax.tree.map(lambda g, u: (1 - b1) * g + b1 * u, g32, state.mu)
      mu_corr = (1 - b1 ** k1).astype(jnp.float32)
      d = jax.tree.map(lambda u, v: (u / mu_corr) / (jnp.sqrt(v / nu_corr) + eps), mu, nu)
    else:
      mu = ()
      d = jax.tree.map(lambda g, v: g / (jnp.sqrt(v / nu_corr) + eps), g32, nu)
    if decay is not None:
      d, _ = decay.update(d, decay.init(params), params)

    # dD_{k-1} = d_k - d_{k-1}, the column of slot p = (k - 1) mod m (unused at k = 0:
    # no slot is filled yet). Everything below reads the rings as they came in (slot p
    # replaced by dD_p through corrections), and both rings are written once, at the end.
    p = jnp.mod(k - 1, m)
    slot = lambda ring, j: jax.lax.dynamic_index_in_dim(ring, j, 0, keepdims=False)
    f32 = lambda x: x.astype(jnp.float32)
    if pending_in_ring:
      dd_p = jax.tree.map(lambda ring, dk: slot(ring, p) + dk, state.dd, d)
    else:
      dd_p = jax.tree.map(lambda dk, dprev: (dk - dprev).astype(hist), d, state.prev_d)
    dot = lambda a, b: jnp.sum(f32(a) * f32(b))
    onehot_p = jnp.arange(m) == p

    # Gram matrix: only column p changed: <dD_i, dD_p> for all i, one stacked reduction.
    col = _tree_sum(jax.tree.map(lambda ring, x: _ring_dot(ring, f32(x)), state.dd, dd_p))
    col = jnp.where(onehot_p, _tree_sum(jax.tree.map(lambda x: dot(x, x), dd_p)), col)
    gram = state.gram.at[p, :].set(col).at[:, p].set(col)
    rhs = _tree_sum(jax.tree.map(_ring_dot, state.dd, d))                      # [m]
    rhs = jnp.where(onehot_p, _tree_sum(jax.tree.map(dot, dd_p, d)), rhs)
    d_sq = _tree_sum(jax.tree.map(lambda x: jnp.sum(x * x), d))

    filled = jnp.arange(m) < jnp.minimum(k, m)                                # [m]
    both = filled[:, None] & filled[None, :]
    n_filled = jnp.maximum(jnp.sum(filled), 1).astype(jnp.float32)
    lam = reg * jnp.sum(jnp.where(filled, jnp.diag(gram), 0.0)) / n_filled + _TINY
    a = jnp.where(both, gram, 0.0) + jnp.diag(jnp.where(filled, lam, 1.0))
    gamma = jnp.where(filled, jnp.linalg.solve(a, jnp.where(filled, rhs, 0.0)), 0.0)
    gamma_p = jnp.sum(jnp.where(onehot_p, gamma, 0.0))

    def direction(dk, rs, rd, xp):
      # -beta d - sum_j gamma_j (dS_j - beta dD_j), with dD_p = slot p + (dD_p - slot p).
      if pending_in_ring:
        s = (beta * gamma_p - beta) * dk                      # dD_p - slot p = d_k
      else:
        s = -beta * dk + (beta * gamma_p) * (f32(xp) - f32(slot(rd, p)))
      for j in range(m):
        s = s - gamma[j] * (f32(rs[j]) - beta * f32(rd[j]))
      return s
    s_aa = jax.tree.map(direction, d, state.ds, state.dd, dd_p)
    aa_sq = _tree_sum(jax.tree.map(lambda x: jnp.sum(x * x), s_aa))
    aa_g = _tree_sum(jax.tree.map(lambda x, g: jnp.sum(x * g), s_aa, g32))
    aa_norm = jnp.sqrt(aa_sq)
    shrink = jnp.minimum(1.0, trust_region * jnp.sqrt(d_sq) / (aa_norm + _TINY))
    accept = (aa_g * shrink < 0) & jnp.isfinite(aa_norm) & jnp.all(jnp.isfinite(gamma))
    step = jax.tree.map(lambda sa, dk: jnp.where(accept, sa * shrink, -dk), s_aa, d)

    # Slot p <- dD_p; slot q = k mod m (s_{k-m}, dD_{k-m}, no longer needed) <- s_k, and
    # in float32 -d_k, the start of dD_k. The slot indices are made to depend on `accept`
    # (p + m * accept = p mod m), which depends on every read of the incoming rings: XLA
    # then schedules these writes after those reads and updates the rings in place
    # (otherwise it may write first and copy the whole rings to keep the old values).
    late = m * accept.astype(jnp.int32)
    p, q = jnp.mod(p + late, m), jnp.mod(k + late, m)
    put = lambda ring, x, j: jax.lax.dynamic_update_index_in_dim(ring, x.astype(hist), j, 0)
    ds = jax.tree.map(lambda ring, x: put(ring, x, q), state.ds, step)
    dd = jax.tree.map(lambda ring, x: put(ring, x, p), state.dd, dd_p)
    if pending_in_ring:
      dd = jax.tree.map(lambda ring, dk: put(ring, -dk, q), dd, d)
      prev_d = ()
    else:
      # + 0 * late: the same ordering for this buffer (else XLA copies it twice).
      prev_d = jax.tree.map(lambda dk: dk + 0.0 * late.astype(jnp.float32), d)

    lr = jnp.asarray(lr_fn(k), jnp.float32)
    updates = jax.tree.map(lambda s, g: (lr * s).astype(g.dtype), step, grads)
    new_state = AndersonState(count=k1, mu=mu, nu=nu, ds=ds, dd=dd, prev_d=prev_d,
                              gram=gram)
    return updates, new_state

  return optax.GradientTransformation(init_fn, update_fn)
