"""Deep momentum as a gradient-forecasting memory (a variant of DMGD), as an optax transform.

Behrouz et al., "Nested Learning: The Illusion of Deep Learning Architectures",
arXiv:2512.24695v1 (NeurIPS 2025), Eq. 50-52, write momentum as an associative memory m
that compresses the gradients u_i with its own objective L^(2), one gradient step on it
per outer step, with retention alpha:

  m_{i+1} = alpha * m_i - eta * grad L^(2)(m_i; u_i)          (Eq. 50-51)
  W_{i+1} = W_i - lr * sigma(m_{i+1}(u_i))                     (Eq. 52)

and Deep Momentum GD (DMGD) makes m(.) an MLP. This module does NOT implement Eq. 50 as
written. Eq. 50 trains the memory on the current input u_i and reads it at that same
input; with a regression objective whose target is the current gradient, the best memory
is then the identity (plain SGD, no momentum), and every step needs two evaluations of
the MLP per coordinate (before and after its step). Here the memory is keyed on the
PREVIOUS step's features and trained to FORECAST the current gradient, and its read at
the current features is the forecast of the next gradient. Per parameter tensor with N
coordinates, at step t = 1, 2, ... (g = g_t; mu_0 = 0, p_1 = 0, u_0 = 0, s_0 = 0,
phi = phi_0):

  (D1) memory     m_Theta(u)_i = mu_i + s * r_phi(u_i),   Theta = (mu, phi),
                  r_phi(u) = w2 . act(W1^T u + b1)   (W1: [2, H], b1, w2: [H]),
                  act = tanh (activation="tanh") or the cubic sigmoid
                  act(x) = y - 4 y^3 / 27, y = clip(x, -1.5, 1.5) (activation="cubic",
                  C^1, saturates at +-1; the read with it is about 3x cheaper than
                  with XLA's tanh on CPU)
  (D2) scale      s_t = max(rms(g_t), rms(mu_t)) + eps
       features   u_t = clip((g_t / s_t, mu_t / s_t), -F, F)         per coordinate
  (D3) forecast   p_t = m_{Theta_{t-1}}(u_{t-1}) = mu_{t-1} + s_{t-1} r_{phi_{t-1}}(u_{t-1}),
                  stored at step t-1 (it is the un-debiased read of (D6))
  (D4) inner objectives on the pair (u_{t-1} -> g_t), features held fixed:
         ell(p, g) = (p - g)^2 / 2 ("l2", default),   ell(p, g) = -p * g ("dot")
         J_mu(mu)   = sum_i ell(mu_i + s_{t-1} r_{phi_{t-1}}(u_{t-1,i}), g_{t,i})
         J_phi(phi) = 1 / (K sbar_t^2) * sum_{i in S_t} ell(mu_{t-1,i} + s_{t-1} r_phi(u_{t-1,i}),
                                                      g_{t,i}),   sbar_t = max(s_{t-1}, s_t)
  (D5) inner step mu_t  = alpha * mu_{t-1} - eta * dJ_mu/dmu (mu_{t-1})
                         (= alpha mu_{t-1} - eta d ell(p_t, g_t)/dp, elementwise)
                  phi_t = phi_0 + alpha * (phi_{t-1} - phi_0) - eta_phi * dJ_phi/dphi (phi_{t-1})
  (D6) read       o_t = mu_t / c_t + s_t r_{phi_t}(u_t),   p_{t+1} = mu_t + s_t r_{phi_t}(u_t)
  (D7) update     -lr * sigma(o_t)        (the lr and the sign come from the chain, see `dmgd`)

mu (one value per coordinate) is the linear memory, i.e. the classical momentum buffer;
phi is a small MLP shared by the coordinates of one tensor. A target that the features
cannot predict (i.i.d. noise around a mean) leaves r near 0 and mu (an average) does the
work; a predictable structure (e.g. a coordinate whose gradient alternates in sign) is
learned by r. Retention pulls phi towards phi_0 (w2 = 0: the memory starts linear; W1's
columns are unit directions spread over the half circle; b1 = 0), so a memory that stops
learning forgets back to plain momentum.

Cost. The read (D6) is the only MLP evaluation over all N coordinates (written per hidden
unit, so that XLA fuses it into one elementwise pass with no [N, H] array); the forecast
p_t is stored, not recomputed. phi's gradient (D4) is taken on the strided sample
S_t = {(t mod stride) + k * stride : k < K} of K <= `phi_sample` coordinates (of the
flattened tensor): stride = the smallest integer >= N / phi_sample that is coprime with the
tensor's last dimension (so the sample meets every column), K = N // stride; the sample
moves by one coordinate each step. The features u_{t-1} are stored on S_t only. J_phi is
the mean over the sample, an unbiased estimate of the mean over all coordinates; with
N <= phi_sample (or phi_sample = 0) S_t is every coordinate and the step is exact (its
gradient then holds [N, H] arrays: cheap for small tensors, slow for large ones). State
per tensor: mu, p (the size of the parameters), nu (sigma = nsqrt), u_{t-1} on S_t
([2, K]), s_{t-1}, phi: 3 buffers the size of the parameters with nsqrt (Adam: 2).

Stability. The scale is floored by the momentum's RMS, so a gradient that collapses (is
zero or tiny for some steps) while the momentum is not leaves the features and phi's
gradient bounded; the features are clipped to [-F, F] (F = `feature_bound`). With
e = d ell(p_t, g_t)/dp (p - g or -g), rms(e) <= rms(mu_{t-1}) + s_{t-1} |w2|_1 + rms(g_t)
<= (2 + |w2|_1) sbar_t, since |act| <= 1, |act'| <= 1 and s floors both RMS. dJ_phi/dphi
is s_{t-1} / sbar_t^2 times the sample mean of e * dr/dphi, so in the exact step one phi
step moves w2_j by at most eta_phi (2 + |w2|_1), b1_j by |w2_j| times that and W1 by F
|w2_j| times that, whatever the gradient's scale (with a sample: rms(e over S_t) / sbar_t
in place of 2 + |w2|_1); the read's residual is at most s_t |w2|_1.

Bias correction. With "l2", mu_t = rho mu_{t-1} + eta (g_t - s_{t-1} r), rho = alpha - eta
("dot": mu_t = alpha mu_{t-1} + eta g_t, rho = alpha): the weights of its inputs sum to
eta (1 - rho^t) / (1 - rho), a fraction c_t = 1 - rho^t of their limit, so, as Adam divides
its m by 1 - b1^t, the read divides mu_t by c_t (`debias`, default on; c_t = 1 when
debias is off or |rho| >= 1). With the defaults (alpha = 0.99, eta = 0.1, rho = 0.89) the
first update is 0.91 of Adam's (eta / (1 - rho), the steady-state ratio), not 0.1.

Reductions, both tested: with the linear memory (hidden = 0, or hidden > 0 with
eta_phi = 0 so that phi stays at phi_0 and r = 0), objective "dot", eta = 1, debias off
and sigma = identity, mu_t = alpha mu_{t-1} + g_t: heavy-ball momentum with beta = alpha
(optax.sgd(lr, momentum=alpha)). With "l2" and the linear memory, mu_t = (alpha - eta)
mu_{t-1} + eta g_t: an exponential average that follows a sign change of the gradient
within a few steps. Defaults alpha = 0.99, eta = 0.1: retention 0.89, steady state 0.91 g.

sigma:
  identity       o
  nsqrt          o / (sqrt(v_t / (1 - b2^t)) + eps),  v_t = b2 v_{t-1} + (1 - b2) g_t^2:
                 Adam's denominator (the memory's read takes the place of Adam's m).
  newton_schulz  matrices ([m, n]; 3-D / 4-D kernels reshaped to [prod(shape[:-1]),
                 shape[-1]]): o / |o|_F, then ns_steps quintic Newton-Schulz iterations
                 X <- a X + (b A + c A^2) X, A = X X^T (X transposed first if m > n),
                 (a, b, c) = (3.4445, -4.7750, 2.0315) (Jordan et al. 2024, "Muon: An
                 optimizer for hidden layers in neural networks"), times sqrt(max(m, n)) so
                 that the update's RMS is about 1; 0-D and 1-D: o / (rms(o) + eps), RMS 1.
"""

import math
from typing import Any, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import optax

OBJECTIVES = ("l2", "dot")
SIGMAS = ("identity", "nsqrt", "newton_schulz")
ACTIVATIONS = ("tanh", "cubic")
MUON_NS_COEFFS = (3.4445, -4.7750, 2.0315)


class DMGDState(NamedTuple):
  count: jax.Array   # [] int32, number of steps taken
  mu: Any            # momentum (the linear memory), like the params
  forecast: Any      # p_{t+1} of (D6), like the params; None (hidden = 0)
  u_prev: Any        # per tensor [2, K]: features u_t (D2) on the sample S_{t+1}; or None
  s_prev: Any        # per tensor []: the scale s_t (D2); or None (hidden = 0)
  nu: Any            # second moment of the gradient (sigma = nsqrt), else None
  phi: Any           # per tensor {"w1": [2, H], "b1": [H], "w2": [H]}, or None (hidden = 0)


def init_phi(hidden: int) -> dict:
  """phi_0: w2 = 0 (linear memory), W1 columns (cos theta_j, sin theta_j), b1 = 0."""
  theta = jnp.pi * jnp.arange(hidden, dtype=jnp.float32) / hidden
  return {"w1": jnp.stack([jnp.cos(theta), jnp.sin(theta)]),   # [2, H]
          "b1": jnp.zeros((hidden,), jnp.float32),
          "w2": jnp.zeros((hidden,), jnp.float32)}


def cubic_sigmoid(x: jax.Array) -> jax.Array:
  """y - 4 y^3 / 27, y = clip(x, -1.5, 1.5): odd, slope 1 at 0, C^1, +-1 for |x| >= 1.5."""
  y = jnp.clip(x, -1.5, 1.5)
  return y * (1.0 - (4.0 / 27.0) * y * y)


def _act(activation: str):
  return jnp.tanh if activation == "tanh" else cubic_sigmoid


def residual(phi: dict, a: jax.Array, b: jax.Array, activation: str) -> jax.Array:
  """r_phi(u) = w2 . act(W1^T u + b1) per coordinate (D1), u = (a, b): [...] -> [...].

  Written per hidden unit (H is small) rather than as an [..., H] tensor: XLA then fuses
  the units into one elementwise pass with no [N, H] intermediate.
  """
  w1, b1, w2 = phi["w1"], phi["b1"], phi["w2"]
  pre = lambda j: a * w1[0, j] + (b * w1[1, j] + b1[j])
  if activation == "tanh":
    return sum(w2[j] * jnp.tanh(pre(j)) for j in range(b1.shape[0]))
  # w2 * (y - 4 y^3 / 27) = y * (w2 + c y^2), c = -4 w2 / 27: after the clip, y^2 and two
  # multiply-adds per unit instead of six operations (the read is compute-bound on CPU).
  c = (-4.0 / 27.0) * w2
  out = 0.0
  for j in range(b1.shape[0]):
    y = jnp.clip(pre(j), -1.5, 1.5)
    out = out + y * (w2[j] + c[j] * (y * y))
  return out


def residual_on_sample(phi: dict, u: jax.Array, activation: str) -> jax.Array:
  """r_phi(u) (D1) for features u: [2, K] -> [K], as matrix products (one [K, H] array)."""
  return _act(activation)(jnp.einsum("ck,ch->kh", u, phi["w1"]) + phi["b1"]) @ phi["w2"]


def sample_layout(shape: Tuple[int, ...], phi_sample: int) -> Tuple[int, int]:
  """(stride, K) of the sample S_t of (D4) for a tensor of this shape; (1, N): all."""
  n = math.prod(shape)
  if phi_sample <= 0 or n <= phi_sample:
    return 1, n
  stride = -(-n // phi_sample)
  while math.gcd(stride, shape[-1]) != 1:
    stride += 1
  return stride, n // stride


def take_sample(x: jax.Array, stride: int, k: int, offset: jax.Array) -> jax.Array:
  """x.ravel()[offset + stride * arange(k)], 0 <= offset < stride: [...] -> [K]."""
  flat = x.reshape(-1)
  if stride == 1:
    return flat
  return jax.lax.dynamic_index_in_dim(flat[:k * stride].reshape(k, stride), offset, axis=1,
                                      keepdims=False)


def newton_schulz(x: jax.Array, steps: int, eps: float = 1e-8) -> jax.Array:
  """Approximately orthogonal factor U V^T of x = U S V^T: [m, n] -> [m, n].

  x / |x|_F, then `steps` quintic iterations X <- a X + (b A + c A^2) X, A = X X^T, with
  Muon's (a, b, c); X is transposed first when m > n so that A is the smaller Gram matrix.
  The singular values end near 1 (roughly in [0.7, 1.2]), not exactly 1.
  """
  a, b, c = MUON_NS_COEFFS
  tall = x.shape[0] > x.shape[1]
  if tall:
    x = x.T
  x = x / (jnp.sqrt(jnp.sum(jnp.square(x))) + eps)
  for _ in range(steps):
    gram = x @ x.T                                                 # [min, min]
    x = a * x + (b * gram + c * (gram @ gram)) @ x
  return x.T if tall else x


def orthogonalise(o: jax.Array, ns_steps: int, eps: float) -> jax.Array:
  """sigma = newton_schulz of the module doc, any rank; the result's RMS is about 1."""
  if o.ndim < 2:
    return o / (jnp.sqrt(jnp.mean(jnp.square(o))) + eps)
  m = o.reshape(-1, o.shape[-1])                                   # [prod(shape[:-1]), n]
  return (newton_schulz(m, ns_steps, eps) * math.sqrt(max(m.shape))).reshape(o.shape)


def _power(base: float, t: jax.Array) -> jax.Array:
  """base ** t for a float base of either sign and an integer array t >= 0."""
  mag = abs(base) ** t.astype(jnp.float32)
  return mag if base >= 0 else jnp.where(t % 2 == 0, mag, -mag)


def _inner_grad(objective: str, p: jax.Array, g: jax.Array) -> jax.Array:
  """d ell(p, g) / d p (D4)."""
  if objective == "dot":
    return -g
  return p - g


def scale_by_dmgd(hidden: int = 8,
                  inner_lr: float = 0.1,
                  objective: str = "l2",
                  alpha: float = 0.99,
                  sigma: str = "nsqrt",
                  ns_steps: int = 5,
                  b2: float = 0.999,
                  eps: float = 1e-8,
                  phi_lr: Optional[float] = None,
                  phi_sample: int = 16384,
                  feature_bound: float = 8.0,
                  debias: bool = True,
                  activation: str = "cubic") -> optax.GradientTransformation:
  """The direction sigma(o_t) of (D1)-(D7) (no learning rate, no sign flip).

  Args:
    hidden: H, hidden units of the residual MLP r_phi; 0: linear memory (no phi).
    inner_lr: eta, the step of mu on J_mu.
    objective: ell, "l2" or "dot".
    alpha: retention of mu and of phi - phi_0.
    sigma: "identity" | "nsqrt" | "newton_schulz".
    ns_steps: Newton-Schulz iterations (sigma = newton_schulz).
    b2, eps: nsqrt's second-moment decay; eps in scales and denominators.
    phi_lr: eta_phi, the step of phi on J_phi; None: inner_lr.
    phi_sample: at most this many coordinates per tensor in J_phi; 0: all (exact).
    feature_bound: F, the features' clip.
    debias: divide mu_t by c_t = 1 - rho^t in the read.
    activation: "tanh" | "cubic", the MLP's activation.
  """
  if objective not in OBJECTIVES:
    raise ValueError(f"dmgd objective must be one of {OBJECTIVES}, got {objective!r}")
  if sigma not in SIGMAS:
    raise ValueError(f"dmgd sigma must be one of {SIGMAS}, got {sigma!r}")
  if activation not in ACTIVATIONS:
    raise ValueError(f"dmgd activation must be one of {ACTIVATIONS}, got {activation!r}")
  if hidden < 0:
    raise ValueError(f"dmgd hidden must be >= 0, got {hidden}")
  eta_phi = inner_lr if phi_lr is None else phi_lr
  rho = alpha - inner_lr if objective == "l2" else alpha
  debias = debias and 0.0 < abs(rho) < 1.0

  def init_fn(params):
    zeros = lambda p: jnp.zeros(jnp.shape(p), jnp.float32)
    deep = lambda f: jax.tree.map(f, params) if hidden else None
    return DMGDState(
        count=jnp.zeros([], jnp.int32),
        mu=jax.tree.map(zeros, params),
        forecast=deep(zeros),
        u_prev=deep(lambda p: jnp.zeros(
            (2, sample_layout(jnp.shape(p), phi_sample)[1]), jnp.float32)),
        s_prev=deep(lambda p: jnp.zeros([], jnp.float32)),
        nu=jax.tree.map(zeros, params) if sigma == "nsqrt" else None,
        phi=deep(lambda _: init_phi(hidden)))

  def rms(x):
    return jnp.sqrt(jnp.mean(jnp.square(x)))

  def leaf_update(g, mu, forecast, u_prev, s_prev, nu, phi, count):
    g = g.astype(jnp.float32)
    if phi is None:                                   # linear memory: p_t = mu_{t-1}
      new_mu = alpha * mu - inner_lr * _inner_grad(objective, mu, g)
      new = (None, None, None, None)
    else:
      # (D5) mu's step, from the stored forecast p_t (D3).
      d_p = _inner_grad(objective, forecast, g)       # d ell(p_t, g_t) / dp, like g
      new_mu = alpha * mu - inner_lr * d_p
      s = jnp.maximum(rms(g), rms(new_mu)) + eps      # (D2)
      s_bar = jnp.maximum(s_prev, s)
      # (D5) phi's step: gradient of J_phi on the sample S_t (features u_{t-1} stored there).
      stride, k = sample_layout(g.shape, phi_sample)
      cot = take_sample(d_p, stride, k, count % stride) * (s_prev / (k * s_bar ** 2))  # [K]
      _, vjp = jax.vjp(lambda q: residual_on_sample(q, u_prev, activation), phi)
      (d_phi,) = vjp(cot)
      new_phi = jax.tree.map(lambda q, q0, dq: q0 + alpha * (q - q0) - eta_phi * dq,
                             phi, init_phi(hidden), d_phi)
      # (D6) the read at u_t: the one MLP evaluation over all coordinates. Its value has
      # one consumer, p_{t+1}, and o_t is formed from p_{t+1}: XLA then computes the H
      # activations in one fused pass instead of materialising each of them.
      inv_s = 1.0 / s          # one division per tensor, not two per coordinate
      features = lambda x: jnp.clip(x * inv_s, -feature_bound, feature_bound)
      new_forecast = new_mu + s * residual(new_phi, features(g), features(new_mu), activation)
      offset = (count + 1) % stride
      u_next = features(jnp.stack([take_sample(g, stride, k, offset),
                                   take_sample(new_mu, stride, k, offset)]))  # [2, K]
      new = (new_forecast, u_next, s, new_phi)
      # o's pass reads u_next (0 * one of its values): XLA then takes the sample of g
      # before the update is written, and may write the update into g's buffer (inside
      # a CMS level's lax.cond, the accumulator's) instead of a temporary one.
      ordered = 0.0 * u_next[0, 0]
    c = (1.0 - _power(rho, count)) if debias else 1.0
    if phi is None:
      o = new_mu / c
    else:                                             # mu_t / c_t + s_t r = p_{t+1} + ...
      o = new_forecast + (1.0 / c - 1.0) * new_mu + ordered
    new_nu = None
    if sigma == "nsqrt":
      # ((1 - b2) g) g, not (1 - b2) g^2: no g^2 shared with rms(g), which XLA would
      # otherwise materialise as a full-size array.
      new_nu = b2 * nu + ((1.0 - b2) * g) * g
      nu_hat = new_nu / (1.0 - b2 ** count.astype(jnp.float32))
      o = o / (jnp.sqrt(nu_hat) + eps)
    elif sigma == "newton_schulz":
      o = orthogonalise(o, ns_steps, eps)
    return (o, new_mu) + new + (new_nu,)

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    leaves, treedef = jax.tree.flatten(updates)
    none = [None] * len(leaves)
    per_leaf = lambda tree: none if tree is None else treedef.flatten_up_to(tree)
    out = [leaf_update(g, *rest, count) for g, *rest in zip(
        leaves, per_leaf(state.mu), per_leaf(state.forecast), per_leaf(state.u_prev),
        per_leaf(state.s_prev), per_leaf(state.nu), per_leaf(state.phi))]
    field = lambda k, tree: None if tree is None else treedef.unflatten([x[k] for x in out])
    new_updates = treedef.unflatten([x[0].astype(g.dtype) for x, g in zip(out, leaves)])
    new_state = DMGDState(count=count, mu=field(1, state.mu),
                          forecast=field(2, state.forecast), u_prev=field(3, state.u_prev),
                          s_prev=field(4, state.s_prev), phi=field(5, state.phi),
                          nu=field(6, state.nu))
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
         mask: Optional[Any] = None,
         phi_lr: Optional[float] = None,
         phi_sample: int = 16384,
         feature_bound: float = 8.0,
         debias: bool = True,
         activation: str = "cubic") -> optax.GradientTransformation:
  """(D7) with decoupled weight decay: W <- W - lr * (sigma(o_t) + wd * W).

  The other arguments are those of `scale_by_dmgd`.
  """
  parts = [scale_by_dmgd(hidden, inner_lr, objective, alpha, sigma, ns_steps, b2, eps,
                         phi_lr, phi_sample, feature_bound, debias, activation)]
  if weight_decay:
    parts.append(optax.add_decayed_weights(weight_decay, mask))
  parts.append(optax.scale_by_learning_rate(learning_rate))
  return optax.chain(*parts)
