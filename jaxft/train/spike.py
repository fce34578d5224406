"""Spike guard: skip updates whose gradient norm is far above the recent ones.

A loss spike (one bad batch, an optimizer blow-up) shows first as a gradient norm many times the
usual. The guard keeps the last `window` global gradient norms in the state's `extras` (so it is
checkpointed and a resumed run guards exactly as the uninterrupted one) and flags a step when

    grad_norm > factor * median(recent norms)     (once at least `min_history` norms are known).

Every norm enters the window, the flagged ones included: an isolated spike barely moves the median,
while a lasting change of scale (e.g. after warmup) becomes the new normal within window / 2 steps
instead of freezing training. The step skips a flagged update like a non-finite one (params and
optimizer state unchanged) and counts it in `spike_skipped`, apart from `skipped_steps`, so that
nan_policy=error does not stop on a spike.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

NORMS = "spike/norms"
COUNT = "spike/count"
SKIPPED = "spike_skipped"


@dataclasses.dataclass(frozen=True)
class SpikeGuard:
  """factor: how many times the recent median counts as a spike (e.g. 10). window: how many recent
  norms to keep. min_history: norms needed before the guard acts (the first steps' norms vary
  most)."""

  factor: float
  window: int = 100
  min_history: int = 20

  def __post_init__(self):
    if not self.factor > 1:
      raise ValueError(f"spike guard factor must be > 1 (e.g. 10), got {self.factor}")
    if self.window < 1 or not 1 <= self.min_history <= self.window:
      raise ValueError(f"spike guard needs window >= 1 and 1 <= min_history <= window, got "
                       f"window={self.window}, min_history={self.min_history}")

  def init(self) -> dict:
    """The extras entries: norms f32[window] (a ring buffer), count i32[], spike_skipped i32[]."""
    return {NORMS: jnp.zeros((self.window,), jnp.float32), COUNT: jnp.zeros((), jnp.int32),
            SKIPPED: jnp.zeros((), jnp.int32)}

  def check(self, extras: dict, grad_norm: jax.Array) -> tuple[jax.Array, dict]:
    """(spike: bool[], the extras entries after recording grad_norm). Pure and jittable.

    Apply the returned entries to the new state whether or not the update is skipped: the window
    must see every norm, and the counter must count the skip.
    """
    norms, count = extras[NORMS], extras[COUNT]
    known = jnp.arange(self.window) < count
    median = jnp.nanmedian(jnp.where(known, norms, jnp.nan))
    grad_norm = grad_norm.astype(jnp.float32)
    finite = jnp.isfinite(grad_norm)
    spike = (count >= self.min_history) & finite & (grad_norm > self.factor * median)
    # A non-finite norm is the NaN guard's business; keep it out of the window.
    recorded = jnp.where(finite, norms.at[count % self.window].set(grad_norm), norms)
    return spike, {NORMS: recorded, COUNT: count + finite.astype(jnp.int32),
                   SKIPPED: extras[SKIPPED] + spike.astype(jnp.int32)}


def from_config(train_cfg) -> SpikeGuard | None:
  """train.spike_factor > 0 turns the guard on (train.spike_window, train.spike_min_history)."""
  factor = float(getattr(train_cfg, "spike_factor", 0.0) or 0.0)
  if factor <= 0:
    return None
  return SpikeGuard(factor, int(getattr(train_cfg, "spike_window", 100)),
                    int(getattr(train_cfg, "spike_min_history", 20)))
