"""Self-training (Noisy Student, Xie et al. 2020) as a sequence of ordinary training runs.

    jaxft train --config experiments/semisup_usb.py:mr_100/self_training --workdir workdirs/st

With self_training.rounds = R > 0 (and data.labeled_per_class > 0), one experiment is R + 1 runs:
  <workdir>/round-0/                       the first teacher: the config on the labeled rows only
                                           (or self_training.teacher: a finished workdir on the
                                           same labeled rows and pool, e.g. the labelled-only run)
  <workdir>/pseudo_labels/round-<r>.json   teacher r-1's labels for the pool rows it selected
                                           (max prob >= self_training.threshold; with
                                           max_per_class > 0, the most confident per class)
  <workdir>/round-<r>/                     student r: a fresh model from the same checkpoint on the
                                           labeled + pseudo-labeled rows (data.pseudo_labels), with
                                           the config's noise (dropout; the objective's unlabeled
                                           term if it has one); it is the next round's teacher
  <workdir>/results.json                   the last student's results plus "self_training": one
                                           entry per round (eval, rows, pseudo-label accuracy)
The teacher labels the pool with its best checkpoint, dropout off. Pseudo-label accuracy uses the
pool's true labels (jaxft.data.pipeline keeps them for diagnostics only; no run trains on them).
Finished rounds (results.json present) are reused, so an interrupted experiment resumes.
"""

from __future__ import annotations

import json
import logging
import pathlib

import numpy as np

from jaxft import config as config_lib
from jaxft.data import batching, pseudo_labels
from jaxft.objectives.consistency import self_train
from jaxft.train import mesh as mesh_lib
from jaxft.train.evaluate import Evaluator
from jaxft.train.restore import load_workdir

log = logging.getLogger("jaxft")


def check(config) -> None:
  """Refuses a self-training config that cannot run, before any training."""
  st = config.self_training
  if st.rounds <= 0:
    return
  if int(config.data.labeled_per_class) <= 0:
    raise ValueError("self_training.rounds > 0 labels the unlabeled pool: set "
                     "data.labeled_per_class > 0 (k labeled rows per class, the rest the pool)")
  if config.data.pseudo_labels:
    raise ValueError("self_training writes data.pseudo_labels for each round itself: leave it "
                     f"empty (got {config.data.pseudo_labels!r})")
  if not 0.0 <= float(st.threshold) <= 1.0:
    raise ValueError(f"self_training.threshold must be in [0, 1], got {st.threshold}")
  if int(st.max_per_class) < 0:
    raise ValueError(f"self_training.max_per_class must be >= 0, got {st.max_per_class}")
  if st.teacher and not (pathlib.Path(st.teacher) / "results.json").is_file():
    raise ValueError(f"self_training.teacher={st.teacher!r} is not a finished jaxft workdir (no "
                     "results.json): train it first, or leave it empty to train round 0 here")


def pool_probabilities(workdir, pool=None) -> tuple[np.ndarray, list | None]:
  """The best checkpoint of `workdir` on its unlabeled pool: (probs [N, C], the pool's true
  labels or None). With `pool` (Examples), refuses a workdir whose pool is another one."""
  setup, state = load_workdir(workdir)
  data = setup.data
  if "unlabeled" not in data.encoded:
    raise ValueError(f"{workdir} has no unlabeled pool (data.labeled_per_class = 0)")
  if pool is not None and data.unlabeled.fingerprint() != pool.fingerprint():
    raise ValueError(f"{workdir} was trained with another labeled subset / unlabeled pool than "
                     "this experiment (data, seed, labeled_per_class or max_train_examples differ): "
                     "its labels would index other rows. Use a teacher run of the same data config.")
  evaluator = Evaluator(setup)
  from jaxft.data.pipeline import local_shards
  n = mesh_lib.num_batch_shards(setup.mesh)
  batches = batching.eval_batches(data.encoded["unlabeled"],
                                  batch_size=int(setup.config.train.eval_batch_size),
                                  boundaries=data.boundaries, num_shards=n,
                                  shards=local_shards(n))
  logits = np.concatenate([evaluator.real_logits(state, b) for b in batches]).astype(np.float64)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  return probs / probs.sum(-1, keepdims=True), data.unlabeled_labels


def _data(config):
  from jaxft.data import pipeline
  from jaxft.train.setup import load_tokenizer
  return pipeline.build(config.data, load_tokenizer(config.model.name),
                        batch_size=int(config.train.batch_size),
                        eval_batch_size=int(config.train.eval_batch_size), seed=int(config.seed))


def _round_config(config, pseudo_file: pathlib.Path | None):
  c = config_lib.from_json(config_lib.to_json(config))
  c.self_training.rounds = 0
  c.self_training.teacher = ""
  c.data.pseudo_labels = str(pseudo_file) if pseudo_file else ""
  return c


def run(config, workdir, *, overwrite: bool = False, devices=None) -> dict:
  """Runs (or resumes) the R + 1 runs of a self-training experiment; returns its results."""
  from jaxft.train.loop import prepare_workdir, train_and_evaluate  # one round = one run
  check(config)
  st = config.self_training
  teacher = pathlib.Path(st.teacher) if st.teacher else None
  data = _data(config)  # the labeled rows and the pool, as every round's pipeline builds them
  pool = data.unlabeled
  if teacher is not None:
    theirs = _data(config_lib.from_json((teacher / "config.json").read_text())).unlabeled
    if theirs is None or theirs.fingerprint() != pool.fingerprint():
      raise ValueError(f"self_training.teacher={str(teacher)!r} was trained with another labeled "
                       "subset / unlabeled pool than this experiment (data, seed, "
                       "labeled_per_class or max_train_examples differ): its labels would index "
                       "other rows. Use a teacher run of the same data config.")
  workdir = pathlib.Path(workdir)
  prepare_workdir(workdir, config, overwrite)
  train_split = str(config.data.train_split or "train")
  labeled_labels = np.asarray(data.examples[train_split].labels)
  n_labeled = len(labeled_labels)

  def train_fn(examples, rnd):
    run_dir = workdir / f"round-{rnd}"
    pseudo_file = None
    if rnd > 0:
      pseudo_file = workdir / "pseudo_labels" / f"round-{rnd}.json"
      rows, labels = examples["row"][n_labeled:], examples["label"][n_labeled:]
      if not (run_dir / "results.json").exists():
        pseudo_labels.save(pseudo_file, pool, rows, labels, round=rnd,
                           teacher=str(teacher) if teacher and rnd == 1 else f"round-{rnd - 1}",
                           threshold=float(st.threshold), max_per_class=int(st.max_per_class))
      log.info("self-training round %d: %d labeled + %d pseudo-labeled rows", rnd, n_labeled,
               len(rows))
    if not (run_dir / "results.json").exists():
      train_and_evaluate(_round_config(config, pseudo_file), run_dir, devices=devices)
    return run_dir

  def predict_fn(run_dir, unlabeled):
    return pool_probabilities(run_dir, pool)[0]

  labeled = {"row": -1 - np.arange(n_labeled), "label": labeled_labels}
  unlabeled = {"row": np.arange(len(pool)), "truth": np.asarray(data.unlabeled_labels)}
  del data
  final, history = self_train(train_fn, predict_fn, labeled, unlabeled, rounds=int(st.rounds),
                              threshold=float(st.threshold), max_per_class=int(st.max_per_class),
                              label_key="label", true_label_key="truth", teacher=teacher)
  rounds = [_round_summary(teacher or workdir / "round-0", None)]
  rounds += [_round_summary(workdir / f"round-{h.round}", h) for h in history]
  # "self_training_last": the last round's entry again, as a dict a table can address by path
  # (e.g. self_training_last/pseudo_label_accuracy, jaxft.harness.aggregate.lookup).
  results = {**json.loads((final / "results.json").read_text()), "self_training": rounds,
             "self_training_last": rounds[-1]}
  (workdir / "results.json").write_text(json.dumps(results, indent=2))
  return results


def _round_summary(run_dir: pathlib.Path, h) -> dict:
  res = json.loads((run_dir / "results.json").read_text())
  out = {"round": 0 if h is None else h.round, "eval": res["eval"], "best": res["best"],
         "train_examples": res["data"].get("train/n_examples")}
  if h is not None:
    out.update(pseudo_labeled=int(len(h.selected)),
               pseudo_label_accuracy=h.pseudo_label_accuracy,
               mean_confidence=float(np.mean(h.confidence)) if len(h.confidence) else None)
  return out
