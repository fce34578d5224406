"""SWA / EMA inside make_step against hand-computed averages; reduce-on-plateau bookkeeping."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxft.objectives.base import Weighted, make_step
from jaxft.train import averaging
from jaxft.core.state import TrainState

LR = 0.1
TARGETS = np.array([[1.0, -2.0], [3.0, 0.5], [-1.0, 1.0], [2.0, 2.0], [0.0, -1.0], [4.0, 1.0]],
                   np.float32)


def quadratic(apply_fn, params, batch, rng, ctx):
  del apply_fn, rng, ctx
  return jnp.sum(jnp.square(params["w"] - batch["x"])), {}


def _trajectory():
  """Hand SGD on L = |w - x_t|^2: w <- w - LR * 2 (w - x_t); returns w_0..w_T."""
  w = np.zeros(2, np.float64)
  out = [w.copy()]
  for x in TARGETS:
    w = w - LR * 2 * (w - x)
    out.append(w.copy())
  return out


def _run(update_extras, extras, batches=TARGETS):
  tx = optax.sgd(LR)
  trainable = {"w": jnp.zeros(2, jnp.float32)}
  state = TrainState.create(trainable, {}, tx, extras(trainable))
  step = jax.jit(make_step(None, {"q": Weighted(quadratic)}, tx, update_extras=update_extras))
  for x in batches:
    state, _ = step(state, {"x": jnp.asarray(x), "labels": jnp.zeros(1)}, jax.random.key(0))
  return state


def test_ema_matches_hand_recursion():
  d = 0.8
  state = _run(averaging.ema_update(d), averaging.init_ema)
  ws = _trajectory()
  ema = ws[0]
  for w in ws[1:]:
    ema = d * ema + (1 - d) * w
  np.testing.assert_allclose(np.asarray(state.extras["ema"]["w"]), ema, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(state.trainable["w"]), ws[-1], rtol=1e-5)
  ev = averaging.with_averaged(state, "ema")
  np.testing.assert_allclose(np.asarray(ev.trainable["w"]), ema, rtol=1e-5)


def test_swa_is_the_mean_of_the_snapshots():
  state = _run(averaging.swa_update(start=2, every=2), averaging.init_swa)
  ws = _trajectory()
  # updates done t = 1..6; snapshots at t = 2, 4, 6
  np.testing.assert_allclose(np.asarray(state.extras["swa"]["w"]), np.mean([ws[2], ws[4], ws[6]], 0),
                             rtol=1e-5)
  assert int(state.extras["swa/count"]) == 3
  late = _run(averaging.swa_update(start=100), averaging.init_swa)
  assert int(late.extras["swa/count"]) == 0
  with pytest.raises(ValueError, match="no snapshot"):
    averaging.with_averaged(late, "swa")


def test_ema_and_swa_chain_and_skip_nonfinite_steps():
  both = averaging.chain_update_extras(averaging.ema_update(0.5), averaging.swa_update(0, 1))
  init = lambda t: {**averaging.init_ema(t), **averaging.init_swa(t)}
  batches = np.concatenate([TARGETS[:2], [[np.nan, 0.0]], TARGETS[2:3]])
  state = _run(both, init, batches)
  ws = _trajectory()[:4]  # the NaN step is skipped: params and both averages unchanged
  ema = ws[0]
  for w in ws[1:]:
    ema = 0.5 * ema + 0.5 * w
  np.testing.assert_allclose(np.asarray(state.extras["ema"]["w"]), ema, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(state.extras["swa"]["w"]), np.mean(ws[1:], 0), rtol=1e-5)
  assert int(state.extras["swa/count"]) == 3 and int(state.extras["skipped_steps"]) == 1


def test_plateau_scales_updates_after_patience():
  tx = optax.chain(optax.sgd(1.0), averaging.plateau_scale("max"))
  params = {"w": jnp.ones(2)}
  opt = tx.init(params)
  assert averaging.plateau_scale_of(opt) == 1.0
  scales = []
  for v in [0.5, 0.6, 0.6, 0.59, 0.58, 0.7, 0.7, 0.7, 0.7]:
    opt = averaging.plateau_observe(opt, v, factor=0.5, patience=2)
    scales.append(averaging.plateau_scale_of(opt))
  # improvements at 0.5, 0.6, 0.7; bad evals 0.6, 0.59, 0.58 -> 3rd bad (> patience 2) halves
  assert scales == [1, 1, 1, 1, 0.5, 0.5, 0.5, 0.5, 0.25]
  updates, _ = tx.update({"w": jnp.ones(2)}, opt, params)
  np.testing.assert_allclose(np.asarray(updates["w"]), [-0.25, -0.25])
  m = averaging.plateau_step(averaging.plateau_scale("min").init(None), 1.0, mode="min")
  m = averaging.plateau_step(m, 2.0, mode="min", patience=0, factor=0.1, min_scale=0.2)
  assert float(m.scale) == pytest.approx(0.2) and float(m.best) == 1.0
  with pytest.raises(ValueError, match="no plateau_scale"):
    averaging.plateau_observe(optax.sgd(1.0).init(params), 0.1)
