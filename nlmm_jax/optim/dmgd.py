"""Deep Momentum Gradient Descent (DMGD) as an optax GradientTransformation.

Behrouz et al., "Nested Learning: The Illusion of Deep Learning Architectures",
arXiv:2512.24695v1 (NeurIPS 2025), Eq. 50-52. There, momentum is an associative memory
that compresses the gradients with its own objective L^(2), taking one gradient step on
it per outer step, with retention alpha,

  m_{i+1} = alpha * m_i - eta * grad L^(2)(m_i; u_i)          (Eq. 50-51)
  W_{i+1} = W_i - lr * sigma(m_{i+1}(u_i))                     (Eq. 52)

and DMGD replaces the linear memory m_i by a deeper one, m(.), read at the current
features. Here, per parameter tensor with N coordinates, at step t = 1, 2, ... (g = g_t):

  scale      s_t = rms(g_t) + eps
  features   u_t = (g_t / s_t, mu_t / s_t)                       per coordinate
  memory     m_Theta(u)_i = mu_i + s * r_phi(u_i),    Theta = (mu, phi)
             r_phi(u) = w2 . tanh(W1^T u + b1)            (W1: [2, H], b1, w2: [H])
  objective  ell(p, g) = -p * g                  ("dot")
             ell(p, g) = (p - g)^2 / 2           ("l2", default)
  inner step on the pair (u_{t-1} -> g_t): the memory predicted p_t = m_{Theta_{t-1}}(u_{t-1})
             (with s = s_{t-1}) before seeing g_t, and learns from its error:
             mu_t  = alpha * mu_{t-1} - eta * d ell(p_t, g_t) / d mu
             phi_t = phi_0 + alpha * (phi_{t-1} - phi_0)
                     - eta * d [sum_i ell(p_t,i, g_t,i) / (N sbar_t^2)] / d phi,
             sbar_t = max(s_{t-1}, s_t)
  read       o_t = m_{Theta_t}(u_t) = mu_t + s_t * r_{phi_t}(u_t)
  update     -lr * sigma(o_t)     (the lr and the sign come from the chain, see `dmgd`)

mu (one value per coordinate) is the linear memory, i.e. the classical momentum buffer;
phi is a small MLP shared by the coordinates of one tensor (one phi per tensor). The
memory is trained to predict the next gradient from the current (gradient, momentum)
features, and its read is that forecast. A target that the features cannot predict
(i.i.d. noise around a mean) leaves r near 0 and mu (an average) does the work; a
predictable structure (e.g. a coordinate whose gradient alternates in sign) is learned by
r. phi's gradient is a sum over N coordinates measured in units of the gradient's scale:
dividing its objective by N sbar^2 makes its step independent of the tensor's size and of
the gradient's scale. Retention pulls phi towards its initial value phi_0 (w2 = 0: the
memory starts linear; W1's columns are fixed unit directions spread over the half circle;
b1 = 0), so a memory that stops learning forgets back to plain momentum instead of
collapsing its features to zero. phi is in the optax state (it jits, shards and
checkpoints like any other state) and changes at every step where the prediction error
is not zero. State: count, mu, the previous gradient (for u_{t-1}), nu (sigma = nsqrt),
phi: 3 buffers the size of the parameters with nsqrt (Adam: 2).

Reductions, both tested: with hidden = 0 (linear memory), objective "dot", eta = 1 and
sigma = identity, mu_t = alpha mu_{t-1} + g_t: heavy-ball momentum with beta = alpha
(optax.sgd(lr, momentum=alpha)). With "l2" and hidden = 0, mu_t = (alpha - eta) mu_{t-1}
+ eta g_t: an exponential average that moves towards the current gradient, so after the
gradient changes sign the momentum follows within a few steps (it cannot lock onto a
sign). Defaults alpha = 0.99, eta = 0.1: retention 0.89, steady state 0.91 g.

sigma:
  identity       o
  nsqrt          o / (sqrt(v_t / (1 - b2^t)) + eps),  v_t = b2 v_{t-1} + (1 - b2) g_t^2:
                 the bias-corrected mean second moment of the gradient per coordinate
                 (Adam's denominator; the memory's read takes the place of Adam's m).
  newton_schulz  2-D tensors: o orthogonalised by ns_steps quintic Newton-Schulz
                 iterations (Muon's coefficients; Jordan et al. 2024, "Muon: An
                 optimizer for hidden layers in neural networks"), times sqrt(max(m, n))
                 so that the update's RMS is about 1; other tensors: identity.
"""

import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from optax.contrib import _muon  # the Newton-Schulz iteration of optax's Muon

OBJECTIVES = ("l2", "dot")
SIGMAS = ("identity", "nsqrt", "newton_schulz")
MUON_NS_COEFFS = (3.4445, -4.7750, 2.0315)


class DMGDState(NamedTuple):
  count: jax.Array   # [] int32, number of steps taken
  mu: Any            # momentum (the linear memory), like the params
  g_prev: Any        # previous gradient (features u_{t-1}), or None (hidden = 0)
  nu: Any            # second moment of the gradient (sigma = nsqrt), else None
  phi: Any           # per tensor {"w1": [2, H], "b1": [H], "w2": [H]}, or None (hidden = 0)


def init_phi(hidden: int) -> dict:
  """phi_0: w2 = 0 (linear memory), W1 columns (cos theta_j, sin theta_j), b1 = 0."""
  theta = jnp.pi * jnp.arange(hidden, dtype=jnp.float32) / hidden
  return {"w1": jnp.stack([jnp.cos(theta), jnp.sin(theta)]),   # [2, H]
          "b1": jnp.zeros((hidden,), jnp.float32),
          "w2": jnp.zeros((hidden,), jnp.float32)}


def _hidden(phi: dict, a: jax.Array, b: jax.Array) -> list:
  """tanh(W1^T u + b1) per hidden unit, u = (a, b): H arrays shaped like a."""
  w1, b1 = phi["w1"], phi["b1"]
  return [jnp.tanh(a * w1[0, j] + b * w1[1, j] + b1[j]) for j in range(b1.shape[0])]


def residual(phi: dict, a: jax.Array, b: jax.Array) -> jax.Array:
  """r_phi(u) = w2 . tanh(W1^T u + b1) per coordinate, u = (a, b): [...] -> [...].

  Written per hidden unit (H is small) rather than as an [..., H] tensor: XLA then fuses
  each unit into one elementwise pass with no [N, H] intermediate.
  """
  return sum(phi["w2"][j] * h for j, h in enumerate(_hidden(phi, a, b)))


def residual_vjp(phi: dict, a: jax.Array, b: jax.Array, hs: list,
                 cot: jax.Array) -> dict:
  """sum_i cot_i d r_phi(u_i) / d phi, from the hidden units hs of `_hidden`."""
  w2 = phi["w2"]
  d_w2, d_b1, d_w1a, d_w1b = [], [], [], []
  for j, h in enumerate(hs):
    delta = cot * w2[j] * (1.0 - h * h)
    d_w2.append(jnp.sum(cot * h))
    d_b1.append(jnp.sum(delta))
    d_w1a.append(jnp.sum(a * delta))
    d_w1b.append(jnp.sum(b * delta))
  return {"w1": jnp.stack([jnp.stack(d_w1a), jnp.stack(d_w1b)]),
          "b1": jnp.stack(d_b1), "w2": jnp.stack(d_w2)}


def _inner_grad(objective: str, o: jax.Array, g: jax.Array) -> jax.Array:
  """d ell(o, g) / d o."""
  if objective == "dot":
    return -g
  return o - g


def _orthogonalise(o: jax.Array, ns_steps: int, eps: float) -> jax.Array:
  x = _muon.orthogonalize_via_newton_schulz(
      o, jnp.asarray(MUON_NS_COEFFS, o.dtype), ns_steps, eps=eps)
  return x * math.sqrt(max(o.shape))


def scale_by_dmgd(hidden: int = 8,
                  inner_lr: float = 0.1,
                  objective: str = "l2",
                  alpha: float = 0.99,
                  sigma: str = "nsqrt",
                  ns_steps: int = 5,
                  b2: float = 0.999,
                  eps: float = 1e-8) -> optax.GradientTransformation:
  """DMGD direction sigma(o_t) (no learning rate, no sign flip); see the module doc."""
  if objective not in OBJECTIVES:
    raise ValueError(f"dmgd objective must be one of {OBJECTIVES}, got {objective!r}")
  if sigma not in SIGMAS:
    raise ValueError(f"dmgd sigma must be one of {SIGMAS}, got {sigma!r}")
  if hidden < 0:
    raise ValueError(f"dmgd hidden must be >= 0, got {hidden}")

  def init_fn(params):
    zeros = lambda p: jnp.zeros(jnp.shape(p), jnp.float32)
    return DMGDState(
        count=jnp.zeros([], jnp.int32),
        mu=jax.tree.map(zeros, params),
        g_prev=jax.tree.map(zeros, params) if hidden else None,
        nu=jax.tree.map(zeros, params) if sigma == "nsqrt" else None,
        phi=jax.tree.map(lambda _: init_phi(hidden), params) if hidden else None)

  def rms(x):
    return jnp.sqrt(jnp.mean(jnp.square(x))) + eps

  def leaf_update(g, mu, g_prev, nu, phi, count):
    g = g.astype(jnp.float32)
    if phi is None:                                   # linear memory: p_t = mu_{t-1}
      d_p = _inner_grad(objective, mu, g)
      new_mu = alpha * mu - inner_lr * d_p
      new_phi, o = None, new_mu
    else:
      s_prev, s = rms(g_prev), rms(g)
      s_bar = jnp.maximum(s_prev, s)
      a_prev, b_prev = g_prev / s_prev, mu / s_prev   # features u_{t-1}
      hs = _hidden(phi, a_prev, b_prev)
      p_t = mu + s_prev * sum(phi["w2"][j] * h for j, h in enumerate(hs))  # forecast of g_t
      d_p = _inner_grad(objective, p_t, g)            # d ell / d p = d ell / d mu
      d_phi = residual_vjp(phi, a_prev, b_prev, hs, d_p * s_prev / (g.size * s_bar ** 2))
      new_mu = alpha * mu - inner_lr * d_p
      new_phi = jax.tree.map(lambda q, q0, dq: q0 + alpha * (q - q0) - inner_lr * dq,
                             phi, init_phi(hidden), d_phi)
      o = new_mu + s * residual(new_phi, g / s, new_mu / s)
    new_nu = None
    if sigma == "nsqrt":
      new_nu = b2 * nu + (1.0 - b2) * jnp.square(g)
      nu_hat = new_nu / (1.0 - b2 ** count.astype(jnp.float32))
      o = o / (jnp.sqrt(nu_hat) + eps)
    elif sigma == "newton_schulz" and o.ndim == 2:
      o = _orthogonalise(o, ns_steps, eps)
    return o, new_mu, (g if phi is not None else None), new_nu, new_phi

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    leaves, treedef = jax.tree.flatten(updates)
    none = [None] * len(leaves)
    per_leaf = lambda tree: none if tree is None else treedef.flatten_up_to(tree)
    out = [leaf_update(g, *rest, count) for g, *rest in zip(
        leaves, per_leaf(state.mu), per_leaf(state.g_prev), per_leaf(state.nu),
        per_leaf(state.phi))]
    field = lambda k, tree: None if tree is None else treedef.unflatten([x[k] for x in out])
    new_updates = treedef.unflatten([x[0].astype(g.dtype) for x, g in zip(out, leaves)])
    new_state = DMGDState(count=count, mu=field(1, state.mu), g_prev=field(2, state.g_prev),
                          nu=field(3, state.nu), phi=field(4, state.phi))
    return new_updates, new_state

  return optax.GradientTransformation(init_fn, update_fn)


def dmgd(learning_rate: optax.ScalarOrSchedule,
         hidden: int = 8,
         inner_lr: float = 0.1,
         objective: str = "l2",
         alpha: float = 0.99,
         sigma: str = "nsqrt",
         ns_steps: int = 5,
         b2: float = 0.999,
         eps: float = 1e-8,
         weight_decay: float = 0.0,
         mask: Optional[Any] = None) -> optax.GradientTransformation:
  """DMGD with decoupled weight decay: W <- W - lr * (sigma(o_t) + wd * W)."""
  parts = [scale_by_dmgd(hidden, inner_lr, objective, alpha, sigma, ns_steps, b2, eps)]
  if weight_decay:
    parts.append(optax.add_decayed_weights(weight_decay, mask))
  parts.append(optax.scale_by_learning_rate(learning_rate))
  return optax.chain(*parts)
