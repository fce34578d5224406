"""Semi-supervised objectives: Pi-model, UDA, pseudo-labels, FixMatch, entropy minimization, Mean
Teacher, and a self-training (Noisy Student) driver.

Every objective is  L = L_sup + lambda(t) * L_unsup,  lambda(t) = weight * ramp(t)  (`rampup`:
"linear" min(t/T, 1), or Laine & Aila's "sigmoid" exp(-5 (1 - min(t/T, 1))^2)).

Batch layout (semi-supervised): the labeled rows under the usual keys; the unlabeled rows under
"unlabeled/<key>" (input_ids / attention_mask / token_type_ids or pixel_values, example_mask): the
original (or weakly augmented) view u; optionally a strongly augmented view A(u) of the same rows
under "unlabeled/strong/<key>" (built by `jaxft.data.augment`; its example_mask defaults to u's).
With p = softmax(f(u)), q = softmax(f(A(u))) (or of a second dropout pass when there is no strong
view), and w_i the unlabeled example mask, each unsupervised loss is a mean over real unlabeled rows,
  L_unsup = sum_i w_i m_i l_i / sum_i w_i,   m_i = [max_c p_ic >= tau]  (confidence mask, inclusive),
and the target side is always under stop_gradient:
  pi_model      l = mean_c (p_c - q_c)^2                         (Laine & Aila 2017)
  uda           l = KL(sharpen(p, T) || q) or MSE, with TSA on L_sup  (Xie et al. 2019)
  pseudo_label  l = CE(f(u), argmax p), one pass                 (Lee 2013)
  fixmatch      l = CE(f(A(u)), argmax p)                        (Sohn et al. 2020)
                (dist_align: p distribution-aligned first, jaxft.objectives.adaptive)
  entropy_min   l = -sum_c p_c log p_c                           (Grandvalet & Bengio 2005)
  mean_teacher  l = mean_c (p'_c - q_c)^2, p' from EMA params    (Tarvainen & Valpola 2017)
Logits must be [B, C] (sequence or image classification). Packed batches (jaxft.data.packing): the
labeled part, u and A(u) are each their own packed sub-batch (own segment_ids, example_start), and
logits, masks and pseudo-labels are per slot [E_u]; slot e of u and of A(u) is the same example (the
data layer packs both views from one slot plan), so targets stay aligned. Embedding noise is drawn
per example (base.ExampleLayout.draw), as in a padded batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.objectives.base import StepContext, Weighted, example_weights, layout_of
from jaxft.objectives.registry import Objective, register
from jaxft.objectives.supervised import cross_entropy, masked_mean, task_term
from jaxft.core.state import flatten, unflatten

UNLABELED = "unlabeled/"
STRONG = "unlabeled/strong/"
f32 = jnp.float32

# ---------------------------------------------------------------------------------------------
# Loss math on logits (pure; tested against hand computations).


def kl_divergence(target_probs: jax.Array, logits: jax.Array) -> jax.Array:
  """[...]: KL(q || p) = sum_c q_c (log q_c - log p_c), p = softmax(logits [..., C]); 0 log 0 = 0."""
  logp = jax.nn.log_softmax(logits.astype(f32), -1)
  q = target_probs.astype(f32)
  return jnp.sum(jax.scipy.special.xlogy(q, q) - q * logp, -1)


def probs_mse(target_probs: jax.Array, logits: jax.Array) -> jax.Array:
  """[...]: mean_c (q_c - softmax(logits)_c)^2, the Pi-model / Mean Teacher consistency."""
  return jnp.mean(jnp.square(target_probs.astype(f32) - jax.nn.softmax(logits.astype(f32), -1)), -1)


def entropy(logits: jax.Array) -> jax.Array:
  """[...]: H(p) = -sum_c p_c log p_c of p = softmax(logits)."""
  logp = jax.nn.log_softmax(logits.astype(f32), -1)
  return -jnp.sum(jnp.exp(logp) * logp, -1)


def sharpen(logits: jax.Array, temperature: float) -> jax.Array:
  """softmax(logits / T): T < 1 sharpens UDA's targets."""
  return jax.nn.softmax(logits.astype(f32) / temperature, -1)


def confidence_mask(probs: jax.Array, threshold: float) -> jax.Array:
  """[...] float32: 1 where max_c probs >= threshold (inclusive, as FixMatch/USB), else 0."""
  return (jnp.max(probs, -1) >= threshold).astype(f32)


def tsa_threshold(step, total_steps: int, schedule: str, num_classes: int) -> jax.Array:
  """UDA's training-signal annealing threshold eta_t = alpha_t (1 - 1/K) + 1/K, progress r = t/T:
  linear alpha = r, log alpha = 1 - exp(-5 r), exp alpha = exp(5 (r - 1)). A labeled example whose
  correct-class probability exceeds eta_t is left out of L_sup."""
  if total_steps <= 0:
    raise ValueError(f"TSA needs its horizon: set objective.uda.tsa_total_steps > 0 "
                     f"(usually train.num_steps), got {total_steps}")
  r = jnp.clip(jnp.asarray(step, f32) / total_steps, 0.0, 1.0)
  if schedule == "linear":
    alpha = r
  elif schedule == "log":
    alpha = 1.0 - jnp.exp(-5.0 * r)
  elif schedule == "exp":
    alpha = jnp.exp(5.0 * (r - 1.0))
  else:
    raise ValueError(f"unknown TSA schedule {schedule!r}; known: linear, log, exp (or 'none')")
  return alpha * (1.0 - 1.0 / num_classes) + 1.0 / num_classes


def rampup(kind: str, steps: int) -> Callable[[jax.Array], jax.Array]:
  """step -> ramp in [0, 1]: "none" 1; "linear" min(t/T, 1); "sigmoid" exp(-5 (1 - min(t/T, 1))^2)
  (Laine & Aila 2017). steps <= 0 means no ramp."""
  if kind not in ("none", "linear", "sigmoid"):
    raise ValueError(f"unknown rampup {kind!r}; known: none, linear, sigmoid")

  def ramp(step):
    if kind == "none" or steps <= 0:
      return jnp.ones((), f32)
    r = jnp.clip(jnp.asarray(step, f32) / steps, 0.0, 1.0)
    return r if kind == "linear" else jnp.exp(-5.0 * jnp.square(1.0 - r))

  return ramp


# ---------------------------------------------------------------------------------------------
# Views of a semi-supervised batch.


def view(batch: Mapping[str, jax.Array], prefix: str) -> dict:
  """The sub-batch under `prefix` with the prefix stripped (direct children only)."""
  out = {}
  for key, value in batch.items():
    if key.startswith(prefix) and "/" not in key[len(prefix):]:
      out[key[len(prefix):]] = value
  return out


def unlabeled_views(batch, objective: str, need_strong: bool = False):
  """-> (weak, strong | None): the "unlabeled/" and "unlabeled/strong/" sub-batches."""
  weak = view(batch, UNLABELED)
  if "input_ids" not in weak and "pixel_values" not in weak:
    raise ValueError(f"objective {objective!r} needs the unlabeled part of each batch (keys "
                     "'unlabeled/input_ids' or 'unlabeled/pixel_values'): set "
                     "data.labeled_per_class > 0 and data.unlabeled_ratio > 0. Batch keys: "
                     f"{sorted(batch)}")
  strong = view(batch, STRONG) or None
  if strong is not None and "example_mask" in weak:
    strong.setdefault("example_mask", weak["example_mask"])
  if need_strong and strong is None:
    raise ValueError(f"objective {objective!r} needs a strongly augmented view under "
                     "'unlabeled/strong/input_ids' (or 'unlabeled/strong/pixel_values'); build it "
                     "with jaxft.data.augment (policy 'strong' or 'token_strong')")
  return weak, strong


def _inputs(v: dict) -> dict:
  return {k: x for k, x in v.items() if k != "labels"}


def embedding_noise(kind: str, scale: float, clean_embeddings, student_inputs, rng):
  """The `embedding_perturbation` added to the student's embedding output [B, S, H] (or None).

  "gaussian": scale * N(0, 1). "dropout": element-wise inverted dropout with rate `scale`, written
  additively as E (m / (1 - scale) - 1) from the clean embeddings E of the student's own view; the
  perturbation carries no gradient, so d loss / d E keeps coefficient 1. Packed student inputs:
  each example's noise is its padded-row draw (base.ExampleLayout.draw).
  """
  if kind == "none" or scale == 0.0:
    return None
  layout = layout_of(student_inputs)
  if kind == "gaussian":
    hidden = clean_embeddings.shape[-1]
    shape = (student_inputs["input_ids"].shape + (hidden,) if "input_ids" in student_inputs
             else clean_embeddings.shape)
    return scale * layout.draw(lambda k, s: jax.random.normal(k, s, f32), rng, shape)
  if kind == "dropout":
    keep = layout.draw(lambda k, s: jax.random.bernoulli(k, 1.0 - scale, s), rng,
                       clean_embeddings.shape)
    return jax.lax.stop_gradient(clean_embeddings.astype(f32)) * (keep / (1.0 - scale) - 1.0)
  raise ValueError(f"unknown embedding_noise {kind!r}; known: none, gaussian, dropout")


@dataclasses.dataclass(frozen=True)
class Noise:
  kind: str = "none"
  scale: float = 0.0


def two_views(apply_fn, params, batch, rng, objective, *, need_strong=False, noise=Noise(),
               target_params=None):
  """Target pass on u (stop-gradient; `target_params`, e.g. a teacher, or the student's) and student
  pass on A(u), or on u again with fresh dropout. -> (target_logits, student_logits, weights [B])."""
  weak, strong = unlabeled_views(batch, objective, need_strong)
  r_target, r_student, r_noise = jax.random.split(rng, 3)
  tparams = params if target_params is None else target_params
  target = apply_fn(tparams, _inputs(weak), rng=r_target, deterministic=False)
  student_in = _inputs(strong if strong is not None else weak)
  perturbation = None
  if noise.kind != "none":
    clean = target.embeddings
    if noise.kind == "dropout" and (strong is not None or target_params is not None):
      # The dropout noise needs the student's own clean embeddings of its own view.
      clean = apply_fn(params, student_in, rng=None, deterministic=True).embeddings
    perturbation = embedding_noise(noise.kind, noise.scale, clean, student_in, r_noise)
  kwargs = {} if perturbation is None else {"embedding_perturbation": perturbation}
  student = apply_fn(params, student_in, rng=r_student, deterministic=False, **kwargs)
  return (jax.lax.stop_gradient(target.logits.astype(f32)), student.logits.astype(f32),
          example_weights(weak))


def target_accuracy(batch, pseudo, keep, w) -> dict:
  """With "unlabeled/labels" in the batch (data.unlabeled_label_metrics, diagnostics only, never a
  target): pseudo_label_accuracy, how often the target's argmax is the true label over the rows
  `keep` keeps; else nothing."""
  if f"{UNLABELED}labels" not in batch:
    return {}
  right = (pseudo == batch[f"{UNLABELED}labels"]).astype(f32)
  return {"pseudo_label_accuracy": jnp.sum(right * keep * w) / jnp.maximum(jnp.sum(keep * w), 1.0)}


def _pseudo_label_metrics(batch, pseudo, mask, w) -> dict:
  """mask_rate, and the accuracy of the masked-in targets when the true labels are batched."""
  return {"mask_rate": masked_mean(mask, w), **target_accuracy(batch, pseudo, mask, w)}


# ---------------------------------------------------------------------------------------------
# Loss terms: term(apply_fn, params, batch, rng, ctx) -> (loss, metrics).


def pi_model_term(noise: Noise = Noise()):
  def term(apply_fn, params, batch, rng, ctx: StepContext):
    target, student, w = two_views(apply_fn, params, batch, rng, "pi_model", noise=noise)
    return masked_mean(probs_mse(jax.nn.softmax(target, -1), student), w), {}
  return term


def uda_term(divergence: str = "kl", temperature: float = 1.0, threshold: float = 0.0,
             noise: Noise = Noise()):
  def term(apply_fn, params, batch, rng, ctx: StepContext):
    target, student, w = two_views(apply_fn, params, batch, rng, "uda", noise=noise)
    mask = confidence_mask(jax.nn.softmax(target, -1), threshold)  # on unsharpened p, as in UDA
    q = sharpen(target, temperature)
    per_example = kl_divergence(q, student) if divergence == "kl" else probs_mse(q, student)
    return (masked_mean(per_example * mask, w),
            _pseudo_label_metrics(batch, jnp.argmax(target, -1), mask, w))
  return term


def tsa_classification_term(schedule: str, total_steps: int, label_smoothing: float = 0.0):
  """L_sup with UDA's training-signal annealing: mean CE over the labeled examples with
  p(y|x) <= eta_t (tsa_threshold); the mean is over those kept, as in the UDA code."""

  def term(apply_fn, params, batch, rng, ctx: StepContext):
    labeled = {k: v for k, v in batch.items() if not k.startswith(UNLABELED)}
    logits = apply_fn(params, labeled, rng=rng, deterministic=False).logits.astype(f32)
    labels = batch["labels"]
    eta = tsa_threshold(ctx.step, total_steps, schedule, logits.shape[-1])
    p_correct = jnp.take_along_axis(jax.nn.softmax(logits, -1), labels[:, None], -1)[:, 0]
    w = example_weights(batch)
    kept = w * (p_correct <= eta).astype(f32)
    loss = masked_mean(cross_entropy(logits, labels, label_smoothing), kept)
    acc = masked_mean((jnp.argmax(logits, -1) == labels).astype(f32), w)
    return loss, {"accuracy": acc, "tsa_threshold": eta, "tsa_kept": masked_mean(kept, w)}

  return term


def pseudo_label_term(threshold: float):
  def term(apply_fn, params, batch, rng, ctx: StepContext):
    weak, _ = unlabeled_views(batch, "pseudo_label")
    logits = apply_fn(params, _inputs(weak), rng=rng, deterministic=False).logits.astype(f32)
    probs = jax.lax.stop_gradient(jax.nn.softmax(logits, -1))
    pseudo, mask, w = jnp.argmax(probs, -1), confidence_mask(probs, threshold), example_weights(weak)
    loss = masked_mean(cross_entropy(logits, pseudo) * mask, w)
    return loss, _pseudo_label_metrics(batch, pseudo, mask, w)
  return term


def fixmatch_term(threshold: float, noise: Noise = Noise()):
  def term(apply_fn, params, batch, rng, ctx: StepContext):
    target, student, w = two_views(apply_fn, params, batch, rng, "fixmatch", need_strong=True,
                                    noise=noise)
    probs = jax.nn.softmax(target, -1)
    pseudo, mask = jnp.argmax(probs, -1), confidence_mask(probs, threshold)
    loss = masked_mean(cross_entropy(student, pseudo) * mask, w)
    return loss, _pseudo_label_metrics(batch, pseudo, mask, w)
  return term


def entropy_min_term():
  def term(apply_fn, params, batch, rng, ctx: StepContext):
    weak, _ = unlabeled_views(batch, "entropy_min")
    logits = apply_fn(params, _inputs(weak), rng=rng, deterministic=False).logits
    return masked_mean(entropy(logits), example_weights(weak)), {}
  return term


def teacher_params(params, extras: Mapping[str, Any]):
  """The student's nested params with the trainable leaves replaced by the EMA teacher's (no grad)."""
  if "teacher" not in extras:
    raise ValueError("mean_teacher needs state.extras['teacher']: create the TrainState with "
                     "extras=objective.init_extras(trainable, frozen)")
  flat = flatten(params)
  flat.update(jax.lax.stop_gradient(extras["teacher"]))
  return unflatten(flat)


def mean_teacher_term(divergence: str = "mse", noise: Noise = Noise()):
  def term(apply_fn, params, batch, rng, ctx: StepContext):
    teacher = teacher_params(params, ctx.extras)
    target, student, w = two_views(apply_fn, params, batch, rng, "mean_teacher", noise=noise,
                                    target_params=teacher)
    p = jax.nn.softmax(target, -1)
    per_example = probs_mse(p, student) if divergence == "mse" else kl_divergence(p, student)
    return (masked_mean(per_example, w),
            target_accuracy(batch, jnp.argmax(p, -1), jnp.ones_like(w), w))
  return term


def ema_decay_at(step, decay: float, warmup: bool) -> jax.Array:
  """Mean Teacher's alpha_t = min(1 - 1/(t + 1), alpha) for the update that makes step t (t >= 1)."""
  if not warmup:
    return jnp.asarray(decay, f32)
  return jnp.minimum(1.0 - 1.0 / (jnp.asarray(step, f32) + 1.0), decay)


def ema_extras(decay: float, warmup: bool = True):
  """-> (init_extras, update_extras) keeping theta' <- a_t theta' + (1 - a_t) theta in extras."""

  def init_extras(trainable, frozen):
    return {"teacher": jax.tree_util.tree_map(jnp.copy, trainable)}

  def update_extras(old_state, new_state, metrics):
    a = ema_decay_at(new_state.step, decay, warmup)
    teacher = jax.tree_util.tree_map(lambda t, s: (a * t + (1.0 - a) * s).astype(t.dtype),
                                     old_state.extras["teacher"], new_state.trainable)
    return {**new_state.extras, "teacher": teacher}

  return init_extras, update_extras


# ---------------------------------------------------------------------------------------------
# Registered objectives.

COMMON_OPTIONS = {"weight": 1.0, "rampup": "none", "rampup_steps": 0, "label_smoothing": 0.0}
NOISE_OPTIONS = {"embedding_noise": "none", "embedding_noise_scale": 0.0}
# Distribution alignment of the pseudo-labeling objectives (jaxft.objectives.adaptive.DistAlign).
DIST_ALIGN_OPTIONS = {"dist_align": False, "dist_align_target": "uniform", "dist_align_decay": 0.999}


def check_options(name, options, info):
  """Refuses a semi-supervised objective's options that cannot run (shared by the pseudo-labeling
  objectives here and in jaxft.objectives.adaptive)."""
  if info.kind != "classification":
    raise ValueError(f"objective {name!r} supports classification tasks (logits [B, C]); the task "
                     f"is {info.kind!r}. Use objective.name=supervised or rdrop for it.")
  for key in ("threshold", "embedding_noise_scale"):
    if key in options and not 0.0 <= options[key] <= 1.0:
      raise ValueError(f"objective.{name}.{key} must be in [0, 1], got {options[key]}")
  if "divergence" in options and options.divergence not in ("kl", "mse"):
    raise ValueError(f"objective.{name}.divergence must be 'kl' or 'mse', got {options.divergence!r}")
  if "embedding_noise" in options and options.embedding_noise not in ("none", "gaussian", "dropout"):
    raise ValueError(f"objective.{name}.embedding_noise must be none, gaussian or dropout, got "
                     f"{options.embedding_noise!r}")


def noise_of(options) -> Noise:
  return Noise(options.embedding_noise, float(options.embedding_noise_scale))


def semi_objective(options, info, unsup, sup=None, **extra) -> Objective:
  """The Part of a semi-supervised objective: terms "sup" (the task's loss, or `sup`) and "unsup"
  (weighted by options.weight, ramped up as options.rampup says); `extra` are more Part fields."""
  ramp = rampup(options.rampup, options.rampup_steps)
  lam = float(options.weight)
  weight = lam if options.rampup == "none" or options.rampup_steps <= 0 else (lambda t: lam * ramp(t))
  sup = sup or task_term(info.kind, options.label_smoothing)
  return Objective(terms={"sup": Weighted(sup), "unsup": Weighted(unsup, weight)}, unlabeled=True,
                   **extra)


@register("pi_model", defaults={**COMMON_OPTIONS, "weight": 10.0, "rampup": "sigmoid",
                                "rampup_steps": 1000, **NOISE_OPTIONS})
def pi_model(options, info) -> Objective:
  check_options("pi_model", options, info)
  return semi_objective(options, info, pi_model_term(noise_of(options)))


@register("uda", defaults={**COMMON_OPTIONS, "divergence": "kl", "temperature": 0.4, "threshold": 0.8,
                           "tsa": "none", "tsa_total_steps": 0, **NOISE_OPTIONS})
def uda(options, info) -> Objective:
  check_options("uda", options, info)
  if options.temperature <= 0:
    raise ValueError(f"objective.uda.temperature must be > 0, got {options.temperature}")
  sup = None
  if options.tsa != "none":
    tsa_threshold(0, options.tsa_total_steps, options.tsa, 2)  # validates schedule and horizon
    sup = tsa_classification_term(options.tsa, options.tsa_total_steps, options.label_smoothing)
  return semi_objective(options, info, uda_term(options.divergence, float(options.temperature),
                                       float(options.threshold), noise_of(options)), sup,
               strong_view=True)


@register("pseudo_label", defaults={**COMMON_OPTIONS, "threshold": 0.95, "rampup": "linear",
                                    "rampup_steps": 1000})
def pseudo_label(options, info) -> Objective:
  check_options("pseudo_label", options, info)
  return semi_objective(options, info, pseudo_label_term(float(options.threshold)))


# fixmatch is registered in jaxft.objectives.adaptive: with dist_align its term keeps running state.


@register("entropy_min", defaults={**COMMON_OPTIONS, "weight": 0.1})
def entropy_min(options, info) -> Objective:
  check_options("entropy_min", options, info)
  return semi_objective(options, info, entropy_min_term())


@register("mean_teacher", defaults={**COMMON_OPTIONS, "weight": 10.0, "rampup": "sigmoid",
                                    "rampup_steps": 1000, "divergence": "mse", "ema_decay": 0.999,
                                    "ema_warmup": True, **NOISE_OPTIONS})
def mean_teacher(options, info) -> Objective:
  check_options("mean_teacher", options, info)
  if not 0.0 <= options.ema_decay < 1.0:
    raise ValueError(f"objective.mean_teacher.ema_decay must be in [0, 1), got {options.ema_decay}")
  init_extras, update_extras = ema_extras(float(options.ema_decay), bool(options.ema_warmup))
  return semi_objective(options, info, mean_teacher_term(options.divergence, noise_of(options)),
               init_extras=init_extras, update_extras=update_extras)


# ---------------------------------------------------------------------------------------------
# Self-training (Noisy Student, Xie et al. 2020) as a host-side driver.

Examples = dict  # column name -> np.ndarray [N, ...], all columns of equal length


@dataclasses.dataclass
class SelfTrainingRound:
  """One teacher -> student round: which unlabeled rows were pseudo-labeled and how well."""
  round: int
  selected: np.ndarray  # int [n] indices into the unlabeled pool
  pseudo_labels: np.ndarray  # int [n] (hard) or float [n, C] (soft)
  confidence: np.ndarray  # float [n] teacher max-probability of each selected row
  pseudo_label_accuracy: float | None  # when the pool carries its true labels (diagnostics)


def select_pseudo_labels(probs: np.ndarray, threshold: float = 0.0, max_per_class: int = 0):
  """probs [N, C] -> indices (ascending) with max prob >= threshold; with max_per_class > 0, at most
  that many per predicted class, the most confident first (Noisy Student's class balancing)."""
  probs = np.asarray(probs)
  if probs.ndim != 2:
    raise ValueError(f"predict_fn must return probabilities [N, C], got shape {probs.shape}")
  conf, pred = probs.max(-1), probs.argmax(-1)
  chosen = np.flatnonzero(conf >= threshold)
  if max_per_class > 0:
    keep = []
    for c in np.unique(pred[chosen]):
      rows = chosen[pred[chosen] == c]
      keep.append(rows[np.argsort(-conf[rows], kind="stable")[:max_per_class]])
    chosen = np.sort(np.concatenate(keep)) if keep else chosen
  return chosen


def self_train(train_fn: Callable[[Examples, int], Any], predict_fn: Callable[[Any, Examples], Any],
               labeled: Examples, unlabeled: Examples, *, rounds: int = 3, threshold: float = 0.0,
               max_per_class: int = 0, soft: bool = False, label_key: str = "label",
               true_label_key: str | None = None, teacher=None):
  """Teacher labels the unlabeled pool, a student trains on labeled + pseudo-labeled rows; repeat.

  train_fn(examples, round) -> model: trains a fresh model; the student should train *with noise*
    (dropout, objective uda/fixmatch, augment policy "strong"): what makes Noisy Student work.
  predict_fn(model, examples) -> probs [N, C] (numpy or jax).
  soft: pseudo-labels are the teacher's probabilities [n, C] and labeled rows become one-hot, so
    `label_key` holds float [N, C] targets; hard: argmax labels.
  true_label_key: a column of the unlabeled pool with its true labels, used only to report accuracy
    and never passed to train_fn.
  Returns (final model, [SelfTrainingRound]): round 0 trains the first teacher on `labeled` only
  (skipped when `teacher` is given); rounds 1..rounds each train one student.
  """
  if label_key not in labeled:
    raise KeyError(f"labeled examples have no {label_key!r} column; columns: {sorted(labeled)}")
  columns = [k for k in labeled if k != label_key]
  missing = [k for k in columns if k not in unlabeled]
  if missing:
    raise KeyError(f"unlabeled examples lack columns {missing} that the labeled ones have")
  model = train_fn(labeled, 0) if teacher is None else teacher
  history = []
  for r in range(1, rounds + 1):
    probs = np.asarray(predict_fn(model, unlabeled), np.float32)
    chosen = select_pseudo_labels(probs, threshold, max_per_class)
    hard = probs[chosen].argmax(-1)
    accuracy = None
    if true_label_key is not None:
      truth = np.asarray(unlabeled[true_label_key])[chosen]
      accuracy = float(np.mean(hard == truth)) if len(chosen) else float("nan")
    if soft:
      num_classes = probs.shape[1]
      base = np.eye(num_classes, dtype=np.float32)[np.asarray(labeled[label_key])]
      targets = probs[chosen]
    else:
      base, targets = np.asarray(labeled[label_key]), hard
    merged = {k: np.concatenate([np.asarray(labeled[k]), np.asarray(unlabeled[k])[chosen]])
              for k in columns}
    merged[label_key] = np.concatenate([base, targets.astype(base.dtype)])
    history.append(SelfTrainingRound(r, chosen, targets, probs[chosen].max(-1), accuracy))
    model = train_fn(merged, r)
  return model, history
