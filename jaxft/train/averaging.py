"""Weight averaging during training (EMA, SWA) and reduce-on-plateau, as small pure pieces.

EMA (Polyak averaging; e.g. Tarvainen & Valpola 2017's teacher): after every update
  ema_t = d * ema_{t-1} + (1 - d) * theta_t,   ema_0 = theta_0.
SWA (Izmailov et al. 2018, "Averaging Weights Leads to Wider Optima"): from step `start` every
`every` steps, a running mean of the iterates,
  swa <- swa + (theta_t - swa) / (n + 1),  n <- n + 1,   for t >= start, (t - start) % every == 0,
so after n snapshots swa = (1/n) sum of the snapshots exactly (up to float rounding).

Both live in `state.extras` ("ema", "swa", "swa/count"), so they are saved in checkpoints and
survive resume; both are `update_extras(old_state, new_state, metrics) -> extras` functions for
`jaxft.objectives.base.make_step`, chained with an objective's own by `chain_update_extras`.
`with_averaged(state, "ema")` gives a state whose trainable params are the average, for eval.

Reduce-on-plateau: `plateau_scale()` is an optax transform multiplying updates by a scale kept in
its state; the loop calls `plateau_observe(opt_state, value, ...)` with the eval metric after
every eval (host side, outside the jitted step), which lowers the scale by `factor` after
`patience` evals without improvement (PyTorch's ReduceLROnPlateau semantics, mode max or min).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxft.core.state import Flat, TrainState

UpdateExtras = Callable[[TrainState, TrainState, Any], dict]


def _copy(tree: Flat) -> Flat:
  return jax.tree_util.tree_map(lambda x: jnp.array(x, jnp.float32, copy=True), tree)


def init_ema(trainable: Flat) -> dict:
  """extras entries for EMA: {"ema": float32 copy of the trainable params}."""
  return {"ema": _copy(trainable)}


def ema_update(decay: float) -> UpdateExtras:
  """update_extras for EMA with decay d in [0, 1): ema <- d * ema + (1 - d) * theta_new."""
  if not 0.0 <= decay < 1.0:
    raise ValueError(f"EMA decay must be in [0, 1), got {decay}")

  def update(old_state: TrainState, new_state: TrainState, metrics) -> dict:
    del old_state, metrics
    ema = jax.tree_util.tree_map(
        lambda e, p: decay * e + (1.0 - decay) * p.astype(jnp.float32),
        new_state.extras["ema"], new_state.trainable)
    return {**new_state.extras, "ema": ema}

  return update


def init_swa(trainable: Flat) -> dict:
  """extras entries for SWA: {"swa": float32 copy (replaced by the first snapshot), "swa/count": 0}."""
  return {"swa": _copy(trainable), "swa/count": jnp.zeros((), jnp.int32)}


def swa_update(start: int, every: int = 1) -> UpdateExtras:
  """update_extras for SWA: snapshot theta at steps t = start, start + every, ... (t counts updates
  done, i.e. new_state.step), running mean swa <- swa + (theta - swa) / (n + 1)."""
  if start < 0 or every < 1:
    raise ValueError(f"SWA needs start >= 0 and every >= 1, got start={start}, every={every}")

  def update(old_state: TrainState, new_state: TrainState, metrics) -> dict:
    del old_state, metrics
    t = new_state.step
    take = jnp.logical_and(t >= start, (t - start) % every == 0)
    n = new_state.extras["swa/count"]
    w = 1.0 / (n.astype(jnp.float32) + 1.0)
    swa = jax.tree_util.tree_map(
        lambda s, p: jnp.where(take, s + (p.astype(jnp.float32) - s) * w, s),
        new_state.extras["swa"], new_state.trainable)
    return {**new_state.extras, "swa": swa, "swa/count": n + take.astype(jnp.int32)}

  return update


def chain_update_extras(*fns: UpdateExtras | None) -> UpdateExtras | None:
  """Runs several update_extras in order, each seeing the extras the previous one returned."""
  fns = [f for f in fns if f is not None]
  if not fns:
    return None
  if len(fns) == 1:
    return fns[0]

  def update(old_state, new_state, metrics):
    for f in fns:
      new_state = new_state.replace(extras=f(old_state, new_state, metrics))
    return new_state.extras

  return update


def with_averaged(state: TrainState, which: str) -> TrainState:
  """The state with trainable params replaced by the "ema" or "swa" average (cast to the params'
  dtypes), for evaluation or export. SWA with no snapshot yet is refused."""
  if which not in ("ema", "swa"):
    raise ValueError(f"which must be 'ema' or 'swa', got {which!r}")
  if which not in state.extras:
    raise KeyError(f"state.extras has no {which!r} average; build the step with "
                   f"update_extras={which}_update(...) and init_{which}(trainable) in the extras")
  if which == "swa" and int(jax.device_get(state.extras["swa/count"])) == 0:
    raise ValueError("SWA has no snapshot yet (training has not reached its start step)")
  avg = state.extras[which]
  return state.replace(trainable={k: avg[k].astype(v.dtype) for k, v in state.trainable.items()})


# ---------------------------------------------------------------------------------------------
# Reduce on plateau.


class PlateauState(NamedTuple):
  scale: jax.Array  # f32[]: multiplies every update (i.e. the learning rate)
  best: jax.Array  # f32[]: best metric seen (+/-inf before the first observation)
  bad_evals: jax.Array  # i32[]: evals since the last improvement
  cooldown: jax.Array  # i32[]: evals left before bad evals count again


def plateau_scale(mode: str = "max") -> optax.GradientTransformation:
  """Scales updates by PlateauState.scale (1 at init). Put it last in the optax chain."""
  if mode not in ("max", "min"):
    raise ValueError(f"plateau mode must be 'max' or 'min', got {mode!r}")
  worst = -jnp.inf if mode == "max" else jnp.inf

  def init_fn(params):
    del params
    return PlateauState(jnp.ones((), jnp.float32), jnp.asarray(worst, jnp.float32),
                        jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    return jax.tree_util.tree_map(lambda u: u * state.scale.astype(u.dtype), updates), state

  return optax.GradientTransformation(init_fn, update_fn)


def plateau_step(s: PlateauState, value: float, *, mode: str = "max", factor: float = 0.5,
                 patience: int = 2, threshold: float = 1e-4, cooldown: int = 0,
                 min_scale: float = 0.0) -> PlateauState:
  """One eval's bookkeeping: improvement means value > best * (1 + threshold) (max mode, relative,
  as PyTorch's default threshold_mode="rel") or value < best * (1 - threshold) (min); after more
  than `patience` evals without one the scale is multiplied by `factor` (not below min_scale), the
  count resets and `cooldown` evals are ignored."""
  v = float(value)
  best = float(s.best)
  if mode == "max":
    improved = v > best + abs(best) * threshold if best != -float("inf") else True
  else:
    improved = v < best - abs(best) * threshold if best != float("inf") else True
  scale, bad, cool = float(s.scale), int(s.bad_evals), int(s.cooldown)
  if improved:
    best, bad = v, 0
  elif cool > 0:
    cool -= 1
  else:
    bad += 1
  if bad > patience:
    scale, bad, cool = max(scale * factor, min_scale), 0, cooldown
  return PlateauState(jnp.asarray(scale, jnp.float32), jnp.asarray(best, jnp.float32),
                      jnp.asarray(bad, jnp.int32), jnp.asarray(cool, jnp.int32))


def _is_plateau(x) -> bool:
  return isinstance(x, PlateauState)


def plateau_observe(opt_state, value: float, **kwargs):
  """opt_state with every PlateauState inside advanced by plateau_step(value, **kwargs)."""
  found = []

  def f(x):
    if _is_plateau(x):
      found.append(x)
      return plateau_step(jax.device_get(x), value, **kwargs)
    return x

  out = jax.tree_util.tree_map(f, opt_state, is_leaf=_is_plateau)
  if not found:
    raise ValueError("no plateau_scale() in the optimizer; add it to the chain (schedule=plateau)")
  return out


def plateau_scale_of(opt_state) -> float:
  """The current plateau scale (for logging lr = base lr * scale)."""
  leaves = jax.tree_util.tree_leaves(opt_state, is_leaf=_is_plateau)
  for x in leaves:
    if _is_plateau(x):
      return float(x.scale)
  raise ValueError("no plateau_scale() in the optimizer")
