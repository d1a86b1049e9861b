"""Continuum Memory System (design section 3; paper Section 7, Eq. 70-71).

A CMS is a set of MLP "levels" f^(1..K), each a memory whose parameters are updated at its
own frequency. The frequencies live entirely in the optimizer (each level's parameters sit
under a module named `cms_<level>`, which `optim/levels.py` routes to that level's
`update_every`); the forward pass below knows nothing about them.

What a frequency means HERE differs from the paper. Eq. 71 updates level l every C^(l)
TOKENS of the stream the model reads in context (a chunk of the sequence), with the
gradients of the tokens in that chunk. This project counts OUTER OPTIMIZER STEPS: a
level with `update_every = k` changes only at steps n with n % k == 0, by one step of its
optimizer on the MEAN of the k accumulated parameter gradients (one step on a k times
larger batch); within a forward pass every level is fixed.

Both structures return the *increment* that the enclosing block adds to its residual
stream, so that `x + CMS(x)` is the block update in either case:
  parallel:  CMS(x) = sum_k f^(k)(x)                            (the seed's structure)
  chain:     y_0 = x, y_k = y_{k-1} + f^(k)(y_{k-1}),  CMS(x) = y_K - x        (Eq. 70)
With one level the two coincide.
"""

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

STRUCTURES = ("parallel", "chain")


def level_module_name(level: str) -> str:
  """The module name that carries a level's parameters (the optimizer's routing key)."""
  return f"cms_{level}"


def level_order(levels_cfg) -> tuple[str, ...]:
  """Level names in chain order: by `update_every` (highest frequency first), then name.

  ConfigDict sorts its keys alphabetically, so the order the levels were written in a
  config is not recoverable; the frequency is the meaningful order (Eq. 70 nests the
  lower-frequency levels around the higher-frequency ones).
  """
  return tuple(sorted(levels_cfg.keys(), key=lambda n: (levels_cfg[n].update_every, n)))


class CMSLevel(nn.Module):
  """One CMS level: an MLP d -> mult*d -> d (GELU), x [..., d] -> [..., d].

  It returns f(x) only; the residual x + f(x) is added by the caller (`CMS` for the chain,
  the NL block for the CMS output).
  """
  mult: int = 4
  dropout: float = 0.0
  out_init_scale: float = 1.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    d = x.shape[-1]
    h = nn.Dense(self.mult * d, dtype=self.dtype, name="Dense_0")(x)   # [..., m*d]
    h = nn.gelu(h)
    h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
    out_init = nn.initializers.variance_scaling(
        self.out_init_scale ** 2, "fan_in", "truncated_normal")
    return nn.Dense(d, dtype=self.dtype, kernel_init=out_init, name="Dense_1")(h)


class CMS(nn.Module):
  """Continuum Memory System over the levels `levels` (in chain order). [B, T, d] -> same.

  Returns the increment (see the module docstring); the caller adds the residual.
  """
  levels: Sequence[str]
  structure: str = "parallel"
  mult: int = 4
  dropout: float = 0.0
  out_init_scale: float = 1.0
  dtype: Any = jnp.float32

  @classmethod
  def from_config(cls, model_cfg, dtype: Any = jnp.float32, **kwargs) -> "CMS":
    """Builds the CMS of `config.model` (levels from `model.cms.levels`, see `level_order`)."""
    return cls(levels=level_order(model_cfg.cms.levels), structure=model_cfg.cms.structure,
               mult=model_cfg.mlp_mult, dropout=model_cfg.dropout, dtype=dtype, **kwargs)

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    if not self.levels:
      raise ValueError("a CMS needs at least one level (model.cms.levels is empty)")
    if self.structure not in STRUCTURES:
      raise ValueError(f"cms.structure must be one of {STRUCTURES}, got {self.structure!r}")
    make: Callable[[str], CMSLevel] = lambda lvl: CMSLevel(
        mult=self.mult, dropout=self.dropout, out_init_scale=self.out_init_scale,
        dtype=self.dtype, name=level_module_name(lvl))
    if self.structure == "parallel":
      out = None
      for lvl in self.levels:
        y = make(lvl)(x, deterministic)
        out = y if out is None else out + y
      return out                                      # [B, T, d]
    y, out = x, None
    for lvl in self.levels:                           # sum of the increments = y_K - x
      u = make(lvl)(y, deterministic)
      y = y + u
      out = u if out is None else out + u
    return out                                        # [B, T, d]
