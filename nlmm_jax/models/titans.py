"""Self-modifying Titans memory: the memory of the HOPE block (after paper Sec. 8,
Eq. 83-93; how it differs is stated below).

Every projection except the query is a memory that learns in context. Per head (x_t^h the
head's slice of the block input x_t, e = d / H):

  q_t      = x_t W_q                               static projection (its head slice)
  k_t      = norm(M_k,t-1(x_t^h))                  keys, unit L2 norm
  v_t      = norm(M_v,t-1(x_t^h))                  values, unit L2 norm
  eta_t    = ETA_MAX sigmoid(w_eta . M_eta,t-1(x_t^h) + b_eta)      inner rate
  alpha_t  = sigmoid(w_alpha . M_alpha,t-1(x_t^h) + b_alpha)        retention
  y_t      = M_memory,t-1(norm(q_t))               the read-out

and each memory M_c (c in k, v, eta, alpha, memory) generates its own target and takes
one step of delta gradient descent with weight decay (DGD, Eq. 88) on its L2 objective:

  v_hat_c,t = M_c,t-1(v_t)
  W_c,t     = (alpha_t I - eta_t k_t^T k_t) W_c,t-1 - eta_t grad_W |M_c(k_t; W) - v_hat_c,t|^2
              (gradient at W_c,t-1, v_hat a constant of the inner objective)

Eq. 88 is written for a matrix memory read as M k; this code reads row vectors (k W), so
the factor (alpha I - eta k k^T) on the memory's input side multiplies W from the left.
For a deep memory the paper leaves open which layers carry the factor: here the layer
whose input is k_t (W1 of the MLP, W of the linear memory) takes the full Eq. 88 step, and
the MLP's second layer W2 (whose input is the hidden activation, not the key) takes the
same step without the input-side term, alpha_t W2 - eta_t grad_W2.

A memory is a residual two-layer MLP, M(x) = x + silu(x W1) W2 (the paper's residual MLP
memories, Eq. 89/91; `hidden` = n units), or a residual linear one, M(x) = x + x W
(`hidden` = 0; a plain x W with a self-generated target M(v) collapses to W = 0). The
initial states theta_c,0 are parameters of the outer training loop, as are W_q, the rate
read-outs (w, b) and the output projection. Further deviations: eta_t and alpha_t are
scalars per head, read out of M_eta / M_alpha by a static linear map and a sigmoid;
values are unit-norm and eta_t < ETA_MAX (without both the memories diverged within
10-30 tokens in the tests' settings); memories act on the head's slice of x_t, so the
heads mix only through W_q and the output projection.

Token t reads the states left by tokens < t (index t-1 above), so an output never depends
on a later token (causal), and a padded token (mask False) writes nothing (eta = 0,
alpha = 1) and reads nothing (y = 0).

Two forms of one contract:
  `recurrent`: `lax.scan` over tokens, one update per token (the oracle).
  `chunked` (Sec. 8.2): within a chunk of C tokens every quantity above and every
    gradient is taken at the chunk's starting state W_0, in parallel, and the chunk's C
    steps are then applied in closed form. The second layer's steps are linear in W2:
      W2_end = (prod_i alpha_i) W2_0 - sum_i eta_i (prod_{j>i} alpha_j) grad_i(W_0),
    one gradient of the weighted sum of the token objectives. The input-side layer's
    steps, W_i = alpha_i W_{i-1} - eta_i k_i^T (k_i W_{i-1} + d_i) with d_i the gradient
    of token i's objective at its pre-activation k_i W_0, form a gated delta rule:
    with gamma_i = prod_{j<=i} alpha_j, W_i = gamma_i W_0 + sum_{j<=i} (gamma_i/gamma_j)
    k_j^T u_j, where the rows u solve the unit lower-triangular system
      u_i + eta_i sum_{j<i} (gamma_{i-1}/gamma_j) (k_i . k_j) u_j
          = -eta_i (gamma_{i-1} k_i W_0 + d_i)
    (one triangular inverse per chunk instead of C sequential steps). C = 1 is the
    recurrent form; C > 1 trades the within-chunk gradients for parallel work.
    Chunks are C consecutive tokens from the first one (the last one padded), so a
    token's chunk does not depend on how much padding follows the sequence.

Bidirectional: the causal pass plus the causal pass over the time-reversed sequence, summed
(as `fast_weights.fast_weight_memory`); each row's real tokens are reversed in place
(padding, a suffix of the row, stays at the end). States and accumulation are fp32.
"""

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from nlmm_jax.models import fast_weights

Array = jax.Array

MEMORIES = ("k", "v", "eta", "alpha", "memory")
FORMS = fast_weights.FORMS
DIRECTIONS = fast_weights.DIRECTIONS
HIGHEST = jax.lax.Precision.HIGHEST
# Inner rates in (0, ETA_MAX): the DGD factor alone has eigenvalue alpha - eta along k
# (|k| = 1), and a residual linear memory's gradient adds at most 2 eta |k - v|^2 <= 8 eta
# along k - v. Over 64 random tokens at the largest rate and no forgetting, the linear
# memories' read-outs grew 5-30 times with ETA_MAX = 1 and stayed of their first size at
# 0.45 (tests/test_titans.py, test_memories_stay_bounded_at_the_largest_rate).
ETA_MAX = 0.45


def memory_apply(theta: dict, x: Array) -> Array:
  """M(x; theta) for states theta [B, H, ...] and inputs x [B, H, T, e] -> [B, H, T, e]."""
  mm = functools.partial(jnp.einsum, precision=HIGHEST)
  if "w" in theta:                                     # linear: x + x W
    return x + mm("bhte,bhef->bhtf", x, theta["w"])
  hidden = jax.nn.silu(mm("bhte,bhen->bhtn", x, theta["w1"]))
  return x + mm("bhtn,bhne->bhte", hidden, theta["w2"])


def read_token_quantities(states: dict, readout: dict, x: Array, q: Array,
                          m: Array) -> tuple[Array, Array, Array, Array, Array]:
  """Eq. 83-87 at the given states for tokens x, q [B, H, T, e], mask m [B, H, T].

  Returns k, v [B, H, T, e], eta, log alpha [B, H, T] (pads: 0 and 0), y [B, H, T, e].
  """
  k = fast_weights.normalize_heads(memory_apply(states["k"], x), "l2")
  v = fast_weights.normalize_heads(memory_apply(states["v"], x), "l2")

  def logit(name):                                     # [B, H, T]
    out = memory_apply(states[name], x)
    return jnp.einsum("bhte,he->bht", out, readout[f"{name}_w"],
                      precision=HIGHEST) + readout[f"{name}_b"][:, None]
  eta = ETA_MAX * jax.nn.sigmoid(logit("eta")) * m
  log_alpha = jax.nn.log_sigmoid(logit("alpha")) * m
  y = memory_apply(states["memory"], fast_weights.normalize_heads(q, "l2")) * m[..., None]
  return k, v, eta, log_alpha, y


def _objective(theta: dict, k: Array, v_hat: Array, weight: Array) -> Array:
  """sum_{b,h,t} weight |M(k; theta) - v_hat|^2 (each [b, h] slice its own memory)."""
  err = memory_apply(theta, k) - v_hat
  return jnp.sum(weight * jnp.sum(jnp.square(err), axis=-1))


def _decay(theta: dict, factor: Array) -> dict:
  """factor [B, H] times every array of theta [B, H, ...]."""
  return jax.tree.map(lambda w: w * factor.reshape(factor.shape + (1,) * (w.ndim - 2)), theta)


def _sub(a: dict, b: dict) -> dict:
  return jax.tree.map(jnp.subtract, a, b)


def input_layer(theta: dict) -> str:
  """The name of the weight whose input is the key (the one Eq. 88's factor acts on)."""
  return "w" if "w" in theta else "w1"


def titans_recurrent(states: dict, readout: dict, x: Array, q: Array,
                     mask: Optional[Array] = None) -> Array:
  """The oracle: one token at a time. states {c: theta_c [B, H, ...]}, x, q [B, H, T, e],
  mask [B, T] -> y [B, H, T, e] fp32."""
  b, h, t, _ = x.shape
  m = jnp.ones((b, h, t), jnp.float32) if mask is None else jnp.broadcast_to(
      mask[:, None, :].astype(jnp.float32), (b, h, t))

  def step(states, inputs):
    x_t, q_t, m_t = inputs                             # [B, H, 1, e], [B, H, 1, e], [B, H, 1]
    k, v, eta, log_alpha, y = read_token_quantities(states, readout, x_t, q_t, m_t)
    eta, k_row = eta[..., 0], k[:, :, 0]               # [B, H], [B, H, e]
    new = {}
    for c in MEMORIES:
      v_hat = memory_apply(states[c], v)

      def token_loss(theta, v_hat=v_hat):              # one token, each [b, h] on its own
        return _objective(theta, k, v_hat, jnp.ones_like(m_t))
      grad = jax.grad(token_loss)(states[c])
      new[c] = _sub(_decay(states[c], jnp.exp(log_alpha[..., 0])), _decay(grad, eta))
      # Eq. 88's input-side term: - eta k^T (k W), W the state before this token.
      name = input_layer(states[c])
      read = jnp.einsum("bhe,bhen->bhn", k_row, states[c][name], precision=HIGHEST)
      new[c][name] = new[c][name] - eta[..., None, None] * jnp.einsum(
          "bhe,bhn->bhen", k_row, read, precision=HIGHEST)
    return new, y[:, :, 0]

  tokens = lambda a: jnp.moveaxis(a, 2, 0)[:, :, :, None]   # [T, B, H, 1, ...]
  _, ys = jax.lax.scan(step, states, (tokens(x), tokens(q), tokens(m)))
  return jnp.moveaxis(ys, 0, 2)                        # [B, H, T, e]


def _preactivation_grads(theta: dict, k: Array, v_hat: Array) -> Array:
  """d_i = d|M(k_i; theta) - v_hat_i|^2 / dz_i at z_i = k_i W (W the input layer):
  k, v_hat [B, H, C, e] -> [B, H, C, n] (tokens independent, so one gradient of the sum)."""
  w = theta[input_layer(theta)]
  z = jnp.einsum("bhce,bhen->bhcn", k, w, precision=HIGHEST)

  def loss(z):
    if "w" in theta:
      out = k + z
    else:
      out = k + jnp.einsum("bhcn,bhne->bhce", jax.nn.silu(z), theta["w2"], precision=HIGHEST)
    return jnp.sum(jnp.square(out - v_hat))
  return jax.grad(loss)(z)


def dgd_chunk(w0: Array, k: Array, d: Array, eta: Array, log_alpha: Array) -> Array:
  """The input layer's C steps of Eq. 88 in closed form (module docstring, `chunked`).

  w0 [B, H, e, n], keys k [B, H, C, e], pre-activation gradients d [B, H, C, n] at w0,
  eta, log alpha [B, H, C] (pads 0, 0) -> W after the chunk [B, H, e, n].
  """
  c = k.shape[2]
  log_gamma = jnp.cumsum(log_alpha, axis=-1)           # [B, H, C]  log gamma_i
  log_prev = log_gamma - log_alpha                     # log gamma_{i-1}
  lower = jnp.tril(jnp.ones((c, c), bool), -1)         # j < i
  # The exponent is masked before exp: above the diagonal it is positive and may overflow.
  gap = jnp.where(lower, log_prev[..., :, None] - log_gamma[..., None, :], 0.0)
  gram = jnp.einsum("bhie,bhje->bhij", k, k, precision=HIGHEST)
  a = jnp.where(lower, eta[..., :, None] * jnp.exp(gap) * gram, 0.0)       # [B, H, C, C]
  read = jnp.einsum("bhce,bhen->bhcn", k, w0, precision=HIGHEST)
  r = -eta[..., None] * (jnp.exp(log_prev)[..., None] * read + d)          # [B, H, C, n]
  # The fast-weight memory's matmul-only inverse: XLA's CPU triangular solve inside a
  # scan stalled a 2-device training run here (all threads waiting, no progress).
  u = jnp.einsum("bhij,bhjn->bhin", fast_weights.unit_lower_inverse(a), r,
                 precision=HIGHEST)
  tail = jnp.exp(log_gamma[..., -1:] - log_gamma)      # gamma_C / gamma_j
  return jnp.exp(log_gamma[..., -1])[..., None, None] * w0 + jnp.einsum(
      "bhce,bhcn->bhen", k * tail[..., None], u, precision=HIGHEST)


def chunk_update(states: dict, readout: dict, x: Array, q: Array,
                 m: Array) -> tuple[dict, Array]:
  """One chunk (Sec. 8.2): outputs y [B, H, C, e] at the chunk's starting states, and the
  states after the chunk's C steps (module docstring)."""
  k, v, eta, log_alpha, y = read_token_quantities(states, readout, x, q, m)  # [B, H, C]
  total = jnp.sum(log_alpha, axis=-1)                  # log prod_i alpha_i
  after = total[..., None] - jnp.cumsum(log_alpha, axis=-1)   # log prod_{j>i} alpha_j
  weight = eta * jnp.exp(after)                        # eta_i prod_{j>i} alpha_j
  new = {}
  for c in MEMORIES:
    v_hat = memory_apply(states[c], v)
    name = input_layer(states[c])
    d = _preactivation_grads(states[c], k, v_hat)
    new[c] = {name: dgd_chunk(states[c][name], k, d, eta, log_alpha)}
    if "w2" in states[c]:                              # plain retention + GD on W2
      grad = jax.grad(_objective)(states[c], k, v_hat, weight)["w2"]
      new[c]["w2"] = jnp.exp(total)[..., None, None] * states[c]["w2"] - grad
  return new, y


def titans_chunked(states: dict, readout: dict, x: Array, q: Array,
                   mask: Optional[Array] = None, chunk_size: int = 16) -> Array:
  """Chunk-parallel form; same contract as `titans_recurrent` (equal for chunk_size 1)."""
  b, h, t, e = x.shape
  m = jnp.ones((b, t), jnp.float32) if mask is None else mask.astype(jnp.float32)
  # Fixed chunks of C from the first token (unlike the fast-weight memory's balanced
  # chunks, which are exact for every split): here the chunk boundaries change the
  # result, so they must not depend on the padded length T.
  c = max(1, min(int(chunk_size), t))
  n = -(-t // c)
  pad = n * c - t
  if pad:
    x = jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0)))
    q = jnp.pad(q, ((0, 0), (0, 0), (0, pad), (0, 0)))
    m = jnp.pad(m, ((0, 0), (0, pad)))
  m = jnp.broadcast_to(m[:, None, :], (b, h, n * c))
  chunks = lambda a: jnp.moveaxis(a.reshape(b, h, n, c, *a.shape[3:]), 2, 0)  # [n, B, H, C, ...]

  def step(states, inputs):
    return chunk_update(states, readout, *inputs)
  _, ys = jax.lax.scan(step, states, (chunks(x), chunks(q), chunks(m)))
  y = jnp.moveaxis(ys, 0, 2).reshape(b, h, n * c, e)
  return y[:, :, :t]


def titans_memory(states: dict, readout: dict, x: Array, q: Array,
                  mask: Optional[Array] = None, *, form: str = "chunked",
                  chunk_size: int = 16, direction: str = "causal") -> Array:
  """Read-out [B, H, T, e] of the self-modifying memory, dispatching form and direction."""
  if form == "recurrent":
    fn = titans_recurrent
  elif form == "chunked":
    fn = functools.partial(titans_chunked, chunk_size=chunk_size)
  else:
    raise ValueError(f"hope.form must be one of {FORMS}, got {form!r}")
  if direction not in DIRECTIONS:
    raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
  y = fn(states, readout, x, q, mask)
  if direction == "causal":
    return y
  flip = functools.partial(reverse_real_tokens, mask=mask)
  return y + flip(fn(states, readout, flip(x), flip(q), mask))


def reverse_real_tokens(a: Array, mask: Optional[Array]) -> Array:
  """a [B, H, T, ...] with each row's real tokens (a prefix, mask [B, T]) in reverse order
  and its padding left at the end, so the backward pass's chunks start at the last real
  token whatever the padded length (its own inverse)."""
  t = a.shape[2]
  if mask is None:
    return jnp.flip(a, 2)
  length = jnp.sum(mask, axis=1).astype(jnp.int32)[:, None]     # [B, 1]
  pos = jnp.arange(t)[None, :]
  idx = jnp.where(pos < length, length - 1 - pos, pos)          # [B, T]
  idx = idx.reshape(idx.shape[0], 1, t, *([1] * (a.ndim - 3)))
  return jnp.take_along_axis(a, idx, axis=2)


class SelfModifyingMemory(nn.Module):
  """The HOPE block's memory layer: x [B, T, d], mask [B, T] -> [B, T, d] (module docstring).

  Parameters: `query` (W_q), `out` (output projection), the initial states
  `M_<c>_w1` [H, e, n], `M_<c>_w2` [H, n, e] (or `M_<c>_w` [H, e, e] when `hidden` = 0)
  of the five memories, and the rate read-outs `<eta|alpha>_w` [H, e], `_b` [H].
  """
  width: int
  heads: int
  hidden: int = 32                    # n: hidden units of each memory MLP; 0: linear memories
  form: str = "chunked"
  chunk_size: int = 16
  direction: str = "causal"
  dtype: Any = jnp.float32

  def _initial_states(self, e: int) -> dict:
    h, n = self.heads, self.hidden
    states = {}
    for c in MEMORIES:
      if n:   # W2 starts small: each memory starts near the identity map
        states[c] = dict(
            w1=self.param(f"M_{c}_w1", nn.initializers.normal(e ** -0.5), (h, e, n)),
            w2=self.param(f"M_{c}_w2", nn.initializers.normal(0.02), (h, n, e)))
      else:
        states[c] = dict(w=self.param(f"M_{c}_w", nn.initializers.normal(e ** -0.5), (h, e, e)))
    return states

  @nn.compact
  def __call__(self, x: Array, mask: Optional[Array] = None) -> Array:
    b, t, d = x.shape                                 # [B, T, d]
    h = self.heads
    if self.width % h or d != self.width:
      raise ValueError(f"width {self.width} (input {d}) not divisible by heads {h}")
    e = d // h
    heads_first = lambda a: a.reshape(b, t, h, e).transpose(0, 2, 1, 3).astype(jnp.float32)
    q = heads_first(nn.Dense(d, use_bias=False, dtype=self.dtype, name="query")(x))
    xs = heads_first(x)                               # [B, H, T, e]: the memories' input
    readout = {}
    for name, bias in (("eta", -2.0), ("alpha", 4.0)):  # eta ~ 0.12, alpha ~ 0.98 at init
      readout[f"{name}_w"] = self.param(f"{name}_w", nn.initializers.normal(e ** -0.5), (h, e))
      readout[f"{name}_b"] = self.param(f"{name}_b", nn.initializers.constant(bias), (h,))
    states = jax.tree.map(lambda p: jnp.broadcast_to(p[None], (b,) + p.shape),
                          self._initial_states(e))
    y = titans_memory(states, readout, xs, q, mask, form=self.form,
                      chunk_size=self.chunk_size, direction=self.direction)
    y = y.transpose(0, 2, 1, 3).reshape(b, t, d).astype(self.dtype)
    return nn.Dense(d, use_bias=False, dtype=self.dtype, name="out")(y)
