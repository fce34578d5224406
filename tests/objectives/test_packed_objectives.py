"""Every objective on packed batches: the loss, its metrics and the gradients of a tiny BERT are
those of a padded batch of the same examples, within 1e-5 (fp32, CPU).

The padded batch has one row per slot of the packed one (the spare slot is an all-padding row with
example_mask 0) and rows of the packed length, so the per-example noise of the adversarial and
consistency objectives (base.ExampleLayout.draw) is the same draw in both. Dropout rates are 0:
dropout masks are drawn per row and could not match. Each group of objectives is one jitted
function of (params, batch), compiled once per layout with the fast CPU backend options.
"""

import concurrent.futures
import functools
import pathlib
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "models"))
import hf_tiny as tiny  # noqa: E402
import packed_parity as pp  # noqa: E402

from jaxft.core.state import flatten  # noqa: E402
from jaxft.models import from_pretrained  # noqa: E402
from jaxft.objectives import distill, prune, registry  # noqa: E402
from jaxft.objectives.base import (StepContext, Weighted, concat_batches, make_loss_fn,  # noqa: E402
                                   make_step, token_weights)
from jaxft.objectives.supervised import task_term  # noqa: E402
from jaxft.recipes import continual  # noqa: E402

TOL = 1e-5
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
L = 16  # row length of both layouts
NO_DROPOUT = dict(hidden_dropout=0.0, attention_dropout=0.0, classifier_dropout=0.0)
LABELED = [10, 6, 5, 4, 3]  # two packed rows: 10 + 6 | 5 + 4 + 3
WEAK = [7, 9, 3, 5, 2, 8]  # the unlabeled view u
STRONG = [6, 9, 4, 3, 2, 7]  # A(u): the same examples, other tokens and lengths, packed apart


# ---------------------------------------------------------------------------------------------
# Models and batches


def _model(tmp_path_factory, head, seed=0, layers=1):
  d = tmp_path_factory.mktemp(f"{head}_{seed}")
  tiny.torch_model("bert", head, num_labels=3, seed=seed, num_hidden_layers=layers,
                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).save_pretrained(d)
  return from_pretrained(d, head=head, **NO_DROPOUT)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """One-layer students (compile time is most of this file's), two-layer teachers."""
  return {"seq": _model(tmp_path_factory, "sequence_classification"),
          "tok": _model(tmp_path_factory, "token_classification"),
          "seq_teacher": _model(tmp_path_factory, "sequence_classification", seed=1, layers=2),
          "tok_teacher": _model(tmp_path_factory, "token_classification", seed=1, layers=2)}


def _padded(lengths, seed):
  """Right-padded rows of `lengths` plus one all-padding row (example_mask 0), L columns."""
  rs = np.random.RandomState(seed)
  b = len(lengths) + 1
  ids = np.zeros((b, L), np.int32)
  mask = np.zeros((b, L), np.int32)
  for i, n in enumerate(lengths):
    ids[i, :n] = rs.randint(3, 61, n)
    mask[i, :n] = 1
  types = (np.arange(L)[None] >= 3).astype(np.int32) * mask
  return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types,
          "example_mask": np.array([1.0] * len(lengths) + [0.0], np.float32)}


def _pack(padded, rows, **labels):
  real = {k: v[:-1] for k, v in padded.items() if k != "example_mask"}
  packed, _ = pp.packed_from_padded(real, 0, rows=rows, length=L, spare=1, **labels)
  return packed


def _prefixed(batch, prefix):
  return {prefix + k: v for k, v in batch.items()}


def make_batches():
  """{"seq" | "tok": (padded, packed)}; seq carries the semi-supervised views."""
  lab = _padded(LABELED, 0)
  seq_labels = np.array([0, 1, 2, 1, 0, 0], np.int32)
  tok_labels = np.where(lab["attention_mask"] == 1,
                        np.random.RandomState(3).randint(0, 3, lab["input_ids"].shape), -100)
  tok_labels[:, 0] = -100  # [CLS]
  weak, strong = _padded(WEAK, 1), _padded(STRONG, 2)
  u_labels = np.array([2, 0, 1, 1, 2, 0, 0], np.int32)
  seq_padded = {**lab, "labels": seq_labels, **_prefixed(weak, "unlabeled/"),
                "unlabeled/labels": u_labels, **_prefixed(strong, "unlabeled/strong/")}
  seq_packed = {**_pack(lab, 2, labels=seq_labels[:-1]),
                **_prefixed(_pack(weak, 3), "unlabeled/"), "unlabeled/labels": u_labels,
                **_prefixed(_pack(strong, 3), "unlabeled/strong/")}
  tok_padded = {**lab, "labels": tok_labels.astype(np.int32)}
  tok_packed = _pack(lab, 2, token_labels=tok_labels[:-1])
  assert seq_packed["input_ids"].shape == (2, L) and seq_packed["example_mask"].shape == (6,)
  assert seq_packed["unlabeled/strong/segment_ids"].max() == 6  # a layout of its own
  return {"seq": (seq_padded, seq_packed), "tok": (tok_padded, tok_packed)}


@pytest.fixture(scope="module")
def batches():
  return make_batches()


# ---------------------------------------------------------------------------------------------
# Objectives: (terms, extras) per case


def objective(name, **overrides):
  cfg = ml_collections.ConfigDict({"name": name, name: registry.defaults()[name]})
  cfg[name].update(overrides)
  return cfg


class Info:
  def __init__(self, kind):
    self.kind, self.num_labels = kind, 3


def _nudged(flat, scale=1.03):
  """A teacher near the student (an exact copy makes consistency targets trivial)."""
  return {k: v * scale for k, v in flat.items()}


def registry_case(kind, name, **overrides):
  obj = registry.build(objective(name, **overrides), Info(kind))

  def extras(flat):
    ex = obj.init_extras(flat, {}) if obj.init_extras else {}
    for key in ("teacher", "smart_teacher"):
      if key in ex:
        ex[key] = _nudged(ex[key])
    return ex

  return obj.terms, extras, lambda flat: flat


# One case per registered objective, with options that make every part of it count: random starts
# and noise (drawn per example), projections that bind, thresholds that keep some pseudo-labels.
# L2 norms and projections: fgm, pgd, freelb, vat; L-inf: smart.
SEQ_CASES = {
    "supervised": ("supervised", {"label_smoothing": 0.1}),
    "rdrop": ("rdrop", {}),
    "fgm": ("fgm", {}),
    "pgd": ("pgd", {"random_init": True, "steps": 2, "epsilon": 0.5}),
    "freelb": ("freelb", {"epsilon": 0.3, "steps": 2}),
    "smart": ("smart", {"epsilon": 0.1, "noise_std": 0.05, "step_size": 0.05}),
    "vat": ("vat", {}),
    "r3f": ("r3f", {"noise_std": 0.05}),
    "contrastive": ("contrastive", {}),
    "pi_model": ("pi_model", {"rampup": "none", "embedding_noise": "gaussian",
                              "embedding_noise_scale": 0.05}),
    "uda": ("uda", {"threshold": 0.0, "tsa": "linear", "tsa_total_steps": 10}),
    "pseudo_label": ("pseudo_label", {"threshold": 0.3, "rampup": "none"}),
    "fixmatch": ("fixmatch", {"threshold": 0.3, "embedding_noise": "gaussian",
                              "embedding_noise_scale": 0.05}),
    "entropy_min": ("entropy_min", {}),
    "mean_teacher": ("mean_teacher", {"rampup": "none", "embedding_noise": "dropout",
                                      "embedding_noise_scale": 0.1}),
    "flexmatch": ("flexmatch", {"threshold": 0.3, "pool_size": 20}),
    "freematch": ("freematch", {"fairness_weight": 0.1}),
    "softmatch": ("softmatch", {"dist_align_target": "model"}),  # aligned, one more pass
}
# Token classification: the per-token weights of each way a term reads token logits.
TOK_CASES = {
    "supervised": ("supervised", {}),
    "rdrop": ("rdrop", {}),
    "smart": ("smart", {"epsilon": 0.1, "noise_std": 0.05, "step_size": 0.05, "prox_weight": 0.0}),
}


def distill_case(kind, teacher):
  """Logit + hidden-state + attention transfer from a two-layer teacher of another seed."""
  term = distill.distill_term(teacher.apply, kind=kind, alpha=0.5, temperature=2.0,
                              hidden_weight=1.0, attention_weight=10.0)
  proj = distill.init_projections(jax.random.key(0), 36, 36)
  return ({"distill": Weighted(term)}, lambda flat: distill.distill_extras(teacher.params),
          lambda flat: {**flat, **proj})


def prune_case(kind):
  """Movement pruning at 30% sparsity: masked forward, straight-through score gradients."""
  terms = {"sup": Weighted(prune.masked_term(task_term(kind), "movement"))}
  schedule = prune.CubicSchedule(final=0.3, num_updates=0)
  state = {}

  def trainable(flat):
    tr, ex = prune.init_pruning(flat, {}, "movement", schedule=schedule, score_init=0.0)
    # Distinct scores, so top-k keeps a spread of weights rather than ties by index.
    tr = {k: (v + 0.01 * jnp.abs(flat[k[len(prune.SCORES) + 1:]])
              if k.startswith(prune.SCORES + "/") else v) for k, v in tr.items()}
    state["masks"] = prune.topk_masks(
        {k[len(prune.SCORES) + 1:]: v for k, v in tr.items() if k.startswith(prune.SCORES)},
        0.3)
    return tr

  return terms, lambda flat: {"masks": state["masks"]}, trainable


def run_cases(model, cases, padded, packed):
  """{name: (loss, metrics, grads)} for both layouts, one jit (one compile per layout)."""
  flat = flatten(model.params)
  built = {}
  for name, (terms, extras, trainable) in cases.items():
    tr = trainable(flat)
    built[name] = (make_loss_fn(model.apply, terms), tr, extras(flat))

  def all_cases(trainables, extras, batch, rng):
    out = {}
    for name, (loss_fn, _, _) in built.items():
      ctx = StepContext(step=jnp.asarray(3, jnp.int32), extras=extras[name])
      (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          trainables[name], {}, batch, rng, ctx)
      out[name] = (loss, metrics, grads)
    return out

  trainables = {n: b[1] for n, b in built.items()}
  extras = {n: b[2] for n, b in built.items()}
  args = [(trainables, extras, batch, jax.random.key(7)) for batch in (padded, packed)]
  lowered = [jax.jit(all_cases).lower(*a) for a in args]
  # XLA compiles without the GIL: the two layouts compile side by side on two cores.
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    compiled = list(pool.map(lambda low: low.compile(compiler_options=FAST_COMPILE), lowered))
  return tuple(jax.device_get(c(*a)) for c, a in zip(compiled, args))


def differences(want, got) -> dict:
  """name -> (|loss diff|, max |metric diff|, max |grad diff|, max |grad|)."""
  out = {}
  for name in want:
    (l1, m1, g1), (l2, m2, g2) = want[name], got[name]
    assert set(m1) == set(m2) and set(g1) == set(g2), name
    out[name] = (pp.max_diff(l1, l2),
                 max([pp.max_diff(m1[k], m2[k]) for k in m1] + [0.0]),
                 max(pp.max_diff(g1[k], g2[k]) for k in g1),
                 max(float(np.max(np.abs(g1[k]))) for k in g1))
  return out


def assert_parity(diffs):
  report = "\n".join(f"  {n}: loss {d[0]:.2e} metrics {d[1]:.2e} grads {d[2]:.2e} (|g| max "
                     f"{d[3]:.2g})" for n, d in diffs.items())
  print("packed vs padded:\n" + report)
  bad = [n for n, d in diffs.items() if max(d[:3]) > TOL]
  assert not bad, f"packed differs from padded for {bad}:\n{report}"
  # Not vacuous: every case has a gradient to compare.
  assert all(d[3] > 1e-4 for d in diffs.values()), report


# ---------------------------------------------------------------------------------------------
# Parity


def test_sequence_objectives_pack(models, batches):
  """Every registered objective on a classification task (SSL ones on packed weak and strong
  views), distillation with hidden/attention transfer, movement pruning."""
  assert {c[0] for c in SEQ_CASES.values()} == set(registry.names())
  cases = {n: registry_case("classification", o, **kw) for n, (o, kw) in SEQ_CASES.items()}
  cases["distill"] = distill_case("classification", models["seq_teacher"])
  cases["prune"] = prune_case("classification")
  diffs = differences(*run_cases(models["seq"], cases, *batches["seq"]))
  assert_parity(diffs)


def test_token_objectives_pack(models, batches):
  """Token classification: per-token weights of packed rows (base.token_weights), R-Drop's
  stacked batch, perturbations and divergences per token, distillation hidden/attention terms."""
  cases = {n: registry_case("token_classification", o, **kw) for n, (o, kw) in TOK_CASES.items()}
  cases["distill"] = distill_case("token_classification", models["tok_teacher"])
  diffs = differences(*run_cases(models["tok"], cases, *batches["tok"]))
  assert_parity(diffs)


@pytest.mark.parametrize("kind", ["classification", "token_classification"])
def test_continual_fisher_packs(models, batches, kind):
  """EWC's diagonal Fisher (per-example squared gradients) on a packed batch: per-slot pullbacks
  of one packed forward give the padded per-example gradients; sampled labels use the same keys."""
  model = models["seq" if kind == "classification" else "tok"]
  padded, packed = batches["seq" if kind == "classification" else "tok"]
  strip = lambda b: {k: v for k, v in b.items() if not k.startswith("unlabeled/")}
  flat = flatten(model.params)
  keys = [k for k in flat if "attention/self" in k or k.startswith("head/")]
  kw = dict(keys=keys, chunk=3, rng=jax.random.key(4), empirical=kind != "classification")
  want = continual.fisher_diagonal(model.apply, flat, {}, [strip(padded)], kind, **kw)
  got = continual.fisher_diagonal(model.apply, flat, {}, [strip(packed)], kind, **kw)
  worst = max(pp.max_diff(want[k], got[k]) for k in want)
  assert worst <= TOL and max(float(np.max(want[k])) for k in want) > 1e-6, worst


# ---------------------------------------------------------------------------------------------
# Helpers and refusals


def test_token_weights_and_concat_follow_the_slots(batches):
  padded, packed = batches["tok"]
  want = np.asarray(token_weights(padded, padded["labels"]))
  got = pp.per_token(packed, token_weights(packed, packed["labels"]))
  for i, w in enumerate(got):
    np.testing.assert_array_equal(w, want[i, :len(w)])
  both = concat_batches(packed, packed)
  e, tokens = packed["example_start"].shape[0], packed["segment_ids"].size
  np.testing.assert_array_equal(both["segment_ids"][2:],
                                np.where(packed["segment_ids"] > 0, packed["segment_ids"] + e, 0))
  np.testing.assert_array_equal(both["example_start"][e:], packed["example_start"] + tokens)
  flat = np.asarray(both["input_ids"]).reshape(-1)
  np.testing.assert_array_equal(flat[np.asarray(both["example_start"])[e:]],
                                flat[np.asarray(packed["example_start"])])


def test_what_cannot_pack_is_refused_before_compute(models, batches):
  """Gradient accumulation splits rows and slots apart: refused when the step is built for packed
  batches, and when a packed batch reaches a step built without saying so (at trace time)."""
  import optax
  model = models["seq"]
  terms = {"sup": Weighted(task_term("classification"))}
  tx = optax.sgd(0.1)
  with pytest.raises(ValueError, match=r"data\.packing.*--config\.data\.packing=false"):
    make_step(model.apply, terms, tx, grad_accum_steps=2, packed=True)
  make_step(model.apply, terms, tx, grad_accum_steps=1, packed=True)  # fine
  from jaxft.core.state import TrainState
  flat = flatten(model.params)
  state = TrainState.create(flat, {}, tx, {"skipped_steps": jnp.zeros((), jnp.int32)})
  step = make_step(model.apply, terms, tx, grad_accum_steps=2)
  packed = {k: v for k, v in batches["seq"][1].items() if not k.startswith("unlabeled/")}
  with pytest.raises(ValueError, match=r"grad_accum_steps=2.*data\.packing"):
    jax.eval_shape(functools.partial(step, state), packed, jax.random.key(0))
  # A distillation teacher with its own tokenizer needs its own packing keys.
  own = {**packed, "teacher/input_ids": packed["input_ids"],
         "teacher/attention_mask": packed["attention_mask"]}
  with pytest.raises(ValueError, match=r"data\.packing"):
    distill.teacher_batch(own)
  fixed = {**own, **{f"teacher/{k}": packed[k] for k in ("segment_ids", "position_ids",
                                                        "example_start")}}
  assert set(distill.teacher_batch(fixed)) >= {"segment_ids", "input_ids", "example_mask"}
