"""Distillation: KL/T^2 loss by hand, layer maps, masked hidden/attention MSE, frozen teacher."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft.objectives import distill
from jaxft.objectives.base import StepContext


def _softmax(x):
  e = [math.exp(v) for v in x]
  return [v / sum(e) for v in e]


def test_kl_and_hinton_loss_match_hand_computation():
  t_logits = [[1.0, 2.0, 3.0], [0.5, 0.5, -1.0]]
  s_logits = [[3.0, 2.0, 1.0], [0.0, 1.0, 0.0]]
  labels = [2, 1]
  T, alpha = 2.0, 0.3
  kls, ces = [], []
  for t, s, y in zip(t_logits, s_logits, labels):
    p = _softmax([v / T for v in t])
    q = _softmax([v / T for v in s])
    kls.append(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)))
    ces.append(-math.log(_softmax(s)[y]))
  got = distill.kl_divergence(jnp.array(t_logits), jnp.array(s_logits), T)
  np.testing.assert_allclose(got, kls, rtol=1e-5)
  batch = {"labels": jnp.array(labels, jnp.int32), "example_mask": jnp.ones(2)}
  loss, m = distill.soft_target_loss("classification", jnp.array(s_logits), jnp.array(t_logits),
                                     batch, alpha, T)
  want = alpha * np.mean(ces) + (1 - alpha) * T ** 2 * np.mean(kls)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(m["soft"], np.mean(kls), rtol=1e-5)
  np.testing.assert_allclose(m["agreement"], 0.0)  # argmax 2 vs 0 and 0 vs 1
  # A padding row (example_mask 0) changes nothing.
  pad = {"labels": jnp.array(labels + [0], jnp.int32), "example_mask": jnp.array([1.0, 1.0, 0.0])}
  loss_pad, _ = distill.soft_target_loss("classification", jnp.array(s_logits + [[9.0, 0, 0]]),
                                         jnp.array(t_logits + [[0, 0, 9.0]]), pad, alpha, T)
  np.testing.assert_allclose(loss_pad, want, rtol=1e-5)


def test_kl_is_zero_for_identical_logits_and_regression_uses_mse():
  z = jnp.array([[0.3, -1.2, 2.0]])
  np.testing.assert_allclose(distill.kl_divergence(z, z, 3.0), [0.0], atol=1e-7)
  batch = {"labels": jnp.array([1.0, 2.0]), "example_mask": jnp.ones(2)}
  loss, m = distill.soft_target_loss("regression", jnp.array([[1.5], [1.0]]),
                                     jnp.array([[1.0], [1.0]]), batch, 0.5, 4.0)
  hard = ((1.5 - 1.0) ** 2 + (1.0 - 2.0) ** 2) / 2
  soft = (0.5 ** 2 + 0.0) / 2
  np.testing.assert_allclose(loss, 0.5 * hard + 0.5 * soft, rtol=1e-6)


def test_layer_maps():
  assert distill.layer_map("uniform", 3, 12) == (3, 7, 11)
  assert distill.layer_map("uniform", 6, 12) == (1, 3, 5, 7, 9, 11)
  assert distill.layer_map("uniform", 2, 2) == (0, 1)
  assert distill.layer_map("last", 2, 6) == (4, 5)
  assert distill.layer_map("first", 2, 6) == (0, 1)
  assert distill.layer_map("0, 5", 2, 6) == (0, 5)
  assert distill.layer_map([1, 2], 2, 6) == (1, 2)
  with pytest.raises(ValueError, match="outside"):
    distill.layer_map([1, 6], 2, 6)
  with pytest.raises(ValueError, match="one teacher layer per student layer"):
    distill.layer_map("1,2,3", 2, 6)
  with pytest.raises(ValueError, match="unknown layer map"):
    distill.layer_map("skip", 2, 6)


def test_hidden_and_attention_mse_count_real_tokens_only():
  # B=1, S=3 with the last token padding; student H=2 projected to teacher H=3 by W.
  hs = jnp.array([[[1.0, 0.0], [0.0, 2.0], [50.0, 50.0]]])
  w = jnp.array([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])  # h W = [h0, h1, h0 + h1]
  ht = jnp.array([[[1.0, 1.0, 1.0], [0.0, 2.0, 0.0], [0.0, 0.0, 0.0]]])
  tok = jnp.array([[1.0, 1.0, 0.0]])
  # token 0: h W = [1, 0, 1] vs [1, 1, 1] -> mean sq 1/3; token 1: [0, 2, 2] vs [0, 2, 0] -> 4/3.
  np.testing.assert_allclose(distill.hidden_mse(hs, ht, w, tok), (1 / 3 + 4 / 3) / 2, rtol=1e-6)
  with pytest.raises(ValueError, match="projection"):
    distill.hidden_mse(hs, ht, None, tok)
  a_s = jnp.zeros((1, 2, 3, 3)).at[0, 0, 0, 0].set(1.0).at[0, 1, 2, 2].set(7.0)
  a_t = jnp.zeros((1, 2, 3, 3))
  # Real pairs: 2 x 2 = 4 per head; head 0 has one error of 1, the (2, 2) pair is padding.
  np.testing.assert_allclose(distill.attention_mse(a_s, a_t, tok), (1.0 / 4 + 0.0) / 2, rtol=1e-6)
  with pytest.raises(ValueError, match="attention_heads='mean'"):
    distill.attention_mse(a_s, jnp.zeros((1, 4, 3, 3)), tok)
  np.testing.assert_allclose(
      distill.attention_mse(a_s, jnp.zeros((1, 4, 3, 3)), tok, heads="mean"), (0.5 ** 2) / 4)


def test_teacher_batch_views():
  batch = {"input_ids": jnp.zeros((2, 4), jnp.int32), "labels": jnp.zeros(2, jnp.int32),
           "teacher/input_ids": jnp.ones((2, 6), jnp.int32),
           "teacher/attention_mask": jnp.ones((2, 6), jnp.int32),
           "teacher_logits": jnp.zeros((2, 3))}
  assert set(distill.student_batch(batch)) == {"input_ids", "labels"}
  tb = distill.teacher_batch(batch)
  assert tb["input_ids"].shape == (2, 6) and tb["labels"].shape == (2,)
  with pytest.raises(ValueError, match="teacher/input_ids"):
    distill.teacher_batch({"input_ids": batch["input_ids"], "teacher/attention_mask": batch["input_ids"]})


# ------------------------------------------------------------------ with tiny random BERTs
import optax  # noqa: E402

from jaxft.models import init_random  # noqa: E402
from jaxft.core.state import TrainState, flatten, merge_params  # noqa: E402


def tiny_bert(hidden, heads, layers=2, seed=0, **kw):
  cfg = {"model_type": "bert", "hidden_size": hidden, "num_hidden_layers": layers,
         "num_attention_heads": heads, "intermediate_size": 2 * hidden, "vocab_size": 50,
         "max_position_embeddings": 32, "type_vocab_size": 2}
  return init_random(cfg, head="sequence_classification", num_labels=3, seed=seed,
                     hidden_dropout=0.0, attention_dropout=0.0, **kw)


def confident(model, scale=1000.0):
  """The teacher with a sharpened head, so its soft targets are far from uniform."""
  flat = flatten(model.params)
  flat = {k: v * scale if k.startswith("head/") and k.endswith("kernel") else v
          for k, v in flat.items()}
  return model.with_params(merge_params(flat, {}))


def text_batch(seed=0, b=4, s=8):
  rng = np.random.default_rng(seed)
  mask = np.ones((b, s), np.int32)
  mask[1, 6:] = 0
  mask[3, 4:] = 0
  return {"input_ids": jnp.asarray(rng.integers(1, 50, (b, s)) * mask, jnp.int32),
          "attention_mask": jnp.asarray(mask), "token_type_ids": jnp.zeros((b, s), jnp.int32),
          "labels": jnp.asarray(rng.integers(0, 3, b), jnp.int32),
          "example_mask": jnp.ones(b, jnp.float32)}


@pytest.fixture(scope="module")
def pair():
  return confident(tiny_bert(32, 4, seed=0)), tiny_bert(16, 2, seed=1)


def student_state(student, tx, teacher, proj=True):
  trainable = dict(flatten(student.params))
  if proj:
    trainable.update(distill.init_projections(jax.random.key(5), 16, 32))
  return TrainState.create(trainable, {}, tx, extras=distill.distill_extras(teacher.params))


def test_teacher_gets_no_gradient_and_stays_bitwise(pair):
  teacher, student = pair
  batch = text_batch()
  term = distill.distill_term(teacher.apply, alpha=0.2, temperature=3.0, hidden_weight=1.0,
                              attention_weight=1.0, attention_heads="mean")
  tx = optax.adamw(1e-3, weight_decay=0.01)
  state = student_state(student, tx, teacher)

  def loss_of_teacher(teacher_flat):
    ctx = StepContext(step=jnp.zeros((), jnp.int32), extras={"teacher": teacher_flat})
    return term(student.apply, state.params, batch, jax.random.key(0), ctx)[0]

  loss, grads = jax.jit(jax.value_and_grad(loss_of_teacher))(state.extras["teacher"])
  assert float(loss) > 0
  assert set(grads) == set(state.extras["teacher"])
  for k, g in grads.items():
    np.testing.assert_array_equal(g, np.zeros_like(g), err_msg=k)
  step = jax.jit(distill.make_distill_step(student.apply, teacher.apply, tx, alpha=0.2,
                                           temperature=3.0, hidden_weight=1.0,
                                           attention_weight=1.0, attention_heads="mean"))
  before = jax.device_get(state.extras["teacher"])
  proj_before = np.asarray(state.trainable["distill_proj/hidden/kernel"])
  for _ in range(3):
    state, m = step(state, batch, jax.random.key(1))
  for k, v in before.items():
    np.testing.assert_array_equal(np.asarray(state.extras["teacher"][k]), v, err_msg=k)
  assert set(state.opt_state[0].mu) == set(state.trainable)  # no optimizer state for the teacher
  assert not np.array_equal(proj_before, state.trainable["distill_proj/hidden/kernel"])
  assert {"distill/hard", "distill/soft", "distill/hidden_mse", "distill/attention_mse",
          "distill/agreement", "grad_norm"} <= set(m)
  assert set(distill.strip_distill_params(state.trainable)) == set(flatten(student.params))


def test_intermediate_losses_match_manual_computation(pair):
  teacher, student = pair
  batch = text_batch(1)
  tx = optax.sgd(0.0)
  state = student_state(student, tx, teacher)
  term = distill.distill_term(teacher.apply, alpha=0.0, temperature=1.0, hidden_weight=1.0,
                              attention_weight=1.0, attention_heads="mean")
  ctx = StepContext(step=jnp.zeros((), jnp.int32), extras=state.extras)
  loss, m = term(student.apply, state.params, batch, jax.random.key(0), ctx)
  out_s = student.apply(student.params, batch, output_hidden_states=True, output_attentions=True)
  out_t = teacher.apply(teacher.params, batch, output_hidden_states=True, output_attentions=True)
  tok = np.asarray(batch["attention_mask"], np.float64)
  wh = np.asarray(state.trainable["distill_proj/hidden/kernel"], np.float64)
  we = np.asarray(state.trainable["distill_proj/embed/kernel"], np.float64)

  def mse(hs, ht, w):
    d = ((np.asarray(hs, np.float64) @ w - np.asarray(ht, np.float64)) ** 2).mean(-1)
    return (d * tok).sum() / tok.sum()

  # uniform map 2 -> 2: student layer i <- teacher layer i; embeddings through W_e.
  hid = [mse(out_s.hidden_states[i + 1], out_t.hidden_states[i + 1], wh) for i in range(2)]
  hid.append(mse(out_s.hidden_states[0], out_t.hidden_states[0], we))
  np.testing.assert_allclose(m["hidden_mse"], np.mean(hid), rtol=1e-4)
  pair_w = tok[:, :, None] * tok[:, None, :]
  att = []
  for i in range(2):
    a_s = np.asarray(out_s.attentions[i], np.float64).mean(1)
    a_t = np.asarray(out_t.attentions[i], np.float64).mean(1)
    att.append((((a_s - a_t) ** 2) * pair_w).sum() / pair_w.sum())
  np.testing.assert_allclose(m["attention_mse"], np.mean(att), rtol=1e-4)
  kl = distill.kl_divergence(out_t.logits, out_s.logits, 1.0).mean()
  np.testing.assert_allclose(loss, kl + np.mean(hid) + np.mean(att), rtol=1e-4)


def test_cached_teacher_logits_give_the_same_loss(pair):
  teacher, student = pair
  batch = text_batch(2)
  cached = distill.add_teacher_logits(teacher.apply, teacher.params, batch)
  assert cached["teacher_logits"].shape == (4, 3)
  term = distill.distill_term(teacher.apply, alpha=0.5, temperature=2.0)
  ctx = StepContext(step=jnp.zeros((), jnp.int32), extras=distill.distill_extras(teacher.params))
  a = term(student.apply, student.params, batch, jax.random.key(0), ctx)
  no_teacher = StepContext(step=jnp.zeros((), jnp.int32), extras={})
  b = term(student.apply, student.params, cached, jax.random.key(0), no_teacher)
  np.testing.assert_allclose(a[0], b[0], rtol=1e-6)
  with pytest.raises(KeyError, match="distill_extras"):
    term(student.apply, student.params, batch, jax.random.key(0), no_teacher)


def test_distillation_pulls_student_to_teacher_with_its_own_tokenizer(pair):
  teacher, student = pair
  batch = text_batch(3)
  # The teacher reads a differently tokenized view (here: other ids, length 10).
  tb = text_batch(4, s=10)
  batch = {**batch, "teacher/input_ids": tb["input_ids"],
           "teacher/attention_mask": tb["attention_mask"]}
  tx = optax.adam(1e-2)
  state = student_state(student, tx, teacher, proj=False)
  step = jax.jit(distill.make_distill_step(student.apply, teacher.apply, tx, alpha=0.0,
                                           temperature=2.0))
  kls = []
  for _ in range(60):
    state, m = step(state, batch, jax.random.key(0))
    kls.append(float(m["distill/soft"]))
  assert kls[-1] < 0.2 * kls[0], kls
  assert float(m["distill/agreement"]) == 1.0
  bad = distill.make_distill_step(student.apply, teacher.apply, tx, hidden_weight=1.0)
  with pytest.raises(ValueError, match="different tokenizer"):
    bad(state, batch, jax.random.key(0))


def test_student_from_teacher_layers():
  teacher4 = tiny_bert(32, 4, layers=4, seed=3)
  params, cfg = distill.student_from_teacher_layers(teacher4.params, teacher4.config, [1, 3])
  assert cfg.num_hidden_layers == 2 and teacher4.config.num_hidden_layers == 4
  flat, tflat = flatten(params), flatten(teacher4.params)
  assert len(flat) == len(tflat) - 2 * sum("layer_0/" in k for k in tflat)
  for k, v in flat.items():
    src = (k.replace("layer_1/", "layer_3/") if "layer_1/" in k
           else k.replace("layer_0/", "layer_1/"))
    np.testing.assert_array_equal(v, tflat[src], err_msg=k)
  # All layers in order give back the teacher; the first layer alone reproduces its hidden state.
  same, cfg4 = distill.student_from_teacher_layers(teacher4.params, teacher4.config, range(4))
  assert flatten(same).keys() == tflat.keys() and cfg4.num_hidden_layers == 4
  first, cfg1 = distill.student_from_teacher_layers(teacher4.params, teacher4.config, [0])
  one = init_random(cfg1, head="sequence_classification", num_labels=3)
  batch = text_batch(5)
  hidden = jax.jit(lambda m, p: m.apply(p, batch, output_hidden_states=True).hidden_states,
                   static_argnums=0)
  np.testing.assert_allclose(hidden(one, first)[1], hidden(teacher4, teacher4.params)[1], atol=1e-6)
  with pytest.raises(ValueError, match="distinct teacher layer"):
    distill.student_from_teacher_layers(teacher4.params, teacher4.config, [0, 4])
