"""Fast-weight associative memory (design section 3; paper Eq. 64-65).

Per head, a state S in R^{e_k x e_v} (row convention: y_t = q_t S_t, q_t a row vector)
is written token by token:

  hebbian (Eq. 64, linear attention):  S_t = lam S_{t-1} + k_t^T v_t
  delta   (Eq. 65, DeltaNet):          S_t = alpha_t (I - beta_t k_t^T k_t) S_{t-1}
                                               + beta_t k_t^T v_t
  read:                                y_t = q_t S_t

(the design's column convention S_t q_t is the transpose of this one). lam = 1 - decay
(hebbian only); alpha_t is the optional gate of the gated delta rule (delta only; alpha_t
= 1: plain DeltaNet), passed as log alpha_t (exact from `log_sigmoid`). Both decays are
handled as per-token log-decays g_t (g_t = 0 on padding). An option that has no effect
with the chosen rule (a decay for delta, a gate for hebbian) is an error.

Padding: a padded token writes nothing (k_t = 0, beta_t = 0), does not decay the state
(g_t = 0) and reads nothing (y_t = 0). Hence the outputs on a sequence's real tokens do
not depend on how much padding follows it, and the backward pass of the bidirectional
form (padding then at the front) starts from a zero state at each row's last real token.

Two forms of one contract (same outputs and gradients to ~1e-5 in fp32):
  `memory_recurrent`: lax.scan over tokens (the oracle).
  `memory_chunked`:   lax.scan over chunks of C tokens with matmuls inside a chunk; the
                      delta rule uses the WY / UT representation (triangular inverse).
                      A sequence is cut into n = ceil(T / C) chunks of ceil(T / n) tokens
                      (`chunk_plan`), so a short sequence is never padded up to C.

Prediction errors (`return_errors=True`, for test-time training, `models/ttt.py`): both
forms can also return e_t = m_t |v_t - k_t S~_{t-1}|^2 per head [B, H, T], where
S~_{t-1} = exp(g_t) S_{t-1} is the state the token's write is computed against (the
delta rule's r_t; the same quantity for hebbian). With `return_errors=False` (default)
the computation is unchanged.

Precision: states and accumulation are fp32 whatever the input dtype. On GPUs the default
fp32 matmul is TF32 (about 10 mantissa bits) and on TPUs bf16 passes, so the state
recurrence and the delta rule's triangular inverse always run at `Precision.HIGHEST`;
the intra-chunk score products (Q K^T, K K^T and their product with the values) take the
`precision` argument (module field `precision`, config `model.memory.precision`).
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
PRECISIONS = {"default": jax.lax.Precision.DEFAULT, "high": jax.lax.Precision.HIGH,
              "highest": jax.lax.Precision.HIGHEST}
HIGHEST = jax.lax.Precision.HIGHEST
# Test-time training (models/ttt.py): the adapters' variable collection, and the collection
# the memory sows its inner objective into when that collection is mutable.
TTT_COLLECTION = "ttt"
TTT_LOSS_COLLECTION = "ttt_loss"
# Chunk scans this short are unrolled: a loop of a few tiny steps costs more than its body
# on a CPU (batch-64 demo step 0.63 -> 0.59 s); longer ones stay a loop (compile time).
UNROLL_MAX_CHUNKS = 8


def check_rule_options(rule: str, decay: float, gated: bool) -> None:
  """Rejects a rule/option pair that would silently do nothing."""
  if rule not in RULES:
    raise ValueError(f"memory.rule must be one of {RULES}, got {rule!r}")
  if rule == "delta" and decay != 0.0:
    raise ValueError(f"memory.decay={decay} has no effect with the delta rule (it is the "
                     "hebbian rule's lambda = 1 - decay); set memory.decay=0, or use "
                     "memory.gate=True for the gated delta rule's learned decay")
  if rule == "hebbian" and gated:
    raise ValueError("memory.gate=True has no effect with the hebbian rule (the gate is the "
                     "gated delta rule's alpha_t); set memory.gate=False, or use "
                     "memory.decay for a fixed hebbian decay")
  if rule == "hebbian" and not 0.0 <= decay < 1.0:
    raise ValueError(f"memory.decay must be in [0, 1) for the hebbian rule, got {decay}")


def chunk_plan(t: int, chunk_size: int) -> tuple[int, int]:
  """(number of chunks n, tokens per chunk c) for T tokens and at most C per chunk.

  n = ceil(T / C) and c = ceil(T / n) <= C: balanced chunks, so padding is below n tokens
  (T = 16, C = 64: one chunk of 16, not 64; T = 77: two of 39).
  """
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
  n = -(-t // chunk_size)
  return n, -(-t // n)


def _prepare(q, k, v, beta, log_alpha, mask, rule, decay):
  """Casts to fp32 and applies the padding rules.

  Returns q, k, v [B, H, T, e], beta [B, H, T] (delta; None for hebbian),
  g [B, H, T] per-token log-decay, m [B, H, T] fp32 mask.
  """
  check_rule_options(rule, decay, log_alpha is not None)
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
    if log_alpha is None:
      g = jnp.zeros((b, h, t), jnp.float32)
    else:
      g = jnp.asarray(log_alpha, jnp.float32) * m     # no decay on padding
  else:
    beta = None
    g = jnp.full((b, h, t), math.log1p(-decay), jnp.float32) * m
  return q, k, v, beta, g, m


def memory_recurrent(q: Array, k: Array, v: Array, beta: Optional[Array] = None,
                     log_alpha: Optional[Array] = None, mask: Optional[Array] = None, *,
                     rule: str, decay: float = 0.0, return_errors: bool = False) -> Array:
  """Causal fast-weight memory, one token at a time (Eq. 64-65). The oracle.

  q, k, v: [B, H, T, e]; beta, log_alpha: [B, H, T]; mask: [B, T] bool. Returns
  [B, H, T, e_v] in fp32 (and the prediction errors [B, H, T] with `return_errors`).
  Every product runs at `Precision.HIGHEST`.
  """
  q, k, v, beta, g, m = _prepare(q, k, v, beta, log_alpha, mask, rule, decay)
  b, h, _, ek = q.shape
  ev = v.shape[-1]
  ein = functools.partial(jnp.einsum, precision=HIGHEST)

  def step(s, inputs):                                # s: [B, H, e_k, e_v]
    q_t, k_t, v_t, b_t, g_t = inputs                  # [B, H, e] x3, [B, H] x2
    s = jnp.exp(g_t)[..., None, None] * s
    if rule == "delta" or return_errors:
      r = v_t - ein("bhk,bhkv->bhv", k_t, s)          # v_t - k_t S  (prediction error)
    if rule == "delta":
      s = s + ein("bhk,bhv->bhkv", k_t, b_t[..., None] * r)
    else:
      s = s + ein("bhk,bhv->bhkv", k_t, v_t)
    y_t = ein("bhk,bhkv->bhv", q_t, s)
    if return_errors:
      return s, (y_t, jnp.sum(jnp.square(r), axis=-1))
    return s, y_t

  if beta is None:
    beta = jnp.zeros_like(g)
  to_time = lambda a: jnp.moveaxis(a, 2, 0)
  s0 = jnp.zeros((b, h, ek, ev), jnp.float32)
  _, y = jax.lax.scan(step, s0, tuple(map(to_time, (q, k, v, beta, g))))
  if return_errors:
    y, err = y
    return jnp.moveaxis(y, 0, 2) * m[..., None], jnp.moveaxis(err, 0, 2) * m
  y = jnp.moveaxis(y, 0, 2)                           # [B, H, T, e_v]
  return y * m[..., None]


def unit_lower_inverse(a: Array) -> Array:
  """(I + A)^{-1} for strictly lower-triangular A [..., C, C], by blocked substitution.

  Recursive 2x2 blocks: inv([[L11, 0], [L21, L22]]) = [[X11, 0], [-X22 L21 X11, X22]],
  down to rows solved one at a time. Only matmuls (at `Precision.HIGHEST`: errors here
  compound through the recursion), no LAPACK call inside the scan (XLA's CPU triangular
  solve under vmap/scan was both slow and prone to stalls).
  """
  c = a.shape[-1]
  if c == 1:
    return jnp.ones_like(a)
  h = c // 2
  x11 = unit_lower_inverse(a[..., :h, :h])
  x22 = unit_lower_inverse(a[..., h:, h:])
  x21 = -jnp.einsum("...ij,...jk,...kl->...il", x22, a[..., h:, :h], x11,
                    precision=HIGHEST)
  top = jnp.concatenate([x11, jnp.zeros(a.shape[:-2] + (h, c - h), a.dtype)], axis=-1)
  bottom = jnp.concatenate([x21, x22], axis=-1)
  return jnp.concatenate([top, bottom], axis=-2)


def memory_chunked(q: Array, k: Array, v: Array, beta: Optional[Array] = None,
                   log_alpha: Optional[Array] = None, mask: Optional[Array] = None, *,
                   rule: str, decay: float = 0.0, chunk_size: int = 64,
                   precision: Any = HIGHEST, return_errors: bool = False) -> Array:
  """Causal fast-weight memory over chunks of at most C tokens (same contract as the oracle).

  Within a chunk (rows i, j = 0..c-1; G_i = sum_{s<=i} g_s the cumulative log-decay,
  gamma_i = exp(G_i), D_ij = gamma_i / gamma_j for j <= i, else 0) and incoming state S:
    hebbian: O = diag(gamma) Q S + (Q K^T * D) V,
             S' = gamma_c S + (diag(gamma_c / gamma) K)^T V
    delta (WY / UT form, gated when g != 0):
             A = strict_tril(diag(beta) (K K^T * D)),   T = (I + A)^{-1} diag(beta)
             W = T diag(gamma) K,  U = T V,  U' = U - W S
             O = diag(gamma) Q S + (Q K^T * D) U'          (diagonal included)
             S' = gamma_c S + (diag(gamma_c / gamma) K)^T U'
  All exponents are differences G_i - G_j <= 0, so nothing overflows. The per-chunk
  quantities that do not depend on S are computed for all chunks at once; only the
  S-dependent part runs in the scan. `precision` applies to Q K^T, K K^T and
  (Q K^T * D) U'; the inverse, W, U and every product with S run at HIGHEST.

  Prediction errors (`return_errors`): the state token i is written against is
  gamma_i S + sum_{j<i} D_ij k_j^T u'_j (u' = U' rows; V for hebbian), so
    R = V - diag(gamma) K S - (strict_tril(K K^T * D)) U',   e_i = |R_i|^2.
  """
  q, k, v, beta, g, m = _prepare(q, k, v, beta, log_alpha, mask, rule, decay)
  b, h, t, ek = q.shape
  ev = v.shape[-1]
  n, c = chunk_plan(t, int(chunk_size))
  pad = n * c - t
  if pad:  # padded tokens: k = 0, beta = 0, g = 0 (write nothing, no decay)
    pad4 = lambda a: jnp.pad(a, ((0, 0), (0, 0), (0, pad), (0, 0)))
    pad3 = lambda a: jnp.pad(a, ((0, 0), (0, 0), (0, pad)))
    q, k, v = pad4(q), pad4(k), pad4(v)
    g = pad3(g)
    if beta is not None:
      beta = pad3(beta)
  ein = functools.partial(jnp.einsum, precision=precision)
  ein_state = functools.partial(jnp.einsum, precision=HIGHEST)
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

  strict = jnp.tril(jnp.ones((c, c), bool), -1)
  if rule == "delta" or return_errors:
    kk = ein("bhnik,bhnjk->bhnij", k, k) * decay_mat
  if rule == "delta":
    beta = beta.reshape(b, h, n, c)
    a_mat = jnp.where(strict, beta[..., :, None] * kk, 0.0)   # A, strictly lower
    rhs = jnp.concatenate(
        [beta[..., None] * v, (beta * jnp.exp(big_g))[..., None] * k], axis=-1)
    sol = ein_state("bhnij,bhnjd->bhnid", unit_lower_inverse(a_mat), rhs)
    u, w = sol[..., :ev], sol[..., ev:]               # U = T V, W = T diag(gamma) K
  else:
    u, w = v, None

  def step(s, inputs):                                # s: [B, H, e_k, e_v]
    if return_errors:
      *inputs, kg_c, kks_c, v_c = inputs
    if w is None:
      q_c, qk_c, k_c, u_c, gl_c = inputs
    else:
      q_c, qk_c, k_c, u_c, gl_c, w_c = inputs
      u_c = u_c - ein_state("bhck,bhkv->bhcv", w_c, s)  # U' = U - W S
    o = ein_state("bhck,bhkv->bhcv", q_c, s) + ein("bhij,bhjv->bhiv", qk_c, u_c)
    if return_errors:  # R = V - diag(gamma) K S - strict(K K^T * D) U'
      r = v_c - ein_state("bhck,bhkv->bhcv", kg_c, s) - ein("bhij,bhjv->bhiv", kks_c, u_c)
      o = (o, jnp.sum(jnp.square(r), axis=-1))        # [B, H, C]
    s = jnp.exp(gl_c)[..., None, None] * s + ein_state("bhck,bhcv->bhkv", k_c, u_c)
    return s, o

  xs = (q_dec, qk, k_dec, u, g_last) + (() if w is None else (w,))
  if return_errors:
    xs += (k * jnp.exp(big_g)[..., None], jnp.where(strict, kk, 0.0), v)
  xs = tuple(jnp.moveaxis(a, 2, 0) for a in xs)       # chunks first
  s0 = jnp.zeros((b, h, ek, ev), jnp.float32)
  _, o = jax.lax.scan(step, s0, xs, unroll=n <= UNROLL_MAX_CHUNKS)  # [N, B, H, C, e_v]
  if return_errors:
    o, err = o
    err = jnp.moveaxis(err, 0, 2).reshape(b, h, n * c)[:, :, :t]
    return jnp.moveaxis(o, 0, 2).reshape(b, h, n * c, ev)[:, :, :t] * m[..., None], err * m
  o = jnp.moveaxis(o, 0, 2).reshape(b, h, n * c, ev)[:, :, :t]
  return o * m[..., None]


def fast_weight_memory(q: Array, k: Array, v: Array, beta: Optional[Array] = None,
                       log_alpha: Optional[Array] = None, mask: Optional[Array] = None, *,
                       rule: str = "delta", form: str = "chunked", chunk_size: int = 64,
                       direction: str = "causal", decay: float = 0.0,
                       precision: Any = HIGHEST, return_errors: bool = False) -> Array:
  """Fast-weight memory read-out [B, H, T, e_v] (fp32), dispatching form and direction.

  "bidirectional" = the causal pass + the causal pass over the time-reversed sequence
  (reversed back), summed: y_t = q_t S_t^fwd + q_t S_t^bwd. Both states contain token t's
  own write, so that write is counted twice (a hebbian T = 1 sequence reads
  2 (q.k) v); this is kept deliberately: it is a fixed, learnable-around weighting of
  the token itself, and subtracting it would cost a third pass. Padding at the end of a
  row becomes padding at the front of the reversed row, which writes nothing and does
  not decay: the backward pass starts at each row's last real token with a zero state.

  `return_errors`: also returns the prediction errors [B, H, T] (module docstring), for
  "bidirectional" the sum of both passes' (token t predicted from the tokens before it,
  and from the tokens after it).
  """
  if form == "recurrent":
    fn = functools.partial(memory_recurrent, rule=rule, decay=decay,
                           return_errors=return_errors)
  elif form == "chunked":
    fn = functools.partial(memory_chunked, rule=rule, decay=decay, chunk_size=chunk_size,
                           precision=precision, return_errors=return_errors)
  else:
    raise ValueError(f"form must be one of {FORMS}, got {form!r}")
  if direction not in DIRECTIONS:
    raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
  y = fn(q, k, v, beta, log_alpha, mask)
  if direction == "causal":
    return y
  flip = lambda a, axis: None if a is None else jnp.flip(a, axis)
  y_back = fn(flip(q, 2), flip(k, 2), flip(v, 2), flip(beta, 2), flip(log_alpha, 2),
              flip(mask, 1))
  if return_errors:
    (y, err), (y_back, err_back) = y, y_back
    return y + jnp.flip(y_back, 2), err + jnp.flip(err_back, 2)
  return y + jnp.flip(y_back, 2)


def context_summary(x: Array, mask: Optional[Array], causal: bool) -> Array:
  """Mean of the real tokens seen so far: x [B, T, d], mask [B, T] -> [B, T', d] fp32.

  causal: the running prefix mean s_t = sum_{j<=t} m_j x_j / max(sum_{j<=t} m_j, 1)
  (T' = T), so token t's summary never sees a later token; otherwise the masked mean over
  the whole sequence (T' = 1).
  """
  x = x.astype(jnp.float32)
  m = (jnp.ones(x.shape[:2], jnp.float32) if mask is None
       else mask.astype(jnp.float32))[..., None]      # [B, T, 1]
  if causal:
    return jnp.cumsum(x * m, axis=1) / jnp.maximum(jnp.cumsum(m, axis=1), 1.0)
  return jnp.sum(x * m, axis=1, keepdims=True) / jnp.maximum(jnp.sum(m, axis=1, keepdims=True),
                                                             1.0)


def normalize_heads(x: Array, kind: str) -> Array:
  """Per-head normalisation of x [B, H, T, e] (fp32) to unit L2 norm.

  "l2": x / |x|; "rms": x / rms(x) / sqrt(e). Both give |x| = 1 up to eps (they differ
  only in where eps enters); a learnable per-head scale is applied by the caller.
  """
  ss = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  if kind == "l2":
    return x * jax.lax.rsqrt(ss + 1e-6)
  if kind == "rms":
    e = x.shape[-1]
    return x * jax.lax.rsqrt(ss / e + 1e-6) / math.sqrt(e)
  raise ValueError(f"memory.qk_norm must be 'l2' or 'rms', got {kind!r}")


class FastWeightMemory(nn.Module):
  """Multi-head fast-weight memory layer: x [B, T, d], mask [B, T] -> [B, T, d].

  q, k, v are linear projections of x, normalised per head to unit norm (q, k: "l2" or
  "rms"). q and (hebbian only) k get a learnable per-head scale; the delta rule's key
  stays unit-norm, so that beta |k|^2 < 2 and the transition I - beta k^T k of Eq. 65 is
  never expansive. The delta rule's write strength beta_t = sigmoid(w_beta . x_t) and
  gate log alpha_t = log_sigmoid(w_alpha . x_t) are per head.

  Context gain (`context_gain`; an option of this project, NOT the paper's HOPE block):
  per token and head, (gamma_q, gamma_k, gamma_v) = 1 + (1, r, 1) * tanh(MLP(s_t)), with
  s_t = `context_summary` of the block input (a running prefix mean for a causal memory,
  the masked mean of the whole sequence for a bidirectional one), an MLP d ->
  `context_hidden` -> 3h whose output layer starts at zero (gains start at 1), and
  r = sqrt2 - 1 for the delta rule's key (gamma_k in (2 - sqrt2, sqrt2), |k|^2 < 2),
  r = 1 otherwise.

  Test-time training (`models/ttt.py`): when the variable collection "ttt" holds
  `key_a` [d, r] and `key_b` [r, width], the key projection is x (W_k + A B) and the
  layer's input is a constant for differentiation (stop_gradient: its inner objective
  depends only on its own adapters). When "ttt_loss" is mutable (not at init) the layer
  sows its inner objective per row [B]: sum_{t,h} e_t / max(sum_t m_t, 1), e_t the
  prediction errors of `fast_weight_memory` (both passes when bidirectional). Without
  these collections nothing changes.
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
  context_gain: bool = True
  context_hidden: int = 64
  precision: str = "highest"
  dtype: Any = jnp.float32

  @classmethod
  def from_config(cls, memory_cfg, width: int, heads: int, direction: str = "causal",
                  dtype: Any = jnp.float32, **kwargs) -> "FastWeightMemory":
    """Builds the layer from `config.model.memory` (direction is per modality there)."""
    return cls(width=width, heads=heads, rule=memory_cfg.rule, form=memory_cfg.form,
               chunk_size=memory_cfg.chunk_size, direction=direction,
               decay=memory_cfg.decay, gate=memory_cfg.gate, qk_norm=memory_cfg.qk_norm,
               context_gain=memory_cfg.context_gain,
               context_hidden=memory_cfg.context_hidden, precision=memory_cfg.precision,
               dtype=jnp.dtype(dtype), **kwargs)

  def _gains(self, x: Array, mask: Optional[Array]) -> tuple[Array, Array, Array]:
    """Context gains (gamma_q, gamma_k, gamma_v), each [B, H, T', 1] (T' = T or 1)."""
    h = self.heads
    s = context_summary(x, mask, causal=self.direction == "causal")   # [B, T', d]
    z = nn.gelu(nn.Dense(self.context_hidden, dtype=jnp.float32, name="gain_hidden")(s))
    z = nn.Dense(3 * h, dtype=jnp.float32, kernel_init=nn.initializers.zeros,
                 name="gain_out")(z)
    z = jnp.tanh(z).reshape(z.shape[0], z.shape[1], 3, h)              # [B, T', 3, H]
    z = z.transpose(2, 0, 3, 1)[..., None]                             # [3, B, H, T', 1]
    k_range = math.sqrt(2.0) - 1.0 if self.rule == "delta" else 1.0
    return 1.0 + z[0], 1.0 + k_range * z[1], 1.0 + z[2]

  @nn.compact
  def __call__(self, x: Array, mask: Optional[Array] = None) -> Array:
    b, t, d = x.shape                                 # [B, T, d]
    h = self.heads
    if self.width % h:
      raise ValueError(f"width {self.width} not divisible by heads {h}")
    if self.precision not in PRECISIONS:
      raise ValueError(f"memory.precision must be one of {sorted(PRECISIONS)}, "
                       f"got {self.precision!r}")
    check_rule_options(self.rule, self.decay, self.gate)
    dense = functools.partial(nn.Dense, use_bias=False, dtype=self.dtype)
    adapted = self.has_variable(TTT_COLLECTION, "key_a")
    if adapted:  # test-time training: the layer's input is data for its inner objective
      x = jax.lax.stop_gradient(x)

    def heads_first(a):                               # [B, T, H*e] -> [B, H, T, e] fp32
      return a.reshape(b, t, h, -1).transpose(0, 2, 1, 3).astype(jnp.float32)

    q = heads_first(dense(self.width, name="query")(x))
    k = dense(self.width, name="key")(x)
    if adapted:                                       # x (W_k + A B), B = 0 at init
      xa = jnp.asarray(x, jnp.float32) @ self.get_variable(TTT_COLLECTION, "key_a")
      k = k.astype(jnp.float32) + xa @ self.get_variable(TTT_COLLECTION, "key_b")
    k = heads_first(k)
    v = heads_first(dense(self.width, name="value")(x))
    delta = self.rule == "delta"
    head_scale = lambda name: self.param(name, nn.initializers.ones, (h,),
                                         jnp.float32)[None, :, None, None]
    q = normalize_heads(q, self.qk_norm) * head_scale("query_scale")
    k = normalize_heads(k, self.qk_norm)
    self.sow("intermediates", "unit_key", k)          # [B, H, T, e], |k| = 1 (tests)
    if not delta:
      k = k * head_scale("key_scale")

    if self.context_gain:
      gq, gk, gv = self._gains(x, mask)
      q, k, v = q * gq, k * gk, v * gv

    beta = log_alpha = None
    if delta:
      xf = x.astype(jnp.float32)
      beta = nn.sigmoid(nn.Dense(h, dtype=jnp.float32, name="beta")(xf))
      beta = beta.transpose(0, 2, 1)                  # [B, H, T]
      if self.gate:  # bias 3: alpha starts near 0.95 (long memory)
        log_alpha = jax.nn.log_sigmoid(nn.Dense(h, dtype=jnp.float32,
                                                bias_init=nn.initializers.constant(3.0),
                                                name="alpha")(xf))
        log_alpha = log_alpha.transpose(0, 2, 1)      # [B, H, T]

    errors = self.is_mutable_collection(TTT_LOSS_COLLECTION) and not self.is_initializing()
    y = fast_weight_memory(q, k, v, beta, log_alpha, mask, rule=self.rule, form=self.form,
                           chunk_size=self.chunk_size, direction=self.direction,
                           decay=self.decay, precision=PRECISIONS[self.precision],
                           return_errors=errors)
    if errors:  # inner objective of test-time training, per row [B]
      y, err = y
      real = (jnp.full((b,), float(t)) if mask is None
              else jnp.sum(jnp.asarray(mask, jnp.float32), axis=1))
      self.sow(TTT_LOSS_COLLECTION, "prediction_error",
               jnp.sum(err, axis=(1, 2)) / jnp.maximum(real, 1.0))
    y = y.transpose(0, 2, 1, 3).reshape(b, t, self.width).astype(self.dtype)  # [B, T, d]
    out = dense(d, name="out")(y)                     # [B, T, d]
    if mask is not None:
      out = out * mask[..., None].astype(out.dtype)
    return out
