"""Reopening a finished (or interrupted) workdir: evaluate its checkpoint, or export its model.

The checkpoint is the run's own choice (best by the eval split it trained with, or latest);
evaluating another split of the task (`jaxft eval --split test`) builds that split too but never
changes which checkpoint is read. The model is rebuilt from its base checkpoint and then takes
every trained leaf from the run's checkpoint, so the base's missing head is not warned about.
"""

from __future__ import annotations

import json
import pathlib
from typing import Sequence

import numpy as np

from jaxft import config as config_lib
from jaxft.core.state import flatten
from jaxft.models import pretrained
from jaxft.train import checkpoint as ckpt_lib
from jaxft.train.evaluate import Evaluator
from jaxft.train.setup import Setup, build_setup


def with_eval_splits(config, splits: Sequence[str]):
  """`config` with data.eval_split extended by `splits` it does not name yet (appended, so the
  first split, the one training scored and picked checkpoints by, stays the default)."""
  names = [s.strip() for s in str(config.data.eval_split).split(",") if s.strip()]
  extra = [s for s in dict.fromkeys(s.strip() for s in splits if s and s.strip())
           if s not in names]
  if not extra:
    return config
  config = config_lib.from_json(config_lib.to_json(config))  # a copy; the caller's is unchanged
  config.data.eval_split = ",".join(names + extra)
  return config


def load_workdir(workdir: str | pathlib.Path, which: str = "best", setup_fn=None, *,
                 eval_splits: Sequence[str] = ()):
  """-> (setup, state) with the state of the workdir's best or latest checkpoint. setup_fn(config)
  -> Setup replaces build_setup (jaxft.recipes.setup_for: a multitask or continual run's).
  eval_splits: splits of the task to build for evaluation besides the run's data.eval_split."""
  workdir = pathlib.Path(workdir)
  saved = workdir / "config.json"
  if not saved.exists():
    raise FileNotFoundError(f"{workdir} is not a jaxft workdir (no config.json); train first with "
                            "`jaxft train --config ... --workdir DIR`")
  config = with_eval_splits(config_lib.from_json(saved.read_text()), eval_splits)
  with pretrained.restoring():  # the checkpoint below supplies the head the base model lacks
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
                     pgd_examples: int = 0, synonym_examples: int = 0, setup_fn=None,
                     file: str | None = None, speed_passes: int = 0) -> dict:
  """Metrics of the workdir's checkpoint on `split` (default: the run's first eval split) or on
  the local `file` in the task's format (`jaxft.data.tasks.read_file`); int8=True adds
  {"int8": {"eval", "size"}}: the same weights after post-training per-channel int8 quantization,
  and the size before and after. pgd_eps / synonym_examples add {"robustness": ...}
  (`evaluate.robustness_metrics`); speed_passes > 0 adds {"inference": ...}, the forward's
  examples/s, best of that many passes (`evaluate.inference_speed`).
  Written to <workdir>/eval_<split or file stem>_<which>.json."""
  if split and file:
    raise ValueError("evaluate on --split or on --file, not both")
  name = None
  if file:
    from jaxft.data import tasks  # its read_file refuses a missing file before any model loads
    split, name = tasks.file_split(file), "file_" + pathlib.Path(file).stem
  setup, state = load_workdir(workdir, which, setup_fn, eval_splits=[split] if split else [])
  if setup.evaluator is not None:  # a recipe's own evaluation (every task with its head)
    if int8 or pgd_eps or synonym_examples or speed_passes:
      raise ValueError(f"{workdir} is a multi-task run: --int8 / --pgd-eps / --synonym-attack / "
                       "--speed-passes score one task's model; evaluate without them")
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
  if speed_passes:
    from jaxft.train.evaluate import inference_speed
    metrics = {**metrics, "inference": inference_speed(setup, state, split, speed_passes)}
  name = name or split or setup.config.data.eval_split.split(",")[0].strip()
  out = pathlib.Path(workdir) / f"eval_{name}_{which}.json"
  out.write_text(json.dumps(metrics, indent=2))
  return metrics


def export_workdir(workdir, out_dir, which: str = "best", merged: bool = True,
                   overwrite: bool = False, setup_fn=None) -> pathlib.Path:
  """Writes the workdir's model: merged=True an ordinary Hugging Face directory (PEFT folded in);
  merged=False (--adapter-only) every leaf the run trained, with its PeftSpec, peft options and
  head in peft_config.json (jaxft.peft.io), checked to rebuild the evaluated weights bitwise
  through `jaxft.peft.io.load_adapter` before this returns."""
  from jaxft import peft
  setup, state = load_workdir(workdir, which, setup_fn)
  if setup.evaluator is not None:
    raise ValueError(f"{workdir} is a multi-task run (one encoder, a head per task); a Hugging "
                     "Face directory holds one model. Export is for single-task runs")
  out = pathlib.Path(out_dir)
  if out.exists() and any(out.iterdir()) and not overwrite:
    raise FileExistsError(f"{out} is not empty; choose a new --out or pass --overwrite")
  params = setup.eval_params(state.trainable, state.frozen, state.extras)
  if merged:
    peft.export(setup.model, params, out, merged=True)
    return out
  config = setup.config
  peft.export(setup.model, params, out, merged=False,
              labels={k: peft.TRAINABLE for k in state.trainable}, method=config.peft.method,
              base_model=_base_model(config.model.name), options=config.peft.to_dict())
  _check_adapter(out, params)
  return out


def _base_model(name: str) -> str:
  """An existing local directory as an absolute path (the adapter may be loaded from elsewhere);
  asset names and hub ids as they are."""
  p = pathlib.Path(name).expanduser()
  return str(p.resolve()) if p.is_dir() else name


def _check_adapter(out: pathlib.Path, params) -> None:
  """Loads the adapter back onto its base model; every leaf must equal the exported weights
  bitwise, else the files are removed and the export refused (a run whose frozen weights are not
  the base checkpoint's: model.keep_layers, a distilled student, pruning masks)."""
  from jaxft.peft import io as peft_io
  want = {k: np.asarray(v) for k, v in flatten(params).items()}
  try:
    got = {k: np.asarray(v) for k, v in flatten(peft_io.load_adapter(out).params).items()}
    differ = sorted(k for k in set(want) | set(got) if k not in want or k not in got or
                    want[k].dtype != got[k].dtype or want[k].shape != got[k].shape or
                    want[k].tobytes() != got[k].tobytes())
    reason = f"these weights differ from the run's: {', '.join(differ[:4])}" + (
        f" (+{len(differ) - 4} more)" if len(differ) > 4 else "") if differ else ""
  except (KeyError, ValueError) as e:
    reason = f"the base model does not take it ({e.args[0] if e.args else e})"
  if reason:
    for name in (peft_io.PARAMS_FILE, peft_io.CONFIG_FILE):
      (out / name).unlink(missing_ok=True)
    raise ValueError(f"--adapter-only: the trained leaves put on the base model do not rebuild "
                     f"this run's model; {reason}. Fix: export the whole model (without "
                     "--adapter-only)")
