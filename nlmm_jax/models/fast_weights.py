"""Fast-weight associative memory (design section 3; paper Eq. 64-65).

Per head, a state S in R^{e_k x e_v} (row convention: y_t = q_t S_t, q_t a row vector)
is written token by token:

  hebbian (Eq. 64, linear attention):  S_t = lam_t S_{t-1} + k_t^T v_t
  delta   (Eq. 65, DeltaNet):          S_t = alpha_t (I - beta_t k_t^T k_t) S_{t-1}
                                               + beta_t k_t^T v_t
  read:                                y_t = q_t S_t

(the design's column convention S_t q_t is the transpose of this one). lam_t = 1 - decay
on real tokens; alpha_t is the optional gate of the gated delta rule (alpha_t = 1: plain
DeltaNet). Both decays are handled as per-token log-decays g_t (g_t = 0 on padding).

Padding: a padded token writes nothing (k_t = 0, beta_t = 0), does not decay the state
(g_t = 0) and reads nothing (y_t = 0). Hence the outputs on a sequence's real tokens do
not depend on how much padding follows it, and the backward pass of the bidirectional
form (padding then at the front) starts from a zero state at each row's last real token.

Two forms of one contract (same outputs and gradients to ~1e-5 in fp32):
  `memory_recurrent`: lax.scan over tokens (the oracle).
  `memory_chunked`:   lax.scan over chunks of C tokens with matmuls inside a chunk; the
                      delta rule uses the WY / UT representation (triangular solve).
States and accumulation are fp32 whatever the input dtype.
"""

import functools
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

RULES = ("hebbian", "delta")
FORMS = ("recurrent", "chunked")
DIRECTIONS = ("causal", "bidirectional")
# Chunk scans this short are unrolled: a loop of a few tiny steps costs more than its body
# on a CPU (batch-64 demo step 0.63 -> 0.59 s); longer ones stay a loop (compile time).
UNROLL_MAX_CHUNKS = 8


def _prepare(q, k, v, beta, alpha, mask, rule, decay):
  """Casts to fp32 and applies the padding rules.

  Returns q, k, v [B, H, T, e], beta [B, H, T] (delta; None for hebbian),
  g [B, H, T] per-token log-decay, m [B, H, T] fp32 mask.
  """
  if rule not in RULES:
    raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
  q, k, v = (jnp.asarray(a, jnp.float32) for a in (q, k, v))
  b, h, t, _ = q.shape
  if mask is None:
    m = jnp.ones((b, h, t), jnp.float32)
  else:
    m = jnp.broadcast_to(jnp.asarray(mask, jnp.float32)[:, None, :], (b, h, t))
  k = k * m[..., None]                                # padding writes nothing
  if rule == "delta":
    if beta is None:
      raise ValueError("the delta rule needs beta [B, H, T]")
    beta = jnp.asarray(beta, jnp.float32) * m
    if alpha is None:
      g = jnp.zeros((b, h, t), jnp.float32)
    else:
      alpha = jnp.asarray(alpha, jnp.float32)
      g = jnp.log(jnp.maximum(alpha, 1e-30)) * m      # no decay on padding
  else:
    if not 0.0 <= decay < 1.0:
      raise ValueError(f"hebbian decay must be in [0, 1), got {decay}")
    beta = None
    g = jnp.full((b, h, t), math.log1p(-decay), jnp.float32) * m
  return q, k, v, beta, g, m


def memory_recurrent(q: Array, k: Array, v: Array, beta: Optional[Array] = None,
                     alpha: Optional[Array] = None, mask: Optional[Array] = None, *,
                     rule: str, decay: float = 0.0, precision: Any = None) -> Array:
  """Causal fast-weight memory, one token at a time (Eq. 64-65). The oracle.

  q, k, v: [B, H, T, e]; beta, alpha: [B, H, T]; mask: [B, T] bool. Returns [B, H, T, e_v]
  in fp32.
  """
  q, k, v, beta, g, m = _prepare(q, k, v, beta, alpha, mask, rule, decay)
  b, h, _, ek = q.shape
  ev = v.shape[-1]
  ein = functools.partial(jnp.einsum, precision=precision)

  def step(s, inputs):                                # s: [B, H, e_k, e_v]
    q_t, k_t, v_t, b_t, g_t = inputs                  # [B, H, e] x3, [B, H] x2
    s = jnp.exp(g_t)[..., None, None] * s
    if rule == "delta":
      r = v_t - ein("bhk,bhkv->bhv", k_t, s)          # v_t - k_t S  (prediction error)
      s = s + ein("bhk,bhv->bhkv", k_t, b_t[..., None] * r)
    else:
      s = s + ein("bhk,bhv->bhkv", k_t, v_t)
    y_t = ein("bhk,bhkv->bhv", q_t, s)
    return s, y_t

  if beta is None:
    beta = jnp.zeros_like(g)
  to_time = lambda a: jnp.moveaxis(a, 2, 0)
  s0 = jnp.zeros((b, h, ek, ev), jnp.float32)
  _, y = jax.lax.scan(step, s0, tuple(map(to_time, (q, k, v, beta, g))))
  y = jnp.moveaxis(y, 0, 2)                           # [B, H, T, e_v]
  return y * m[..., None]


def _unit_lower_inverse(a: Array, precision: Any = None) -> Array:
  """(I + A)^{-1} for strictly lower-triangular A [..., C, C], by blocked substitution.

  Recursive 2x2 blocks: inv([[L11, 0], [L21, L22]]) = [[X11, 0], [-X22 L21 X11, X22]],
  down to rows solved one at a time. Only matmuls, no LAPACK call inside the scan (XLA's
  CPU triangular solve under vmap/scan was both slow and prone to stalls).
  """
  c = a.shape[-1]
  if c == 1:
    return jnp.ones_like(a)
  h = c // 2
  x11 = _unit_lower_inverse(a[..., :h, :h], precision)
  x22 = _unit_lower_inverse(a[..., h:, h:], precision)
  x21 = -jnp.einsum("...ij,...jk,...kl->...il", x22, a[..., h:, :h], x11,
                    precision=precision)
  top = jnp.concatenate([x11, jnp.zeros(a.shape[:-2] + (h, c - h), a.dtype)], axis=-1)
  bottom = jnp.concatenate([x21, x22], axis=-1)
  return jnp.concatenate([top, bottom], axis=-2)


def memory_chunked(q: Array, k: Array, v: Array, beta: Optional[Array] = None,
                   alpha: Optional[Array] = None, mask: Optional[Array] = None, *,
                   rule: str, decay: float = 0.0, chunk_size: int = 64,
                   precision: Any = None) -> Array:
  """Causal fast-weight memory over chunks of C tokens (same contract as the oracle).

  Within a chunk (rows i, j = 0..C-1; G_i = sum_{s<=i} g_s the cumulative log-decay,
  gamma_i = exp(G_i), D_ij = gamma_i / gamma_j for j <= i, else 0) and incoming state S:
    hebbian: O = diag(gamma) Q S + (Q K^T * D) V,
             S' = gamma_C S + (diag(gamma_C / gamma) K)^T V
    delta (WY / UT form, gated when g != 0):
             A = strict_tril(diag(beta) (K K^T * D)),   T = (I + A)^{-1} diag(beta)
             W = T diag(gamma) K,  U = T V,  U' = U - W S
             O = diag(gamma) Q S + (Q K^T * D) U'          (diagonal included)
             S' = gamma_C S + (diag(gamma_C / gamma) K)^T U'
  All exponents are differences G_i - G_j <= 0, so nothing overflows. The per-chunk
  quantities that do not depend on S are computed for all chunks at once; only the
  S-dependent part runs in the scan.
  """
  q, k, v, beta, g, m = _prepare(q, k, v, beta, alpha, mask, rule, decay)
  b, h, t, ek = q.shape
  ev = v.shape[-1]
  c = int(chunk_size)
  if c < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
  n = -(-t // c)
  pad = n * c - t
  if pad:  # padded tokens: k = 0, beta = 0, g = 0 (write nothing, no decay)
    pad4 = lambda a: jnp.pad(a, ((0, 0), (0, 0), (0, pad), (0, 0)))
    pad3 = lambda a: jnp.pad(a, ((0, 0), (0, 0), (0, pad)))
    q, k, v = pad4(q), pad4(k), pad4(v)
    g = pad3(g)
    if beta is not None:
      beta = pad3(beta)
  ein = functools.partial(jnp.einsum, precision=precision)
  chunk4 = lambda a: a.reshape(b, h, n, c, a.shape[-1])
  q, k, v = chunk4(q), chunk4(k), chunk4(v)           # [B, H, N, C, e]
  g = g.reshape(b, h, n, c)

  big_g = jnp.cumsum(g, axis=-1)                      # [B, H, N, C]
  g_last = big_g[..., -1]                             # [B, H, N]
  causal = jnp.tril(jnp.ones((c, c), bool))
  diff = big_g[..., :, None] - big_g[..., None, :]    # [B, H, N, C, C]
  decay_mat = jnp.where(causal, jnp.exp(jnp.where(causal, diff, 0.0)), 0.0)
  qk = ein("bhnik,bhnjk->bhnij", q, k) * decay_mat   # [B, H, N, C, C], lower incl. diag
  q_dec = q * jnp.exp(big_g)[..., None]               # diag(gamma) Q
  k_dec = k * jnp.exp(g_last[..., None] - big_g)[..., None]  # diag(gamma_C / gamma) K

  if rule == "delta":
    beta = beta.reshape(b, h, n, c)
    strict = jnp.tril(jnp.ones((c, c), bool), -1)
    kk = ein("bhnik,bhnjk->bhnij", k, k) * decay_mat
    a_mat = jnp.where(strict, beta[..., :, None] * kk, 0.0)
    lower = a_mat + jnp.eye(c, dtype=jnp.float32)     # I + A, unit lower triangular
    rhs = jnp.concatenate(
        [beta[..., None] * v, (beta * jnp.exp(big_g))[..., None] * k], axis=-1)
    sol = ein("bhnij,bhnjd->bhnid", _unit_lower_inverse(a_mat, precision), rhs)
    u, w = sol[..., :ev], sol[..., ev:]               # U = T V, W = T diag(gamma) K
  else:
    u, w = v, None

  def step(s, inputs):                                # s: [B, H, e_k, e_v]
    if w is None:
      q_c, qk_c, k_c, u_c, gl_c = inputs
    else:
      q_c, qk_c, k_c, u_c, gl_c, w_c = inputs
      u_c = u_c - ein("bhck,bhkv->bhcv", w_c, s)      # U' = U - W S
    o = ein("bhck,bhkv->bhcv", q_c, s) + ein("bhij,bhjv->bhiv", qk_c, u_c)
    s = jnp.exp(gl_c)[..., None, None] * s + ein("bhck,bhcv->bhkv", k_c, u_c)
    return s, o

  xs = (q_dec, qk, k_dec, u, g_last) + (() if w is None else (w,))
  xs = tuple(jnp.moveaxis(a, 2, 0) for a in xs)       # chunks first
  s0 = jnp.zeros((b, h, ek, ev), jnp.float32)
  _, o = jax.lax.scan(step, s0, xs, unroll=n <= UNROLL_MAX_CHUNKS)  # [N, B, H, C, e_v]
  o = jnp.moveaxis(o, 0, 2).reshape(b, h, n * c, ev)[:, :, :t]
  return o * m[..., None]


def fast_weight_memory(q: Array, k: Array, v: Array, beta: Optional[Array] = None,
                       alpha: Optional[Array] = None, mask: Optional[Array] = None, *,
                       rule: str = "delta", form: str = "chunked", chunk_size: int = 64,
                       direction: str = "causal", decay: float = 0.0,
                       precision: Any = None) -> Array:
  """Fast-weight memory read-out [B, H, T, e_v] (fp32), dispatching form and direction.

  "bidirectional" = the causal pass + the causal pass over the time-reversed sequence
  (reversed back), summed. Padding at the end of a row becomes padding at the front of
  the reversed row, which writes nothing and does not decay: the backward pass starts at
  each row's last real token with a zero state.
  """
  if form == "recurrent":
    fn = functools.partial(memory_recurrent, rule=rule, decay=decay, precision=precision)
  elif form == "chunked":
    fn = functools.partial(memory_chunked, rule=rule, decay=decay, chunk_size=chunk_size,
                           precision=precision)
  else:
    raise ValueError(f"form must be one of {FORMS}, got {form!r}")
  y = fn(q, k, v, beta, alpha, mask)
  if direction == "causal":
    return y
  if direction != "bidirectional":
    raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
  flip = lambda a, axis: None if a is None else jnp.flip(a, axis)
  y_back = fn(flip(q, 2), flip(k, 2), flip(v, 2), flip(beta, 2), flip(alpha, 2),
              flip(mask, 1))
  return y + jnp.flip(y_back, 2)


def _masked_mean(x: Array, mask: Optional[Array]) -> Array:
  """Mean over real tokens: x [B, T, d], mask [B, T] -> [B, d] (fp32)."""
  x = x.astype(jnp.float32)
  if mask is None:
    return jnp.mean(x, axis=1)
  m = mask.astype(jnp.float32)[..., None]
  return jnp.sum(x * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)


class FastWeightMemory(nn.Module):
  """Multi-head fast-weight memory layer: x [B, T, d], mask [B, T] -> [B, T, d].

  q, k, v are linear projections of x, normalised per head (q, k: "l2" or "rms") and
  modulated by HOPE gammas computed from the masked mean of x; the delta rule's write
  strength beta_t = sigmoid(w_beta . x_t) and gate alpha_t = sigmoid(w_alpha . x_t) are per
  head. For the delta rule the key is kept unit-norm (|k| = 1, no learnable key scale) and
  its HOPE gamma is bounded to (2 - sqrt2, sqrt2), so that beta |k|^2 < 2 and the
  transition I - beta k^T k of Eq. 65 is never expansive.
  """
  width: int
  heads: int
  rule: str = "delta"
  form: str = "chunked"
  chunk_size: int = 64
  direction: str = "causal"
  decay: float = 0.0
  gate: bool = False
  qk_norm: str = "l2"
  hope: bool = True
  dtype: Any = jnp.float32

  @classmethod
  def from_config(cls, memory_cfg, width: int, heads: int, direction: str = "causal",
                  dtype: Any = jnp.float32, **kwargs) -> "FastWeightMemory":
    """Builds the layer from `config.model.memory` (direction is per modality there)."""
    return cls(width=width, heads=heads, rule=memory_cfg.rule, form=memory_cfg.form,
               chunk_size=memory_cfg.chunk_size, direction=direction,
               decay=memory_cfg.decay, gate=memory_cfg.gate, qk_norm=memory_cfg.qk_norm,
               hope=memory_cfg.hope, dtype=jnp.dtype(dtype), **kwargs)

  def _norm(self, x: Array, name: str, learn_scale: bool) -> Array:
    """Per-head normalisation of x [B, H, T, e] (fp32) with a learnable per-head scale."""
    e = x.shape[-1]
    ss = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    if self.qk_norm == "l2":
      x = x * jax.lax.rsqrt(ss + 1e-6)
    elif self.qk_norm == "rms":
      x = x * jax.lax.rsqrt(ss / e + 1e-6)
      if not learn_scale:  # unit norm for the delta rule's key
        x = x / math.sqrt(e)
    else:
      raise ValueError(f"qk_norm must be 'l2' or 'rms', got {self.qk_norm!r}")
    if learn_scale:
      scale = self.param(name, nn.initializers.ones, (self.heads,), jnp.float32)
      x = x * scale[None, :, None, None]
    return x

  @nn.compact
  def __call__(self, x: Array, mask: Optional[Array] = None) -> Array:
    b, t, d = x.shape                                 # [B, T, d]
    h = self.heads
    if self.width % h:
      raise ValueError(f"width {self.width} not divisible by heads {h}")
    e = self.width // h
    dense = functools.partial(nn.Dense, use_bias=False, dtype=self.dtype)

    def heads_first(a):                               # [B, T, H*e] -> [B, H, T, e] fp32
      return a.reshape(b, t, h, -1).transpose(0, 2, 1, 3).astype(jnp.float32)

    q = heads_first(dense(self.width, name="query")(x))
    k = heads_first(dense(self.width, name="key")(x))
    v = heads_first(dense(self.width, name="value")(x))
    delta = self.rule == "delta"
    q = self._norm(q, "query_scale", learn_scale=True)
    k = self._norm(k, "key_scale", learn_scale=not delta)

    if self.hope:  # HOPE: (gamma_q, gamma_k, gamma_v) = 1 + tanh(MLP(s)) per head
      s = _masked_mean(x, mask)                       # [B, d]
      z = nn.gelu(nn.Dense(d, dtype=jnp.float32, name="hope_hidden")(s))
      z = nn.Dense(3 * h, dtype=jnp.float32, kernel_init=nn.initializers.zeros,
                   name="hope_out")(z)
      z = jnp.tanh(z).reshape(b, 3, h)                # [B, 3, H]
      k_range = math.sqrt(2.0) - 1.0 if delta else 1.0
      gq, gk, gv = 1.0 + z[:, 0], 1.0 + k_range * z[:, 1], 1.0 + z[:, 2]
      q = q * gq[:, :, None, None]
      k = k * gk[:, :, None, None]
      v = v * gv[:, :, None, None]

    beta = alpha = None
    if delta:
      xf = x.astype(jnp.float32)
      beta = nn.sigmoid(nn.Dense(h, dtype=jnp.float32, name="beta")(xf))
      beta = beta.transpose(0, 2, 1)                  # [B, H, T]
      if self.gate:  # bias 3: alpha starts near 0.95 (long memory)
        alpha = nn.sigmoid(nn.Dense(h, dtype=jnp.float32,
                                    bias_init=nn.initializers.constant(3.0),
                                    name="alpha")(xf))
        alpha = alpha.transpose(0, 2, 1)              # [B, H, T]

    y = fast_weight_memory(q, k, v, beta, alpha, mask, rule=self.rule, form=self.form,
                           chunk_size=self.chunk_size, direction=self.direction,
                           decay=self.decay)          # [B, H, T, e] fp32
    y = y.transpose(0, 2, 1, 3).reshape(b, t, self.width).astype(self.dtype)
    out = dense(d, name="out")(y)                     # [B, T, d]
    if mask is not None:
      out = out * mask[..., None].astype(out.dtype)
    return out
