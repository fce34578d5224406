"""Reopening a finished (or interrupted) workdir: evaluate its checkpoint, or export its model."""

from __future__ import annotations

import json
import pathlib

from jaxft import config as config_lib
from jaxft.train import checkpoint as ckpt_lib
from jaxft.train.evaluate import Evaluator
from jaxft.train.setup import Setup, build_setup


def load_workdir(workdir: str | pathlib.Path, which: str = "best", setup_fn=None):
  """-> (setup, state) with the state of the workdir's best or latest checkpoint. setup_fn(config)
  -> Setup replaces build_setup (jaxft.recipes.setup_for: a multitask or continual run's)."""
  workdir = pathlib.Path(workdir)
  saved = workdir / "config.json"
  if not saved.exists():
    raise FileNotFoundError(f"{workdir} is not a jaxft workdir (no config.json); train first with "
                            "`jaxft train --config ... --workdir DIR`")
  config = config_lib.from_json(saved.read_text())
  setup: Setup = (setup_fn or build_setup)(config)
  ckpts = ckpt_lib.Checkpoints(workdir, keep=config.train.keep_checkpoints, async_save=False)
  target = ckpt_lib.abstract(setup.checkpointable(setup.state))
  restored = ckpts.restore_best(target) if which == "best" else None
  if restored is None:
    restored = ckpts.restore_latest(target)
  ckpts.close()
  if restored is None:
    raise FileNotFoundError(f"no readable checkpoint in {workdir / 'checkpoints'}")
  state, _ = restored
  return setup, setup.from_checkpointable(state)


def evaluate_workdir(workdir, split: str | None = None, which: str = "best",
                     int8: bool = False, pgd_eps=(), pgd_steps: int = 10,
                     pgd_examples: int = 0, synonym_examples: int = 0, setup_fn=None) -> dict:
  """Metrics of the workdir's checkpoint; int8=True adds {"int8": {"eval", "size"}}: the same
  weights after post-training per-channel int8 quantization, and the size before and after.
  pgd_eps / synonym_examples add {"robustness": ...} (`evaluate.robustness_metrics`)."""
  setup, state = load_workdir(workdir, which, setup_fn)
  if setup.evaluator is not None:  # a recipe's own evaluation (every task with its head)
    if int8 or pgd_eps or synonym_examples:
      raise ValueError(f"{workdir} is a multi-task run: --int8 / --pgd-eps / --synonym-attack "
                       "score one task's model; evaluate without them")
    metrics = setup.evaluator.evaluate(state)
  else:
    metrics = Evaluator(setup, split).evaluate(state)
  if int8:
    from jaxft.train.evaluate import int8_metrics
    metrics = {**metrics, "int8": int8_metrics(setup, state, split)}
  if pgd_eps or synonym_examples:
    from jaxft.train.evaluate import robustness_metrics
    metrics = {**metrics, "robustness": robustness_metrics(
        setup, state, split, epsilons=pgd_eps, pgd_steps=pgd_steps,
        pgd_examples=pgd_examples, synonym_examples=synonym_examples)}
  out = pathlib.Path(workdir) / f"eval_{split or setup.config.data.eval_split}_{which}.json"
  out.write_text(json.dumps(metrics, indent=2))
  return metrics


def export_workdir(workdir, out_dir, which: str = "best", merged: bool = True,
                   overwrite: bool = False, setup_fn=None) -> pathlib.Path:
  from jaxft import peft
  setup, state = load_workdir(workdir, which, setup_fn)
  if setup.evaluator is not None:
    raise ValueError(f"{workdir} is a multi-task run (one encoder, a head per task); a Hugging "
                     "Face directory holds one model. Export is for single-task runs")
  out = pathlib.Path(out_dir)
  if out.exists() and any(out.iterdir()) and not overwrite:
    raise FileExistsError(f"{out} is not empty; choose a new --out or pass --overwrite")
  params = setup.eval_params(state.trainable, state.frozen, state.extras)
  peft.export(setup.model, params, out, merged=merged)
  return out
