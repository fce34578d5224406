"""Adversarial objectives: norm bounds, FGM/PGD/FreeLB directions, divergences against hand
computations, stop-gradient boundaries, seeded noise, and real steps through make_step."""

import functools
import math
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jaxft.models.outputs import ModelOutput
from jaxft.objectives import adversarial as A
from jaxft.objectives import perturb as P
from jaxft.objectives import registry
from jaxft.objectives.base import StepContext, make_loss_fn, make_step
from jaxft.objectives.supervised import task_term
from jaxft.core.state import TrainState, flatten

CTX = StepContext(step=jnp.zeros((), jnp.int32), extras={})
# Compiling six adversarial steps dominates this file's time on 2 CPU cores; the unoptimised
# backend compiles about twice as fast and the tiny graphs run just as well.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


# ---------------------------------------------------------------------------------------------
# A tiny model with the apply_fn contract: embedding lookup (+ perturbation), optional tanh mixing
# and dropout, masked mean-pool (or per token), dense head.


def make_apply(token_level=False, dropout=0.0):
  def apply_fn(params, batch, *, rng=None, deterministic=True, embedding_perturbation=None,
               output_hidden_states=False, output_attentions=False):
    emb = params["backbone"]["word"][batch["input_ids"]]
    x = emb if embedding_perturbation is None else emb + embedding_perturbation
    if "mix" in params["backbone"]:
      x = jnp.tanh(x @ params["backbone"]["mix"])
    if dropout and not deterministic:
      keep = jax.random.bernoulli(rng, 1.0 - dropout, x.shape)
      x = jnp.where(keep, x / (1.0 - dropout), 0.0)
    m = batch["attention_mask"].astype(jnp.float32)[:, :, None]
    h = x if token_level else jnp.sum(x * m, 1) / jnp.sum(m, 1)
    logits = h @ params["head"]["kernel"] + params["head"]["bias"]
    return ModelOutput(last_hidden_state=x, embeddings=emb, logits=logits)
  return apply_fn


def make_params(seed=0, vocab=20, hidden=6, num_labels=3, linear=False):
  k = jax.random.split(jax.random.key(seed), 3)
  backbone = {"word": jax.random.normal(k[0], (vocab, hidden))}
  if not linear:
    backbone["mix"] = jax.random.normal(k[1], (hidden, hidden)) / math.sqrt(hidden)
  return {"backbone": backbone,
          "head": {"kernel": jax.random.normal(k[2], (hidden, num_labels)),
                   "bias": jnp.zeros(num_labels)}}


def make_batch(kind="classification", seed=1, b=4, s=5, vocab=20, num_labels=3):
  k = jax.random.split(jax.random.key(seed), 2)
  lengths = np.array([s, s - 1, s - 2, 2][:b] + [s] * max(0, b - 4))
  mask = (np.arange(s)[None, :] < lengths[:, None]).astype(np.int32)
  batch = {"input_ids": jax.random.randint(k[0], (b, s), 0, vocab).astype(jnp.int32),
           "attention_mask": jnp.asarray(mask), "example_mask": jnp.ones(b, jnp.float32)}
  if kind == "classification":
    batch["labels"] = jnp.arange(b, dtype=jnp.int32) % num_labels
  elif kind == "regression":
    batch["labels"] = jnp.linspace(-1.0, 1.0, b).astype(jnp.float32)
  else:
    labels = np.array(jax.random.randint(k[1], (b, s), 0, num_labels))
    labels[mask == 0] = -100
    labels[:, 0] = -100  # e.g. [CLS]
    batch["labels"] = jnp.asarray(labels, jnp.int32)
  return batch


def ce_of_delta(apply_fn, params, batch):
  """Reference loss written independently of jaxft: mean softmax CE at x + delta."""
  def f(delta):
    logits = apply_fn(params, batch, embedding_perturbation=delta).logits
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]))
  return f


def np_kl(p_logits, q_logits):
  p = np.exp(p_logits - p_logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  q = np.exp(q_logits - q_logits.max(-1, keepdims=True))
  q /= q.sum(-1, keepdims=True)
  return np.sum(p * (np.log(p) - np.log(q)), -1)


# ---------------------------------------------------------------------------------------------
# Norms and projections


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_projection_and_random_start_respect_per_example_bound(norm):
  eps = 0.5
  mask = jnp.asarray(np.array([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], np.float32))[:, :, None]
  scales = jnp.array([10.0, 0.01, 3.0, 0.1])[:, None, None]
  delta = jax.random.normal(jax.random.key(0), (4, 3, 2)) * scales * mask
  proj = P.project(delta, norm, eps)
  norms = np.asarray(P.per_example_norm(proj, norm))
  assert np.all(norms <= eps * (1 + 1e-6))
  before = np.asarray(P.per_example_norm(delta, norm))
  for b in range(4):
    if before[b] <= eps:  # inside the ball: untouched, bitwise
      np.testing.assert_array_equal(np.asarray(proj[b]), np.asarray(delta[b]))
    elif norm == "l2":  # outside: radial projection onto the sphere
      np.testing.assert_allclose(norms[b], eps, rtol=1e-6)
      np.testing.assert_allclose(np.asarray(proj[b]), np.asarray(delta[b]) * eps / before[b],
                                 rtol=1e-6)
  if norm == "linf":
    np.testing.assert_array_equal(np.asarray(proj), np.clip(np.asarray(delta), -eps, eps))
  start = P.random_in_ball(jax.random.key(3), (4, 3, 2), mask, norm, eps)
  assert np.all(np.asarray(P.per_example_norm(start, norm)) <= eps * (1 + 1e-6))
  assert np.all(np.asarray(start)[np.broadcast_to(np.asarray(mask) == 0, start.shape)] == 0)
  # eps <= 0 means unbounded (FreeLB's adv_max_norm = 0)
  np.testing.assert_array_equal(np.asarray(P.project(delta, norm, 0.0)), np.asarray(delta))


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_pgd_stays_in_ball_and_off_padding(norm):
  apply_fn, params, batch = make_apply(), make_params(), make_batch()
  shape = P.embedding_shape(apply_fn, params, batch)
  assert shape == (4, 5, 6)
  mask = P.token_mask(batch, shape)
  eps = 0.3
  delta = jax.jit(lambda p: P.pgd_delta(ce_of_delta(apply_fn, p, batch), shape, mask, epsilon=eps,
                                        alpha=0.25, steps=4, norm=norm, rng=jax.random.key(0),
                                        random_init=True))(params)
  norms = np.asarray(P.per_example_norm(delta, norm))
  assert np.all(norms <= eps * (1 + 1e-5))
  # Four steps of 0.25 from inside the ball push every example onto its boundary.
  np.testing.assert_allclose(norms, eps, rtol=1e-5)
  assert np.all(np.asarray(delta)[np.asarray(batch["attention_mask"]) == 0] == 0)


# ---------------------------------------------------------------------------------------------
# FGM / PGD / FreeLB


def test_fgm_direction_is_the_normalized_gradient():
  apply_fn, params, batch = make_apply(), make_params(), make_batch()
  shape = P.embedding_shape(apply_fn, params, batch)
  mask = P.token_mask(batch, shape)
  eps = 0.7
  term = A.fgm_term("classification", epsilon=eps)

  @jax.jit
  def run(params):
    ref = ce_of_delta(apply_fn, params, batch)
    deltas = {n: P.fgm_delta(ref, shape, mask, epsilon=eps, norm=n) for n in ("l2", "linf")}
    return (jax.grad(ref)(jnp.zeros(shape)), deltas, term(apply_fn, params, batch,
                                                          jax.random.key(0), CTX))

  g, deltas, (loss, metrics) = run(params)
  g = np.asarray(g)
  ref = ce_of_delta(apply_fn, params, batch)
  for norm in ("l2", "linf"):
    delta = np.asarray(deltas[norm])
    if norm == "l2":
      expected = eps * g / np.sqrt((g ** 2).sum(axis=(1, 2), keepdims=True))
      np.testing.assert_allclose(np.sqrt((delta ** 2).sum(axis=(1, 2))), eps, rtol=1e-6)
    else:
      expected = eps * np.sign(g)
    np.testing.assert_allclose(delta, expected, rtol=1e-5, atol=1e-7)
  # The term's loss is the CE at x + that delta.
  expected_delta = eps * g / np.sqrt((g ** 2).sum(axis=(1, 2), keepdims=True))
  np.testing.assert_allclose(float(loss), float(ref(jnp.asarray(expected_delta))), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["delta_norm"]), eps, rtol=1e-5)
  assert float(loss) > float(ref(jnp.zeros(shape)))  # the attack raises the loss


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_pgd_one_step_without_random_start_equals_fgm(norm):
  apply_fn, params, batch = make_apply(), make_params(), make_batch()
  shape = P.embedding_shape(apply_fn, params, batch)
  mask = P.token_mask(batch, shape)
  ref = ce_of_delta(apply_fn, params, batch)
  fgm = P.fgm_delta(ref, shape, mask, epsilon=0.4, norm=norm)
  pgd = P.pgd_delta(ref, shape, mask, epsilon=0.4, alpha=0.4, steps=1, norm=norm)
  np.testing.assert_allclose(np.asarray(pgd), np.asarray(fgm), rtol=1e-6, atol=1e-8)
  kw = dict(epsilon=0.4, norm=norm)
  l_fgm, _ = A.fgm_term("classification", **kw)(apply_fn, params, batch, jax.random.key(0), CTX)
  l_pgd, _ = A.pgd_term("classification", alpha=0.4, steps=1, random_init=False, **kw)(
      apply_fn, params, batch, jax.random.key(0), CTX)
  np.testing.assert_allclose(float(l_pgd), float(l_fgm), rtol=1e-6)


def test_adversarial_gradient_treats_delta_as_constant():
  """No second-order path: d/dtheta L(theta, x + delta(theta)) uses delta as a fixed input."""
  apply_fn, params, batch = make_apply(), make_params(), make_batch()
  shape = P.embedding_shape(apply_fn, params, batch)
  mask = P.token_mask(batch, shape)
  term = A.pgd_term("classification", epsilon=0.5, alpha=0.2, steps=3, random_init=False)
  grads = jax.grad(lambda p: term(apply_fn, p, batch, jax.random.key(0), CTX)[0])(params)
  delta = P.pgd_delta(ce_of_delta(apply_fn, params, batch), shape, mask, epsilon=0.5, alpha=0.2,
                      steps=3)
  ref = jax.grad(lambda p: ce_of_delta(apply_fn, p, batch)(delta))(params)
  for k, v in flatten(ref).items():
    np.testing.assert_allclose(np.asarray(flatten(grads)[k]), np.asarray(v), rtol=1e-5, atol=1e-7)


def test_freelb_averages_the_k_adversarial_losses_and_gradients():
  apply_fn, params, batch = make_apply(), make_params(), make_batch()
  shape = P.embedding_shape(apply_fn, params, batch)
  ref = ce_of_delta(apply_fn, params, batch)
  alpha = 0.3
  # By hand, K = 2 and no random start: delta_0 = 0, delta_1 = alpha g / ||g||_2 per example.
  g = np.asarray(jax.grad(ref)(jnp.zeros(shape)))
  d1 = jnp.asarray(alpha * g / np.sqrt((g ** 2).sum(axis=(1, 2), keepdims=True)))
  d0 = jnp.zeros(shape)
  term = A.freelb_term("classification", steps=2, alpha=alpha, epsilon=0.0, init_mag=0.0)
  f = lambda p: term(apply_fn, p, batch, jax.random.key(0), CTX)[0]
  np.testing.assert_allclose(float(f(params)), 0.5 * (float(ref(d0)) + float(ref(d1))), rtol=1e-5)
  grads = flatten(jax.grad(f)(params))
  g0 = flatten(jax.grad(lambda p: ce_of_delta(apply_fn, p, batch)(d0))(params))
  g1 = flatten(jax.grad(lambda p: ce_of_delta(apply_fn, p, batch)(d1))(params))
  for k in g0:
    np.testing.assert_allclose(np.asarray(grads[k]), 0.5 * (np.asarray(g0[k]) + np.asarray(g1[k])),
                               rtol=1e-5, atol=1e-7)
  # With a max norm, every delta_k is projected into the ball.
  mask = P.token_mask(batch, shape)
  deltas = A.freelb_deltas(ref, A.freelb_init(jax.random.key(2), shape, mask, "l2", 0.1), mask,
                           steps=4, alpha=1.0, epsilon=0.2, norm="l2")
  assert len(deltas) == 4
  for d in deltas[1:]:
    np.testing.assert_allclose(np.asarray(P.per_example_norm(d, "l2")), 0.2, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Divergences on fixed logits


def test_symmetric_kl_matches_hand_computation():
  # P = softmax([0, log 3]) = (1/4, 3/4), Q = softmax([0, 0]) = (1/2, 1/2)
  p = jnp.array([[0.0, math.log(3.0)]])
  q = jnp.array([[0.0, 0.0]])
  kl_pq = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
  kl_qp = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
  np.testing.assert_allclose(float(P.kl_logits(p, q)[0]), kl_pq, rtol=1e-6)
  np.testing.assert_allclose(float(P.kl_logits(q, p)[0]), kl_qp, rtol=1e-6)
  for stop in ("none", "each"):
    np.testing.assert_allclose(float(P.symmetric_kl(p, q, stop)[0]), kl_pq + kl_qp, rtol=1e-6)
  w = jnp.ones(1)
  for mode, value in (("target", kl_pq), ("each", kl_pq + kl_qp), ("none", kl_pq + kl_qp)):
    np.testing.assert_allclose(float(P.divergence("classification", p, q, w, mode=mode)), value,
                               rtol=1e-6)


def test_divergence_gradients_follow_the_stop_gradient_convention():
  rng = np.random.default_rng(0)
  c, o = jnp.asarray(rng.normal(size=(3, 4))), jnp.asarray(rng.normal(size=(3, 4)))
  w = jnp.array([1.0, 1.0, 0.0])  # the padding row contributes nothing
  grad_c = lambda mode: jax.grad(lambda c: P.divergence("classification", c, o, w, mode=mode))(c)
  # VAT: the clean prediction is a constant target.
  np.testing.assert_array_equal(np.asarray(grad_c("target")), 0.0)
  # SMART: each direction pulls one side towards the other, fixed, prediction.
  ref = jax.grad(lambda c: jnp.sum(P.kl_logits(o, c) * w) / 2.0)(c)
  np.testing.assert_allclose(np.asarray(grad_c("each")), np.asarray(ref), rtol=1e-6, atol=1e-8)
  # R3F: the full symmetric KL gradient.
  full = jax.grad(lambda c: jnp.sum((P.kl_logits(c, o) + P.kl_logits(o, c)) * w) / 2.0)(c)
  np.testing.assert_allclose(np.asarray(grad_c("none")), np.asarray(full), rtol=1e-6, atol=1e-8)
  assert np.all(np.asarray(grad_c("none"))[2] == 0)
  # Regression: squared error of logits[..., 0], same value in every mode.
  yc, yo = jnp.array([[1.0], [2.0]]), jnp.array([[0.5], [4.0]])
  for mode in ("target", "each", "none"):
    np.testing.assert_allclose(float(P.divergence("regression", yc, yo, jnp.ones(2), mode=mode)),
                               (0.25 + 4.0) / 2, rtol=1e-6)


def test_token_divergence_averages_over_labelled_tokens_only():
  batch = make_batch("token_classification")
  w = np.asarray(P.prediction_weights("token_classification", batch))
  np.testing.assert_array_equal(w, (np.asarray(batch["labels"]) != -100).astype(np.float32))
  unl = {k: v for k, v in batch.items() if k != "labels"}
  np.testing.assert_array_equal(np.asarray(P.prediction_weights("token_classification", unl)),
                                np.asarray(batch["attention_mask"], np.float32))
  rng = np.random.default_rng(1)
  c, o = rng.normal(size=(4, 5, 3)), rng.normal(size=(4, 5, 3))
  got = float(P.divergence("token_classification", jnp.asarray(c), jnp.asarray(o), jnp.asarray(w),
                           mode="target"))
  np.testing.assert_allclose(got, float((np_kl(c, o) * w).sum() / w.sum()), rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# VAT, SMART, R3F


def test_vat_direction_is_one_power_iteration_of_the_kl_hessian():
  """Linear model: logits = W^T mean_s(e_s + r_s). Then d KL / d r at xi d is xi H d + O(xi^2),
  H = J^T (diag(p) - p p^T) J, so r_adv = eps * normalize(H d0), checked against numpy."""
  apply_fn, params, batch = make_apply(), make_params(linear=True), make_batch()
  shape = P.embedding_shape(apply_fn, params, batch)
  mask = P.token_mask(batch, shape)
  clean = apply_fn(params, batch).logits
  w = P.prediction_weights("classification", batch)
  div = lambda r: P.divergence("classification", clean,
                               apply_fn(params, batch, embedding_perturbation=r).logits, w,
                               mode="target")
  rng = jax.random.key(5)
  r = np.asarray(A.vat_delta(div, shape, mask, rng, epsilon=2.0, xi=1e-3))
  d0 = np.asarray(jax.random.normal(rng, shape)) * np.asarray(mask)
  W = np.asarray(params["head"]["kernel"], np.float64)
  m = np.asarray(mask)[..., 0]
  p = np.exp(np.asarray(clean, np.float64))
  p /= p.sum(-1, keepdims=True)
  for b in range(shape[0]):
    n = m[b].sum()
    J = np.einsum("hc,s->csh", W, m[b] / n).reshape(W.shape[1], -1)  # [C, S*H]
    H = J.T @ (np.diag(p[b]) - np.outer(p[b], p[b])) @ J
    hd = H @ d0[b].reshape(-1)
    expected = 2.0 * hd / np.linalg.norm(hd)
    cos = np.dot(r[b].reshape(-1), expected) / (np.linalg.norm(r[b]) * np.linalg.norm(expected))
    assert cos > 0.999, (b, cos)
    np.testing.assert_allclose(np.linalg.norm(r[b]), 2.0, rtol=1e-5)
  # The term's value is KL(p(x) || p(x + r_adv)) at that r_adv (labeled part: fold_in(rng, 0),
  # its noise: fold_in of that with 1), computed here with numpy.
  loss, _ = A.vat_term("classification", epsilon=2.0, xi=1e-3)(apply_fn, params, batch, rng, CTX)
  r_term = A.vat_delta(div, shape, mask, jax.random.fold_in(jax.random.fold_in(rng, 0), 1),
                       epsilon=2.0, xi=1e-3)
  adv = np.asarray(apply_fn(params, batch, embedding_perturbation=r_term).logits)
  np.testing.assert_allclose(float(loss), np_kl(np.asarray(clean), adv).mean(), rtol=1e-5)


def test_vat_gradient_stops_at_the_clean_target_and_uses_unlabeled_rows():
  apply_fn, params = make_apply(), make_params()
  batch = make_batch()
  unl = make_batch(seed=7, b=3)
  full = {**batch, **{f"unlabeled/{k}": v for k, v in unl.items() if k != "labels"},
          "unlabeled/strong/input_ids": unl["input_ids"]}  # a deeper view VAT must ignore
  rng = jax.random.key(0)
  kw = dict(epsilon=0.5, xi=0.1, power_iterations=1)
  loss, metrics = jax.jit(lambda p: A.vat_term("classification", **kw)(apply_fn, p, full, rng, CTX))(
      params)
  l_lab, n_lab = A.vat_part_loss("classification", apply_fn, params, batch,
                                 jax.random.fold_in(rng, 0), **kw)
  unl_part = {k: v for k, v in unl.items() if k != "labels"}
  l_unl, n_unl = A.vat_part_loss("classification", apply_fn, params, unl_part,
                                 jax.random.fold_in(rng, 1), **kw)
  assert (float(n_lab), float(n_unl)) == (4.0, 3.0)
  np.testing.assert_allclose(float(loss), (4 * float(l_lab) + 3 * float(l_unl)) / 7, rtol=1e-6)
  np.testing.assert_allclose(float(metrics["lds_unlabeled"]), float(l_unl), rtol=1e-6)
  # The parameter gradient equals that of KL(const p_clean || p(x + const r_adv)).
  shape = P.embedding_shape(apply_fn, params, batch)
  mask = P.token_mask(batch, shape)
  w = P.prediction_weights("classification", batch)
  clean = apply_fn(params, batch).logits
  div = lambda r: P.divergence("classification", clean,
                               apply_fn(params, batch, embedding_perturbation=r).logits, w,
                               mode="target")
  r = A.vat_delta(div, shape, mask, jax.random.fold_in(jax.random.fold_in(rng, 0), 1), **kw)
  ref = jax.grad(lambda p: jnp.mean(P.kl_logits(
      clean, apply_fn(p, batch, embedding_perturbation=r).logits)))(params)
  got = jax.jit(jax.grad(
      lambda p: A.vat_term("classification", **kw)(apply_fn, p, batch, rng, CTX)[0]))(params)
  for k, v in flatten(ref).items():
    np.testing.assert_allclose(np.asarray(flatten(got)[k]), np.asarray(v), rtol=1e-4, atol=1e-7)


def test_smart_regularizer_value_bound_and_gradient():
  apply_fn, params, batch = make_apply(), make_params(), make_batch()
  rng = jax.random.key(3)
  kw = dict(epsilon=0.05, noise_std=0.01, step_size=0.1, steps=2, norm="linf")
  loss, metrics = A.smart_term("classification", **kw)(apply_fn, params, batch, rng, CTX)
  shape = P.embedding_shape(apply_fn, params, batch)
  mask = P.token_mask(batch, shape)
  clean = apply_fn(params, batch).logits
  w = P.prediction_weights("classification", batch)
  div = lambda d: P.divergence("classification", clean,
                               apply_fn(params, batch, embedding_perturbation=d).logits, w,
                               mode="each")
  delta = A.smart_delta(div, shape, mask, jax.random.fold_in(rng, 1), **kw)
  assert np.all(np.abs(np.asarray(delta)) <= 0.05 + 1e-8)
  np.testing.assert_allclose(float(metrics["delta_norm"]), 0.05, rtol=1e-5)  # a step of 0.1 > eps
  adv = apply_fn(params, batch, embedding_perturbation=delta).logits
  c, a = np.asarray(clean), np.asarray(adv)
  np.testing.assert_allclose(float(loss), (np_kl(c, a) + np_kl(a, c)).mean(), rtol=1e-5)
  # Gradient: KL(const clean || adv(theta)) + KL(const adv || clean(theta)) at the constant delta.
  ref = jax.grad(lambda p: jnp.mean(
      P.kl_logits(clean, apply_fn(p, batch, embedding_perturbation=delta).logits)
      + P.kl_logits(adv, apply_fn(p, batch).logits)))(params)
  got = jax.grad(lambda p: A.smart_term("classification", **kw)(apply_fn, p, batch, rng, CTX)[0])(
      params)
  for k, v in flatten(ref).items():
    np.testing.assert_allclose(np.asarray(flatten(got)[k]), np.asarray(v), rtol=1e-4, atol=1e-7)


def test_smart_bregman_term_and_ema_teacher():
  apply_fn, params, batch = make_apply(), make_params(), make_batch()
  teacher_params = make_params(seed=9)
  flat_t = {k: v for k, v in flatten(teacher_params).items() if k.startswith("head/")}
  ctx = StepContext(step=jnp.zeros((), jnp.int32), extras={A.TEACHER: flat_t})
  term = A.bregman_term("classification")
  loss, _ = term(apply_fn, params, batch, jax.random.key(0), ctx)
  # Teacher: only the head is trainable, so the backbone is shared with the student.
  mixed = {"backbone": params["backbone"], "head": teacher_params["head"]}
  s = np.asarray(apply_fn(params, batch).logits)
  t = np.asarray(apply_fn(mixed, batch).logits)
  np.testing.assert_allclose(float(loss), (np_kl(s, t) + np_kl(t, s)).mean(), rtol=1e-5)
  # No gradient into the teacher (state extras).
  g_t = jax.grad(lambda e: term(apply_fn, params, batch, jax.random.key(0),
                                StepContext(step=ctx.step, extras={A.TEACHER: e}))[0])(flat_t)
  for v in g_t.values():
    np.testing.assert_array_equal(np.asarray(v), 0.0)
  t_const = jnp.asarray(t)
  ref = jax.grad(lambda p: jnp.mean(P.symmetric_kl(apply_fn(p, batch).logits, t_const)))(params)
  got = jax.grad(lambda p: term(apply_fn, p, batch, jax.random.key(0), ctx)[0])(params)
  for k, v in flatten(ref).items():
    np.testing.assert_allclose(np.asarray(flatten(got)[k]), np.asarray(v), rtol=1e-5, atol=1e-7)
  with pytest.raises(KeyError, match="init_extras"):
    term(apply_fn, params, batch, jax.random.key(0), CTX)


def test_r3f_noise_is_seeded():
  mask = jnp.ones((2, 3, 1)).at[1, 2].set(0.0)
  shape = (2, 3, 4096)
  a = A.r3f_noise(jax.random.key(0), shape, mask, noise_std=1e-5)
  b = A.r3f_noise(jax.random.key(0), shape, mask, noise_std=1e-5)
  c = A.r3f_noise(jax.random.key(1), shape, mask, noise_std=1e-5)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.array_equal(np.asarray(a), np.asarray(c))
  real = np.asarray(a)[np.broadcast_to(np.asarray(mask) == 1, shape)]
  np.testing.assert_allclose(real.std(), 1e-5, rtol=0.03)
  assert np.all(np.asarray(a)[1, 2] == 0)
  u = np.asarray(A.r3f_noise(jax.random.key(0), shape, mask, noise_std=1e-5, noise_type="uniform"))
  assert np.abs(u).max() <= 1e-5 and np.abs(u).max() > 0.99e-5
  apply_fn, params, batch = make_apply(), make_params(), make_batch()
  term = A.r3f_term("classification", noise_std=0.05)
  l0 = term(apply_fn, params, batch, jax.random.key(0), CTX)[0]
  np.testing.assert_array_equal(np.asarray(l0),
                                np.asarray(term(apply_fn, params, batch, jax.random.key(0), CTX)[0]))
  assert float(l0) != float(term(apply_fn, params, batch, jax.random.key(1), CTX)[0])
  # Value: symmetric KL at z = the documented draw fold_in(rng, 1).
  z = A.r3f_noise(jax.random.fold_in(jax.random.key(0), 1), (4, 5, 6),
                  P.token_mask(batch, (4, 5, 6)), noise_std=0.05)
  c = np.asarray(apply_fn(params, batch).logits)
  n = np.asarray(apply_fn(params, batch, embedding_perturbation=z).logits)
  np.testing.assert_allclose(float(l0), (np_kl(c, n) + np_kl(n, c)).mean(), rtol=1e-4)
  with pytest.raises(ValueError, match="noise_type"):
    A.r3f_noise(jax.random.key(0), shape, mask, noise_std=1.0, noise_type="laplace")


def test_shared_dropout_rng_makes_zero_perturbation_zero_divergence():
  """All passes inside a term share one dropout draw: with no noise, R3F's divergence is exactly 0."""
  apply_fn, params, batch = make_apply(dropout=0.3), make_params(), make_batch()
  loss, _ = A.r3f_term("classification", noise_std=0.0)(apply_fn, params, batch,
                                                         jax.random.key(4), CTX)
  assert float(loss) == 0.0


# ---------------------------------------------------------------------------------------------
# Registered objectives through make_step


NAMES = ["fgm", "pgd", "freelb", "smart", "vat", "r3f"]


def build(name, kind, **overrides):
  opts = ml_collections.ConfigDict(registry.defaults()[name])
  for k, v in overrides.items():
    opts[k] = v
  cfg = ml_collections.ConfigDict({"name": name, name: opts})
  return registry.build(cfg, types.SimpleNamespace(kind=kind))


def test_registry_defaults_and_terms():
  assert set(NAMES) <= set(registry.names())
  d = registry.defaults()
  assert d["smart"]["epsilon"] == 1e-5 and d["smart"]["momentum"] == 0.99
  assert set(build("fgm", "classification").terms) == {"sup", "adv"}
  assert set(build("freelb", "classification").terms) == {"adv"}  # FreeLB: perturbed losses only
  smart = build("smart", "classification")
  assert set(smart.terms) == {"sup", "adv", "prox"} and smart.init_extras is not None
  with pytest.raises(ValueError, match="norm"):
    build("fgm", "classification", norm="l1")


TRAIN_OVERRIDES = {"fgm": dict(epsilon=0.3), "pgd": dict(epsilon=0.3, alpha=0.15, steps=2),
                   "freelb": dict(steps=2, alpha=0.1), "smart": dict(epsilon=1e-3, steps=1),
                   "vat": dict(epsilon=0.3), "r3f": dict(noise_std=1e-3)}


def test_each_objective_trains_the_toy_model():
  """All six objectives step side by side in one jitted function (one compile, not six)."""
  apply_fn, params, batch = make_apply(), make_params(), make_batch(b=8)
  flat, tx = flatten(params), optax.adam(0.05)
  steps, states = {}, {}
  for name in NAMES:
    obj = build(name, "classification", **TRAIN_OVERRIDES[name])
    extras = obj.init_extras(flat, {}) if obj.init_extras else None
    states[name] = TrainState.create(flat, {}, tx, extras=extras)
    steps[name] = make_step(apply_fn, obj.terms, tx, update_extras=obj.update_extras)
  step_all = jax.jit(lambda states, rng: {n: steps[n](states[n], batch, rng) for n in NAMES},
                     compiler_options=FAST_COMPILE)
  history = []
  for i in range(25):
    prev = states
    out = step_all(states, jax.random.key(i))
    states = {n: out[n][0] for n in NAMES}
    history.append({n: out[n][1] for n in NAMES})
  for name in NAMES:
    key = "loss/sup" if "loss/sup" in history[0][name] else "loss"
    losses = [float(m[name][key]) for m in history]
    assert all(np.isfinite(losses)) and losses[-1] < 0.6 * losses[0], (name, losses)
    assert float(history[-1][name]["nonfinite"]) == 0.0
  # SMART's teacher is the EMA beta t + (1 - beta) theta of the updated params.
  for k, t in states["smart"].extras[A.TEACHER].items():
    np.testing.assert_allclose(
        np.asarray(t), 0.99 * np.asarray(prev["smart"].extras[A.TEACHER][k])
        + 0.01 * np.asarray(states["smart"].trainable[k]), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", ["regression", "token_classification"])
def test_every_objective_handles_regression_and_tokens(kind):
  labels = 1 if kind == "regression" else 3
  apply_fn = make_apply(token_level=kind == "token_classification")
  params, batch = make_params(num_labels=labels), make_batch(kind)
  sup = task_term(kind)
  fns = {}
  for name in NAMES:
    obj = build(name, kind, **TRAIN_OVERRIDES[name])
    extras = obj.init_extras(flatten(params), {}) if obj.init_extras else {}
    fns[name] = (make_loss_fn(apply_fn, obj.terms),
                 StepContext(step=jnp.zeros((), jnp.int32), extras=extras))

  @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
  def run(params, rng):
    out = {n: jax.value_and_grad(f, has_aux=True)(flatten(params), {}, batch, rng, ctx)
           for n, (f, ctx) in fns.items()}
    return out, sup(apply_fn, params, batch, rng, CTX)[0]

  out, clean = run(params, jax.random.key(0))
  for name, ((total, m), grads) in out.items():
    assert np.isfinite(float(total)) and float(m["loss/adv"]) >= 0.0, (name, m)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads.values())
    assert float(optax.tree.norm(grads)) > 0.0
    if name in ("fgm", "pgd", "freelb"):  # the attack raises the supervised loss
      assert float(m["loss/adv"]) > float(clean), (name, m, clean)
    else:  # a non-zero perturbation gives a non-zero divergence
      assert float(m["loss/adv"]) > 0.0, (name, m)


@pytest.mark.slow
def test_each_objective_trains_a_tiny_random_bert():
  """Integration with the real model port: every objective's step (registry defaults, 2 ascent
  steps) runs through make_step on a tiny BERT and lowers its loss on a fixed batch."""
  from jaxft.models import init_random
  model = init_random({"model_type": "bert", "vocab_size": 64, "hidden_size": 32,
                       "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                       "max_position_embeddings": 32}, head="sequence_classification",
                      num_labels=2, seed=0, hidden_dropout=0.0, attention_dropout=0.0)
  k = jax.random.split(jax.random.key(0), 2)
  batch = {"input_ids": jax.random.randint(k[0], (8, 8), 1, 64).astype(jnp.int32),
           "attention_mask": jnp.asarray((np.arange(8)[None] < 4 + np.arange(8)[:, None] % 5),
                                         jnp.int32),
           "labels": jnp.arange(8, dtype=jnp.int32) % 2, "example_mask": jnp.ones(8, jnp.float32)}
  flat, tx = flatten(model.params), optax.adam(3e-3)
  steps, states = {}, {}
  for name in NAMES:
    obj = build(name, "classification", **({"steps": 2} if name in ("pgd", "freelb") else {}))
    extras = obj.init_extras(flat, {}) if obj.init_extras else None
    states[name] = TrainState.create(flat, {}, tx, extras=extras)
    steps[name] = make_step(model.apply, obj.terms, tx, update_extras=obj.update_extras)
  step_all = jax.jit(lambda states, rng: {n: steps[n](states[n], batch, rng) for n in NAMES},
                     compiler_options=FAST_COMPILE)
  history = []
  for i in range(8):
    out = step_all(states, jax.random.key(i))
    states = {n: out[n][0] for n in NAMES}
    history.append({n: out[n][1] for n in NAMES})
  for name in NAMES:
    losses = [float(m[name]["loss"]) for m in history]
    assert all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0], (name, losses)
    assert float(history[-1][name]["loss/adv"]) > 0.0
