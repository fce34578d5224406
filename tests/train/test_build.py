"""The one step builder: every kind of run gets its step from jaxft.train.build.build, composed from
the parts its config asks for; distillation and pruning run their own step functions; a new
objective is one module registered from outside the package. Tiny random BERT, real MR data."""

from __future__ import annotations

import json
import pathlib
import shutil
import sys
import textwrap

import jax
import numpy as np
import pytest

from jaxft import cli
from jaxft.objectives import distill, prune
from jaxft.train import build as build_lib
from jaxft.train import setup as setup_lib

from tests.train.test_loop import make_config

KINDS = {
    # name: (overrides, parts the step is made of)
    "supervised": ({}, ["supervised"]),
    "fixmatch": ({"objective__name": "fixmatch", "data__labeled_per_class": 8,
                  "data__unlabeled_ratio": 1, "data__max_train_examples": 128}, ["fixmatch"]),
    "fgm": ({"objective__name": "fgm"}, ["fgm"]),
    "lora": ({"peft__method": "lora"}, ["supervised"]),
    "magnitude": ({"prune__method": "magnitude", "prune__final_sparsity": 0.5},
                  ["supervised", "prune"]),
    "qat_int8": ({"quant__method": "qat_int8"}, ["supervised", "qat"]),
    "ema": ({"train__ema_decay": 0.9, "train__eval_with": "ema"}, ["supervised", "averaging"]),
    "spike_plateau": ({"train__spike_factor": 10.0, "train__schedule": "plateau"},
                      ["supervised", "spike", "plateau"]),
}


@pytest.fixture(scope="module")
def teacher_dir(tiny_bert_dir, tmp_path_factory) -> pathlib.Path:
  """A tiny BERT with a 2-label sequence-classification head in its checkpoint (a teacher)."""
  import torch
  import transformers as T
  out = tmp_path_factory.mktemp("teacher")
  for f in tiny_bert_dir.iterdir():
    if not f.name.startswith(("model", "config")):
      shutil.copy(f, out / f.name)
  torch.manual_seed(1)
  cfg = T.BertConfig.from_pretrained(tiny_bert_dir, num_labels=2)
  T.BertForSequenceClassification(cfg).save_pretrained(out)
  return out


@pytest.fixture
def builds(monkeypatch):
  """Every call of the builder made through setup, with what it returned."""
  calls = []
  real = build_lib.build

  def counted(*args, **kwargs):
    calls.append(real(*args, **kwargs))
    return calls[-1]

  monkeypatch.setattr(setup_lib, "build", counted)
  return calls


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_kind_of_run_gets_its_step_from_the_builder(kind, tiny_bert_dir, builds):
  overrides, parts = KINDS[kind]
  s = setup_lib.build_setup(make_config(tiny_bert_dir, **overrides))
  assert len(builds) == 1 and s.built is builds[0]
  assert s.built.part_names == parts
  # What the loop evaluates is what the builder composed.
  flat = s.eval_params(s.state.trainable, s.state.frozen, s.state.extras)
  assert jax.tree_util.tree_structure(flat) == jax.tree_util.tree_structure(s.model.params)


def test_distillation_and_pruning_steps_are_their_own(tiny_bert_dir, teacher_dir, builds,
                                                      monkeypatch):
  made = []
  for module, name in ((distill, "make_distill_step"), (prune, "make_prune_step")):
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, _real=real, _name=name, **k:
                        made.append(_name) or _real(*a, **k))
  cfg = make_config(tiny_bert_dir, distill__teacher=str(teacher_dir), distill__hidden_weight=1.0,
                    prune__method="magnitude", prune__final_sparsity=0.5)
  s = setup_lib.build_setup(cfg)
  # Distillation's step hands its terms to pruning's, which wraps each with the masks.
  assert made == ["make_distill_step", "make_prune_step"]
  assert s.built.part_names == ["supervised", "distill", "prune"]
  assert any(k.startswith("distill_proj/") for k in s.state.trainable)
  assert "teacher" in s.state.extras and "masks" in s.state.extras
  # Training-only leaves never reach evaluation or export; masks do.
  flat = jax.tree_util.tree_leaves(s.eval_params(s.state.trainable, s.state.frozen,
                                                 s.state.extras))
  assert len(flat) == len(jax.tree_util.tree_leaves(s.model.params))


def test_jaxft_train_runs_the_distillation_and_pruning_steps(tiny_bert_dir, teacher_dir, tmp_path,
                                                             monkeypatch, builds):
  made = []
  for module, name in ((distill, "make_distill_step"), (prune, "make_prune_step")):
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, _real=real, _name=name, **k:
                        made.append(_name) or _real(*a, **k))
  args = ["train", "--config", "experiments/quickstart.py:smoke", "--workdir",
          str(tmp_path / "run"), f"--config.model.name={tiny_bert_dir}",
          f"--config.distill.teacher={teacher_dir}", "--config.prune.method=magnitude",
          "--config.prune.final_sparsity=0.5", "--config.train.num_steps=4",
          "--config.train.eval_every=4", "--config.data.max_train_examples=32",
          "--config.data.max_eval_examples=16", "--config.data.max_length=32",
          "--config.data.bucket_boundaries=32", "--config.train.batch_size=8",
          "--config.train.progress=False", "--config.train.log_every=1"]
  assert cli.main(args) == 0
  assert made == ["make_distill_step", "make_prune_step"] and len(builds) == 1
  results = json.loads((tmp_path / "run" / "results.json").read_text())
  last = results["last_train"]
  assert "distill/soft" in last and last["sparsity/total"] == pytest.approx(0.5, abs=0.01)


def test_part_order_eval_params_and_clashing_terms():
  from jaxft.core.part import Part
  from jaxft.objectives.base import Weighted
  a = Part(name="a", terms={"sup": Weighted(lambda *x: (0.0, {}))})
  b = Part(name="b", replaces=("sup",), terms={"kd": Weighted(lambda *x: (0.0, {}))})
  assert sorted(build_lib.compose_terms([a, b])) == ["kd"]
  with pytest.raises(ValueError, match="'sup' of part 'c' clashes"):
    build_lib.compose_terms([a, Part(name="c", terms={"sup": a.terms["sup"]})])


TOY = textwrap.dedent('''
    """A toy objective defined outside jaxft: supervised CE plus a logit-norm penalty."""
    import jax.numpy as jnp
    from jaxft.objectives.base import Weighted, example_weights
    from jaxft.objectives.registry import Objective, register
    from jaxft.objectives.supervised import classification_term, masked_mean

    def logit_norm_term(apply_fn, params, batch, rng, ctx):
      out = apply_fn(params, batch, rng=rng, deterministic=False)
      norms = jnp.sum(jnp.square(out.logits.astype(jnp.float32)), -1)
      return masked_mean(norms, example_weights(batch)), {}

    @register("toy_logit_norm", defaults={"weight": 0.1})
    def toy(options, info):
      return Objective(terms={"sup": Weighted(classification_term()),
                              "logit_norm": Weighted(logit_norm_term, options.weight)})
''')


def test_a_new_objective_from_outside_the_package(tiny_bert_dir, tmp_path, monkeypatch, builds):
  """One new file with a registered factory; an experiment file that imports it trains with it."""
  (tmp_path / "toy_objective.py").write_text(TOY)
  monkeypatch.syspath_prepend(str(tmp_path))
  experiment = tmp_path / "toy_experiment.py"
  experiment.write_text("import toy_objective  # registers the objective\n"
                        "from jaxft.config import base_config, movie_reviews_cpu\n\n"
                        "def get_config(arg=None):\n"
                        "  c = movie_reviews_cpu(base_config())\n"
                        "  c.objective.name = 'toy_logit_norm'\n"
                        "  return c\n")
  try:
    from jaxft import recipes
    cfg = make_config(tiny_bert_dir, experiment=str(experiment), train__num_steps=4,
                      train__eval_every=4, objective__toy_logit_norm__weight=0.5)
    results = recipes.run(cfg, tmp_path / "run")
  finally:  # leave the registry as other tests expect it
    from jaxft.objectives import registry
    sys.modules.pop("toy_objective", None)
    registry._REGISTRY.pop("toy_logit_norm", None)
    registry._DEFAULTS.pop("toy_logit_norm", None)
  assert builds[0].part_names == ["toy_logit_norm"]
  last = results["last_train"]
  assert last["loss"] == pytest.approx(last["loss/sup"] + 0.5 * last["loss/logit_norm"], rel=1e-5)
  assert np.isfinite(results["eval"]["accuracy"])
