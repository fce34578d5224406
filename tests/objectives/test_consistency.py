"""Semi-supervised objectives: loss math against numpy hand computations on fixed logits, threshold
boundaries, TSA and ramp-up schedules, the EMA teacher, real steps through make_step, self-training."""

import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jaxft.data import augment
from jaxft.models.outputs import ModelOutput
from jaxft.objectives import consistency as C
from jaxft.objectives import registry
from jaxft.objectives.base import StepContext, make_loss_fn, make_step
from jaxft.core.state import TrainState, flatten, split_params

CLS = types.SimpleNamespace(kind="classification", num_labels=3)
CTX = StepContext(step=jnp.zeros((), jnp.int32), extras={})
# Tiny test graphs: XLA's slow optimisation passes would cost more than they save.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def np_ce(logits, labels):
  return -np.log(np_softmax(logits)[np.arange(len(labels)), labels])


def options(name, **overrides):
  o = ml_collections.ConfigDict(registry.defaults()[name])
  o.update(overrides)
  return o


# A forward whose logits are given by the batch ("fixed_logits") plus a trainable bias, so each term's
# loss can be computed by hand and gradients still flow to a parameter.
def fixed_apply(params, batch, *, rng=None, deterministic=True, embedding_perturbation=None, **_):
  logits = jnp.asarray(batch["fixed_logits"], jnp.float32) + params["head"]["bias"]
  emb = jnp.zeros(batch["input_ids"].shape + (2,))
  return ModelOutput(last_hidden_state=emb, embeddings=emb, logits=logits)


ZERO = {"head": {"bias": jnp.zeros((3,))}}
WEAK = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-1.0, 3.0, 0.0], [0.0, 0.0, 9.0]], np.float32)
STRONG = np.array([[1.0, 1.0, 0.0], [0.5, -0.5, 0.0], [0.0, 2.0, 1.0], [4.0, 0.0, 0.0]], np.float32)
ABOVE_HALF = float(np.nextafter(np.float32(0.5), np.float32(1)))  # the next float32 after 0.5
UMASK = np.array([1, 1, 1, 0], np.float32)  # last row pads the batch: its (large) loss must not count


def semi_batch(strong=True):
  b = {"input_ids": np.ones((2, 4), np.int32), "labels": np.array([0, 2], np.int32),
       "fixed_logits": np.zeros((2, 3), np.float32),
       "unlabeled/input_ids": np.ones((4, 4), np.int32), "unlabeled/fixed_logits": WEAK,
       "unlabeled/example_mask": UMASK}
  if strong:
    b.update({"unlabeled/strong/input_ids": np.ones((4, 4), np.int32),
              "unlabeled/strong/fixed_logits": STRONG})
  return b


def run_term(term, batch, params=ZERO, ctx=CTX):
  return term(fixed_apply, params, batch, jax.random.PRNGKey(0), ctx)


# --------------------------------------------------------------------------------- loss math


def test_divergences_entropy_and_sharpening_match_numpy():
  q = np_softmax(WEAK / 0.4)
  p = np_softmax(STRONG)
  kl = np.sum(q * (np.log(q) - np.log(p)), -1)
  np.testing.assert_allclose(C.kl_divergence(jnp.asarray(q), STRONG), kl, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(C.sharpen(WEAK, 0.4), q, rtol=1e-6)
  np.testing.assert_allclose(C.probs_mse(jnp.asarray(q), STRONG), np.mean((q - p) ** 2, -1), rtol=1e-5)
  np.testing.assert_allclose(C.entropy(WEAK), -np.sum(np_softmax(WEAK) * np.log(np_softmax(WEAK)), -1),
                             rtol=1e-5)
  # 0 log 0 = 0: a one-hot target has KL = -log p_y.
  np.testing.assert_allclose(C.kl_divergence(jnp.eye(3)[1:2], STRONG[:1]), -np.log(p[0, 1]), rtol=1e-6)


def test_confidence_mask_is_inclusive_at_exactly_tau():
  probs = jax.nn.softmax(jnp.zeros((1, 2)))  # exactly [0.5, 0.5] in float32
  assert float(probs[0, 0]) == 0.5
  assert float(C.confidence_mask(probs, 0.5)[0]) == 1.0
  assert float(C.confidence_mask(probs, ABOVE_HALF)[0]) == 0.0


def test_tsa_thresholds_at_given_steps():
  k, total = 4, 100
  for step, r in [(0, 0.0), (25, 0.25), (50, 0.5), (100, 1.0), (150, 1.0)]:
    for schedule, alpha in [("linear", r), ("log", 1 - np.exp(-5 * r)), ("exp", np.exp(5 * (r - 1)))]:
      want = alpha * (1 - 1 / k) + 1 / k
      np.testing.assert_allclose(C.tsa_threshold(step, total, schedule, k), want, rtol=1e-6,
                                 err_msg=f"{schedule} at step {step}")
  assert float(C.tsa_threshold(50, 100, "linear", 2)) == 0.75
  with pytest.raises(ValueError, match="tsa_total_steps"):
    C.tsa_threshold(0, 0, "linear", 2)


def test_rampups_and_the_objective_weight_schedule():
  np.testing.assert_allclose([C.rampup("linear", 100)(t) for t in (0, 30, 100, 200)], [0, .3, 1, 1])
  np.testing.assert_allclose([C.rampup("sigmoid", 100)(t) for t in (0, 50, 100)],
                             [np.exp(-5), np.exp(-5 * 0.25), 1.0], rtol=1e-6)
  assert float(C.rampup("sigmoid", 0)(5)) == 1.0
  obj = registry.build(ml_collections.ConfigDict(
      {"name": "pi_model", "pi_model": options("pi_model", weight=4.0, rampup_steps=10)}), CLS)
  np.testing.assert_allclose(obj.terms["unsup"].weight_at(jnp.asarray(5)), 4 * np.exp(-5 * .25),
                             rtol=1e-6)
  assert obj.unlabeled and set(obj.terms) == {"sup", "unsup"}


# --------------------------------------------------------------------------------- terms, by hand


def test_pi_model_term_is_mse_of_probabilities_over_real_rows():
  loss, _ = run_term(C.pi_model_term(), semi_batch())
  per = np.mean((np_softmax(WEAK) - np_softmax(STRONG)) ** 2, -1)
  np.testing.assert_allclose(loss, (per * UMASK).sum() / UMASK.sum(), rtol=1e-5)
  # Without a strong view, the second pass is the same input: identical logits here, so 0.
  assert float(run_term(C.pi_model_term(), semi_batch(strong=False))[0]) == 0.0


@pytest.mark.parametrize("divergence", ["kl", "mse"])
def test_uda_term_sharpens_masks_and_averages_over_all_real_rows(divergence):
  t, thr = 0.4, 0.6
  loss, m = run_term(C.uda_term(divergence, t, thr), semi_batch())
  q, p = np_softmax(WEAK / t), np_softmax(STRONG)
  mask = (np_softmax(WEAK).max(-1) >= thr).astype(np.float32)
  assert mask.tolist() == [1, 0, 1, 1]
  per = np.sum(q * np.log(q / p), -1) if divergence == "kl" else np.mean((q - p) ** 2, -1)
  np.testing.assert_allclose(loss, (per * mask * UMASK).sum() / UMASK.sum(), rtol=1e-5)
  np.testing.assert_allclose(m["mask_rate"], 2 / 3, rtol=1e-6)


def test_tsa_term_drops_confident_labeled_examples():
  logits = np.array([[3.0, 0.0], [0.0, 0.0], [0.0, 1.0]], np.float32)
  labels = np.array([0, 1, 0], np.int32)  # p(correct) = 0.953, 0.5, 0.269
  batch = {"input_ids": np.ones((3, 2), np.int32), "labels": labels, "fixed_logits": logits}
  term = C.tsa_classification_term("linear", 100, 0.0)
  zero2 = {"head": {"bias": jnp.zeros((2,))}}
  # step 0: eta = 1/2, so rows with p <= 0.5 stay (rows 1 and 2; 0.5 exactly is kept)
  loss, m = term(fixed_apply, zero2, batch, None, StepContext(jnp.asarray(0), {}))
  np.testing.assert_allclose(loss, np_ce(logits, labels)[1:].mean(), rtol=1e-6)
  np.testing.assert_allclose([m["tsa_threshold"], m["tsa_kept"]], [0.5, 2 / 3], rtol=1e-6)
  # step 100: eta = 1, everything counts
  loss, _ = term(fixed_apply, zero2, batch, None, StepContext(jnp.asarray(100), {}))
  np.testing.assert_allclose(loss, np_ce(logits, labels).mean(), rtol=1e-6)


def test_pseudo_label_term_targets_are_constants():
  term = C.pseudo_label_term(0.5)
  batch = {**semi_batch(strong=False), "unlabeled/labels": np.array([0, 0, 1, 2], np.int32)}
  loss, m = run_term(term, batch)
  probs = np_softmax(WEAK)
  mask = (probs.max(-1) >= 0.5).astype(np.float32) * UMASK
  pseudo = WEAK.argmax(-1)
  np.testing.assert_allclose(loss, (np_ce(WEAK, pseudo) * mask).sum() / UMASK.sum(), rtol=1e-5)
  np.testing.assert_allclose(m["pseudo_label_accuracy"], 1.0)  # rows 0 and 2 are confident and right
  # d/db of CE(z + b, y) with y held fixed: (softmax - onehot), masked mean: no gradient via y.
  grad = jax.grad(lambda p: run_term(term, batch, p)[0])(ZERO)["head"]["bias"]
  want = ((probs - np.eye(3)[pseudo]) * mask[:, None]).sum(0) / UMASK.sum()
  np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-7)


def test_fixmatch_threshold_boundary_is_exactly_tau():
  weak = np.array([[0.0, 0.0, -np.inf], [2.0, 0.0, -np.inf], [0.0, 3.0, -np.inf]], np.float32)
  strong = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], np.float32)
  batch = {"unlabeled/input_ids": np.ones((3, 2), np.int32), "unlabeled/fixed_logits": weak,
           "unlabeled/strong/input_ids": np.ones((3, 2), np.int32),
           "unlabeled/strong/fixed_logits": strong}
  ce = np_ce(strong, np.array([0, 0, 1]))
  loss_at, m_at = run_term(C.fixmatch_term(0.5), batch)  # row 0 has max prob exactly 0.5
  np.testing.assert_allclose(loss_at, ce.sum() / 3, rtol=1e-6)
  assert float(m_at["mask_rate"]) == 1.0
  loss_above, m_above = run_term(C.fixmatch_term(ABOVE_HALF), batch)
  np.testing.assert_allclose(loss_above, ce[1:].sum() / 3, rtol=1e-6)
  np.testing.assert_allclose(m_above["mask_rate"], 2 / 3, rtol=1e-6)
  with pytest.raises(ValueError, match="unlabeled/strong/input_ids"):
    run_term(C.fixmatch_term(0.5), semi_batch(strong=False))


def test_entropy_min_term():
  loss, _ = run_term(C.entropy_min_term(), semi_batch())
  h = -np.sum(np_softmax(WEAK) * np.log(np_softmax(WEAK)), -1)
  np.testing.assert_allclose(loss, (h * UMASK).sum() / UMASK.sum(), rtol=1e-5)


def test_mean_teacher_term_uses_teacher_params_and_passes_them_no_gradient():
  teacher = {"head/bias": jnp.array([0.5, -0.5, 0.0])}
  ctx = StepContext(jnp.asarray(3), {"teacher": teacher})
  loss, _ = run_term(C.mean_teacher_term("mse"), semi_batch(), ctx=ctx)
  per = np.mean((np_softmax(WEAK + np.array([0.5, -0.5, 0.0])) - np_softmax(STRONG)) ** 2, -1)
  np.testing.assert_allclose(loss, (per * UMASK).sum() / UMASK.sum(), rtol=1e-5)
  # Embedding dropout under a teacher takes the student's clean embeddings from an extra pass
  # (zeros for fixed_apply, so the loss is unchanged).
  noisy, _ = run_term(C.mean_teacher_term("mse", C.Noise("dropout", 0.5)), semi_batch(), ctx=ctx)
  np.testing.assert_allclose(noisy, loss, rtol=1e-6)
  g = jax.grad(lambda t: run_term(C.mean_teacher_term(), semi_batch(),
                                  ctx=StepContext(jnp.asarray(3), {"teacher": t}))[0])(teacher)
  assert np.all(np.asarray(g["head/bias"]) == 0.0)
  with pytest.raises(ValueError, match="init_extras"):
    run_term(C.mean_teacher_term(), semi_batch())


def test_true_pool_labels_only_feed_the_accuracy_metric():
  """data.unlabeled_label_metrics puts the pool's true labels in the batch: loss and gradient must
  not change whatever they are, and pseudo_label_accuracy counts argmax(target) == truth over the
  rows the mask keeps."""
  teacher = {"head/bias": jnp.array([0.5, -0.5, 0.0])}
  ctx = StepContext(jnp.asarray(3), {"teacher": teacher})
  terms = {"uda": (C.uda_term("kl", 0.4, 0.5), WEAK), "fixmatch": (C.fixmatch_term(0.5), WEAK),
           "pseudo_label": (C.pseudo_label_term(0.5), WEAK),
           "mean_teacher": (C.mean_teacher_term(), WEAK + np.array([0.5, -0.5, 0.0]))}
  for name, (term, target) in terms.items():
    base = run_term(term, semi_batch(), ctx=ctx)
    grad = lambda b: jax.grad(lambda p: run_term(term, b, p, ctx)[0])(ZERO)["head"]["bias"]
    for truth in ([0, 0, 1, 2], [2, 1, 0, 0]):
      batch = {**semi_batch(), "unlabeled/labels": np.array(truth, np.int32)}
      loss, m = run_term(term, batch, ctx=ctx)
      np.testing.assert_array_equal(loss, base[0], err_msg=name)
      np.testing.assert_array_equal(grad(batch), grad(semi_batch()), err_msg=name)
      keep = UMASK * (1.0 if name == "mean_teacher" else np_softmax(target).max(-1) >= 0.5)
      right = (target.argmax(-1) == np.array(truth)) * keep
      np.testing.assert_allclose(m["pseudo_label_accuracy"], right.sum() / keep.sum(), rtol=1e-6,
                                 err_msg=name)
    assert "pseudo_label_accuracy" not in base[1]


def test_missing_unlabeled_part_and_bad_options_fail_clearly():
  with pytest.raises(ValueError, match="labeled_per_class"):
    run_term(C.entropy_min_term(), {"input_ids": np.ones((2, 2), np.int32), "fixed_logits": WEAK[:2]})
  with pytest.raises(ValueError, match="objective.uda.threshold"):
    registry.build(ml_collections.ConfigDict({"name": "uda", "uda": options("uda", threshold=1.5)}),
                   CLS)
  with pytest.raises(ValueError, match="divergence"):
    registry.build(ml_collections.ConfigDict({"name": "uda", "uda": options("uda", divergence="js")}),
                   CLS)
  with pytest.raises(ValueError, match="tsa_total_steps"):
    registry.build(ml_collections.ConfigDict({"name": "uda", "uda": options("uda", tsa="exp")}), CLS)
  with pytest.raises(ValueError, match="classification"):
    registry.build(ml_collections.ConfigDict({"name": "fixmatch", "fixmatch": options("fixmatch")}),
                   types.SimpleNamespace(kind="regression"))


def test_embedding_noise_dropout_and_gaussian():
  emb = jnp.arange(1.0, 25.0).reshape(2, 3, 4)
  pert = C.embedding_noise("dropout", 0.5, emb, {"input_ids": jnp.ones((2, 3))}, jax.random.PRNGKey(1))
  noisy = np.asarray(emb + pert)
  kept = noisy != 0
  np.testing.assert_allclose(noisy[kept], 2 * np.asarray(emb)[kept])  # inverted dropout, keep 1/2
  assert 0 < kept.mean() < 1
  g = C.embedding_noise("gaussian", 0.1, emb, {"input_ids": jnp.ones((2, 7))}, jax.random.PRNGKey(1))
  assert g.shape == (2, 7, 4) and 0.05 < float(jnp.std(g)) < 0.15
  assert C.embedding_noise("none", 0.1, emb, {}, None) is None


# --------------------------------------------------------------------------------- real steps


class TinyClassifier(nn.Module):
  """Embeddings -> LayerNorm (+ perturbation) -> dropout -> masked mean -> tanh dense -> logits."""
  vocab: int = 16
  hidden: int = 8
  classes: int = 3
  dropout: float = 0.2

  @nn.compact
  def __call__(self, input_ids, attention_mask, perturbation, deterministic):
    emb = nn.LayerNorm(name="norm")(nn.Embed(self.vocab, self.hidden, name="embed")(input_ids))
    x = emb if perturbation is None else emb + perturbation
    x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
    m = attention_mask[..., None].astype(jnp.float32)
    pooled = (x * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
    logits = nn.Dense(self.classes, name="head")(nn.tanh(nn.Dense(self.hidden, name="pool")(pooled)))
    return ModelOutput(last_hidden_state=x, embeddings=emb, logits=logits, pooled=pooled)


def tiny_model(dropout=0.2):
  module = TinyClassifier(dropout=dropout)
  ids = jnp.ones((1, 6), jnp.int32)
  variables = module.init(jax.random.PRNGKey(0), ids, ids, None, True)
  params = {"backbone": {k: v for k, v in variables["params"].items() if k != "head"},
            "head": variables["params"]["head"]}

  def apply_fn(params, batch, *, rng=None, deterministic=True, embedding_perturbation=None, **_):
    flat = {**params["backbone"], "head": params["head"]}
    return module.apply({"params": flat}, batch["input_ids"], batch["attention_mask"],
                        embedding_perturbation, deterministic,
                        rngs={} if rng is None else {"dropout": rng})

  return apply_fn, params


def token_batch(seed=0, b=4, mu=2, s=6):
  r = np.random.default_rng(seed)

  def part(n):
    lengths = r.integers(3, s + 1, n)
    ids = np.zeros((n, s), np.int32)
    mask = (np.arange(s)[None] < lengths[:, None]).astype(np.int32)
    ids[:] = np.where(mask, r.integers(3, 16, (n, s)), 0)
    ids[:, 0] = 1  # [CLS]
    ids[np.arange(n), lengths - 1] = 2  # [SEP]
    return ids, mask

  ids, mask = part(b)
  uids, umask = part(b * mu)
  batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids),
           "labels": r.integers(0, 3, b).astype(np.int32), "example_mask": np.ones(b, np.float32),
           "unlabeled/input_ids": uids, "unlabeled/attention_mask": umask,
           "unlabeled/token_type_ids": np.zeros_like(uids),
           "unlabeled/example_mask": np.ones(b * mu, np.float32)}
  return augment.add_strong_view(batch, "token_strong", seed=seed, epoch=0,
                                 indices=range(b * mu), special_ids=[0, 1, 2])


def make_state(obj, params, tx):
  trainable, frozen = split_params(params, lambda k: True)
  extras = obj.init_extras(trainable, frozen) if obj.init_extras else None
  return TrainState.create(trainable, frozen, tx, extras=extras)


@pytest.mark.parametrize("name", ["pi_model", "uda", "pseudo_label", "fixmatch", "entropy_min",
                                  "mean_teacher"])
def test_each_objective_is_sup_plus_ramped_unsup(name):
  extra = {"threshold": 0.5} if "threshold" in registry.defaults()[name] else {}
  obj = registry.build(ml_collections.ConfigDict(
      {"name": name, name: options(name, weight=3.0, rampup="linear", rampup_steps=10, **extra)}), CLS)
  extras = {"teacher": {"head/bias": jnp.zeros(3)}} if name == "mean_teacher" else {}
  ctx = StepContext(jnp.asarray(4), extras)
  total, m = make_loss_fn(fixed_apply, obj.terms)({"head/bias": jnp.zeros(3)}, {}, semi_batch(),
                                                  jax.random.PRNGKey(0), ctx)
  sup = np_ce(np.zeros((2, 3), np.float32), np.array([0, 2])).mean()
  np.testing.assert_allclose([m["loss/sup"], m["weight/unsup"]], [sup, 3.0 * 0.4], rtol=1e-6)
  np.testing.assert_allclose(total, sup + 1.2 * m["loss/unsup"], rtol=1e-6)
  assert float(m["loss/unsup"]) > 0.0 and obj.unlabeled


def test_ema_decay_schedule():
  np.testing.assert_allclose([C.ema_decay_at(t, 0.99, True) for t in (1, 2, 3, 1000)],
                             [0.5, 2 / 3, 0.75, 0.99], rtol=1e-6)
  assert float(C.ema_decay_at(1, 0.9, False)) == np.float32(0.9)


def test_ema_teacher_equals_hand_computed_ema_after_two_updates():
  apply_fn, params = tiny_model()
  obj = registry.build(ml_collections.ConfigDict(
      {"name": "mean_teacher", "mean_teacher": options("mean_teacher", ema_decay=0.6)}), CLS)
  tx = optax.sgd(0.5)
  s0 = make_state(obj, params, tx)
  step = jax.jit(make_step(apply_fn, obj.terms, tx, update_extras=obj.update_extras),
                 compiler_options=FAST_COMPILE)
  s1, _ = step(s0, token_batch(1), jax.random.PRNGKey(1))
  s2, _ = step(s1, token_batch(2), jax.random.PRNGKey(2))
  a1, a2 = 0.5, 0.6  # min(1 - 1/(t+1), 0.6) for the updates making steps t = 1, 2
  for k, t0 in s0.extras["teacher"].items():
    t0, p1, p2 = (np.asarray(x, np.float64) for x in (t0, s1.trainable[k], s2.trainable[k]))
    want = a2 * (a1 * t0 + (1 - a1) * p1) + (1 - a2) * p2
    np.testing.assert_allclose(s2.extras["teacher"][k], want, rtol=1e-5, atol=1e-7, err_msg=k)
  np.testing.assert_array_equal(s0.extras["teacher"]["head/kernel"], flatten(params)["head/kernel"])
  assert not np.allclose(s2.extras["teacher"]["head/kernel"], s2.trainable["head/kernel"])


@pytest.mark.slow
def test_every_objective_term_steps_a_tiny_random_bert():
  """One jitted make_step over a tiny random BERT carrying every objective's unsupervised term (one
  compile instead of six), with embedding noise on and the mean-teacher extras."""
  from jaxft.models import init_random
  m = init_random({"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2,
                   "num_attention_heads": 2, "intermediate_size": 64, "vocab_size": 16,
                   "max_position_embeddings": 16, "type_vocab_size": 2},
                  head="sequence_classification", num_labels=3)
  settings = {"pi_model": {"embedding_noise": "dropout", "embedding_noise_scale": 0.1},
              "uda": {"threshold": 0.0, "tsa": "linear", "tsa_total_steps": 4},
              "pseudo_label": {"threshold": 0.0},
              "fixmatch": {"threshold": 0.0, "embedding_noise": "gaussian",
                           "embedding_noise_scale": 0.05},
              "entropy_min": {},
              "mean_teacher": {}}
  objs = {n: registry.build(ml_collections.ConfigDict({"name": n, n: options(n, **o)}), CLS)
          for n, o in settings.items()}
  terms = {"sup": objs["uda"].terms["sup"], **{n: o.terms["unsup"] for n, o in objs.items()}}
  mt = objs["mean_teacher"]
  tx = optax.sgd(0.1)
  state = make_state(mt, m.params, tx)
  step = jax.jit(make_step(m.apply, terms, tx, update_extras=mt.update_extras),
                 compiler_options=FAST_COMPILE)
  new_state, metrics = step(state, token_batch(), jax.random.PRNGKey(0))
  assert float(metrics["nonfinite"]) == 0.0 and float(metrics["grad_norm"]) > 0.0
  for n in settings:
    assert float(metrics[f"loss/{n}"]) > 0.0, n
  np.testing.assert_allclose(metrics["sup/tsa_threshold"], 1 / 3, rtol=1e-6)  # step 0: 1/K
  k = "head/classifier/kernel"
  np.testing.assert_allclose(new_state.extras["teacher"][k],
                             0.5 * state.trainable[k] + 0.5 * new_state.trainable[k], rtol=1e-6)


# --------------------------------------------------------------------------------- self-training


def test_self_training_driver_on_gaussian_blobs():
  from sklearn.linear_model import LogisticRegression
  r = np.random.default_rng(0)
  centers = np.array([[-3.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
  pool_y = r.integers(0, 3, 300)
  pool_x = centers[pool_y] + r.normal(size=(300, 2))
  lab_idx = np.concatenate([np.flatnonzero(pool_y == c)[:2] for c in range(3)])
  labeled = {"x": pool_x[lab_idx], "label": pool_y[lab_idx]}
  rest = np.setdiff1d(np.arange(300), lab_idx)
  unlabeled = {"x": pool_x[rest], "true": pool_y[rest]}
  seen = []

  def train_fn(examples, rnd):
    assert "true" not in examples
    seen.append((rnd, len(examples["label"])))
    return LogisticRegression(C=10.0).fit(examples["x"], examples["label"])

  def predict_fn(model, examples):
    return model.predict_proba(examples["x"])

  model, history = C.self_train(train_fn, predict_fn, labeled, unlabeled, rounds=2, threshold=0.9,
                                true_label_key="true")
  assert [h.round for h in history] == [1, 2] and seen[0] == (0, 6)
  for h, (rnd, n) in zip(history, seen[1:]):
    assert n == 6 + len(h.selected)
    assert np.all(h.confidence >= 0.9)
  teacher1 = LogisticRegression(C=10.0).fit(labeled["x"], labeled["label"])
  probs = teacher1.predict_proba(unlabeled["x"])
  np.testing.assert_array_equal(history[0].selected, np.flatnonzero(probs.max(-1) >= 0.9))
  np.testing.assert_array_equal(history[0].pseudo_labels, probs.argmax(-1)[history[0].selected])
  assert history[1].pseudo_label_accuracy > 0.95
  assert (model.predict(pool_x) == pool_y).mean() > 0.95


def test_select_pseudo_labels_balances_classes_and_soft_targets():
  probs = np.array([[.9, .1], [.8, .2], [.95, .05], [.3, .7], [.4, .6]])
  np.testing.assert_array_equal(C.select_pseudo_labels(probs, 0.65), [0, 1, 2, 3])
  np.testing.assert_array_equal(C.select_pseudo_labels(probs, 0.0, max_per_class=1), [2, 3])
  got = {}

  def train_fn(ex, rnd):
    got[rnd] = ex
    return rnd

  C.self_train(train_fn, lambda m, ex: probs, {"x": np.zeros(2), "label": np.array([1, 0])},
               {"x": np.arange(5.0)}, rounds=1, soft=True)
  np.testing.assert_allclose(got[1]["label"], np.concatenate([[[0, 1], [1, 0]], probs]))
  np.testing.assert_allclose(got[1]["x"], np.concatenate([np.zeros(2), np.arange(5.0)]))
