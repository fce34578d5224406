"""train_and_evaluate: config -> data -> batches -> jitted step -> metrics -> writers / checkpoints.

One function a notebook can call; `jaxft train` is a thin wrapper. Its stages, in order:
  1. workdir check (a different experiment there is refused unless overwrite=True); nothing is
     written yet, so a start that fails validation leaves no trace that blocks the fixed command,
  2. tokenizer + data (all input validation happens here, before any model or compile); then
     the workdir records the run (config.json; another experiment moved aside on overwrite),
  3. model, PEFT partition, optimizer, objective -> TrainState on the mesh, step jitted once,
  4. resume from the newest good checkpoint (state + data iterator position),
  5. the loop: batch_at(step) -> step -> log / eval / checkpoint / early stopping,
  6. results.json.
"""

from __future__ import annotations

import json
import logging
import pathlib
import shutil
import signal
import time

import jax

from jaxft import config as config_lib
from jaxft.objectives.base import global_norm
from jaxft.train import checkpoint as ckpt_lib
from jaxft.train import mesh as mesh_lib
from jaxft.train import optim as optim_lib
from jaxft.train.evaluate import Evaluator
from jaxft.train.setup import Setup, build_setup, train_key
from jaxft.train.writers import MetricWriter, Progress

log = logging.getLogger("jaxft")

# Keys that may differ between a run and its resume without changing the experiment.
_RESUMABLE_KEYS = ("train.progress", "train.log_every", "experiment")


class Preempted(Exception):
  """Raised after a SIGTERM-triggered checkpoint, so callers can exit cleanly."""


def _flat_config(config) -> dict:
  out = {}

  def walk(d, prefix=""):
    for k, v in d.items():
      if isinstance(v, dict):
        walk(v, f"{prefix}{k}.")
      else:
        out[f"{prefix}{k}"] = v

  walk(config.to_dict() if hasattr(config, "to_dict") else config)
  return out


def config_change(workdir: pathlib.Path, config) -> str:
  """How `config` differs from the config.json saved in `workdir` ("key: old -> new, ..."), or ""
  when it is the same experiment or nothing is saved there.

  A key the saved config lacks is an option added to jaxft since that run: its default keeps the
  old behaviour, so it is not a difference (else every new objective's options would orphan every
  older workdir). Keys that a resume may change (_RESUMABLE_KEYS) are no difference either."""
  saved = workdir / "config.json"
  if not saved.exists():
    return ""
  old = _flat_config(json.loads(saved.read_text()))
  new = _flat_config(config)
  diff = sorted(k for k in old if old[k] != new.get(k) and k not in _RESUMABLE_KEYS)
  shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:6])
  return shown + (" ..." if len(diff) > 6 else "")


def check_workdir(workdir: pathlib.Path, config, overwrite: bool) -> str:
  """What recording `config` in `workdir` will do, without touching it: "resume" (it holds this
  experiment), "new" (absent or empty) or "replace" (overwrite=True over another experiment or
  a non-jaxft directory). A different experiment without overwrite raises FileExistsError.

  A config.json alone (no metrics, no checkpoints) is a start that never ran, e.g. one written
  by jaxft before inputs were validated first: it is moved aside ("replace") without --overwrite.
  """
  others = [p for p in workdir.iterdir() if p.name != "config.json"] if workdir.is_dir() else []
  if (workdir / "config.json").exists():
    change = config_change(workdir, config)
    if not change:
      return "resume"
    if not others:
      log.warning("workdir %s holds only the config.json of a start that never ran; it moves "
                  "aside once this run's inputs validate", workdir)
      return "replace"
    if not overwrite:
      raise FileExistsError(
          f"workdir {workdir} holds a different experiment ({change})."
          " Use another --workdir, or pass --overwrite to move the old one aside and start fresh.")
    return "replace"
  if not others:
    return "new"
  if not overwrite:
    raise FileExistsError(f"workdir {workdir} exists and is not a jaxft workdir (no config.json); "
                          "use an empty or new directory, or --overwrite to move it aside")
  return "replace"


def record_workdir(workdir: pathlib.Path, config, plan: str) -> None:
  """Carries out check_workdir's plan once the run's inputs validated: moves a replaced workdir
  aside to <workdir>.old-<timestamp> (never deleted) and writes config.json."""
  if plan == "resume":
    return
  if plan == "replace":
    _move_aside(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(config_lib.to_json(config))


def prepare_workdir(workdir: pathlib.Path, config, overwrite: bool) -> bool:
  """check_workdir + record_workdir at once (for callers that validated their inputs already).
  Returns True if the workdir holds this experiment (it can resume).

  A workdir with another experiment's config is refused; with overwrite=True it is moved aside to
  <workdir>.old-<timestamp> (never deleted), and a fresh one is made.
  """
  plan = check_workdir(workdir, config, overwrite)
  record_workdir(workdir, config, plan)
  return plan == "resume"


def _prepare_workdir_once(workdir: pathlib.Path, config, overwrite: bool, plan: str | None = None):
  """On process 0 only (two processes moving one workdir aside, or one reading the config.json
  another is writing, would collide); the others learn its answer.

  plan=None: check_workdir -> its plan ("resume" | "new" | "replace"), nothing written.
  plan given: record_workdir(plan), then every process waits for it -> None.
  """
  if jax.process_count() == 1:
    if plan is None:
      return check_workdir(workdir, config, overwrite)
    return record_workdir(workdir, config, plan)
  import numpy as np
  from jax.experimental import multihost_utils
  if plan is not None:
    if jax.process_index() == 0:
      record_workdir(workdir, config, plan)
    multihost_utils.sync_global_devices(f"jaxft record_workdir {workdir}")
    return None
  plans = ("resume", "new", "replace")
  flag, error = 0, None
  if jax.process_index() == 0:
    try:
      flag = plans.index(check_workdir(workdir, config, overwrite))
    except FileExistsError as e:
      flag, error = -1, e
  flag = int(multihost_utils.broadcast_one_to_all(np.int32(flag)))
  if error is not None:
    raise error
  if flag < 0:
    raise FileExistsError(f"workdir {workdir} was refused by process 0 (see its log)")
  return plans[flag]


def _move_aside(workdir: pathlib.Path) -> pathlib.Path:
  """Renames workdir to a free <workdir>.old-<timestamp>[-n]. A fixed name would collide when two
  overwrites fall in the same second, and shutil.move would then nest the workdir inside the
  earlier backup."""
  stem = f"{workdir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}"
  backup, n = workdir.with_name(stem), 1
  while backup.exists():
    backup, n = workdir.with_name(f"{stem}-{n}"), n + 1
  shutil.move(str(workdir), str(backup))
  log.warning("moved the previous workdir to %s", backup)
  return backup


class _SigtermFlag:
  """Turns SIGTERM (the preemption notice) into a flag the loop checks between steps."""

  def __init__(self):
    self.raised = False
    self._old = None

  def __enter__(self):
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: no handler, no flag
      self._old = None
    return self

  def _handle(self, signum, frame):
    self.raised = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def _is_better(value: float, best: float | None, mode: str) -> bool:
  if best is None:
    return True
  return value > best if mode == "max" else value < best


def train_and_evaluate(config, workdir: str | pathlib.Path, *, overwrite: bool = False,
                       devices=None, setup_fn=None) -> dict:
  """Runs (or resumes) the experiment in `config`, writing everything into `workdir`.

  Returns the results dict also written to <workdir>/results.json. Experiments made of several
  runs (self-training) go through jaxft.recipes.run, which calls this for each run.
  setup_fn(config, devices=...) -> Setup replaces build_setup (a recipe's data and model around
  the same step builder).
  """
  workdir = pathlib.Path(workdir)
  plan = _prepare_workdir_once(workdir, config, overwrite)  # refuses, writes nothing
  t_start = time.time()
  s: Setup = (setup_fn or build_setup)(config, devices=devices)  # validates every input
  _prepare_workdir_once(workdir, config, overwrite, plan)  # only now is the run recorded
  can_resume = plan == "resume"
  writer = MetricWriter(workdir)
  writer.write("info", 0, {"trainable_params": s.counts["trainable_params"],
                          "total_params": s.counts["total_params"],
                          "trainable_percent": s.counts["trainable_percent"],
                          "total_steps": s.total_steps, **{f"data/{k}": v for k, v in
                                                           s.data.stats.items()
                                                           if isinstance(v, (int, float))}})
  log.info("%s: %d steps, %.2f%% of %d parameters train", config.experiment or "run",
           s.total_steps, s.counts["trainable_percent"], s.counts["total_params"])

  ckpts = ckpt_lib.Checkpoints(workdir, keep=config.train.keep_checkpoints)
  state = s.state
  start_step = 0
  best_value, best_metrics, best_step = None, None, None
  history_eval = []
  if can_resume:
    restored = ckpts.restore_latest(ckpt_lib.abstract(s.checkpointable(state)))
    if restored is not None:
      saved_state, meta = restored
      state = s.from_checkpointable(saved_state)
      s.data.train.from_state_dict(meta["data"])  # refuses a checkpoint made on other data
      start_step = int(meta["step"])
      best_value, best_metrics, best_step = meta.get("best_value"), meta.get("best"), meta.get(
          "best_step")
      history_eval = meta.get("evals", [])
      ckpts.recover_best(best_step)
      log.info("resumed from step %d", start_step)

  evaluator = s.evaluator or Evaluator(s)
  main_metric = config.train.early_stopping_metric or s.data.info.main_metric
  mode = "min" if main_metric in ("loss",) else "max"
  eval_every = config.train.eval_every or s.data.train.steps_per_epoch
  ckpt_every = config.train.checkpoint_every or eval_every
  log_every = max(int(config.train.log_every), 1)
  patience = int(config.train.early_stopping_patience)
  rng = train_key(config)
  param_norm = jax.jit(global_norm)
  progress = Progress(s.total_steps, start_step, enabled=config.train.progress)
  last_skipped, last_log_step = 0.0, start_step
  last_train = None
  evals_without_gain = 0
  if history_eval and best_step is not None:
    evals_without_gain = sum(1 for e in history_eval if e["step"] > best_step)
  t_loop = time.time()
  steps_run = 0
  last_eval_step = None
  eval_metrics = history_eval[-1]["metrics"] if history_eval else None

  def meta_for(step):
    return {"step": step, "data": {**s.data.train.state_dict(), "step": step},
            "best_value": best_value,
            "best": best_metrics, "best_step": best_step, "evals": history_eval,
            "base_model": config.model.name}

  with _SigtermFlag() as sigterm:
    step = start_step
    while step < s.total_steps:
      batch = mesh_lib.put_batch(s.data.train.batch_at(step), s.mesh)
      state, metrics = s.step_fn(state, batch, rng)
      step += 1
      steps_run += 1

      if step % log_every == 0 or step == s.total_steps:
        host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if "param_norm" not in host:  # the step leaves it to log steps (train.log_norms)
          host["param_norm"] = float(param_norm(state.trainable))
        skipped = host["skipped_steps"]
        if config.train.nan_policy == "error" and skipped > last_skipped:
          raise FloatingPointError(
              f"non-finite loss or gradients between steps {last_log_step + 1} and {step} "
              f"(nan_policy=error); those updates were not applied. Lower train.learning_rate, "
              "check the data, or use nan_policy=skip")
        last_skipped, last_log_step = skipped, step
        host["examples_per_s"] = steps_run * config.train.batch_size / (time.time() - t_loop)
        writer.write("train", step, host)
        last_train = host
        progress.update(step, {"loss": host["loss"], "lr": host["lr"]}, n=0)
      progress.update(step, None)

      is_eval = step % eval_every == 0 or step == s.total_steps
      if is_eval:
        eval_metrics = evaluator.evaluate(state)
        last_eval_step = step
        history_eval.append({"step": step, "metrics": eval_metrics})
        writer.write("eval", step, {f"eval/{k}": v for k, v in eval_metrics.items()})
        value = eval_metrics.get(main_metric)
        if value is None:
          raise KeyError(f"early-stopping metric {main_metric!r} is not among the eval metrics "
                         f"{sorted(eval_metrics)}; set train.early_stopping_metric to one of them")
        state = s.after_eval(state, float(value))
        eligible = step >= s.best_from_step  # a pruning run: only once at its final sparsity
        improved = eligible and _is_better(value, best_value, mode)
        if improved:
          best_value, best_metrics, best_step = value, eval_metrics, step
          evals_without_gain = 0
        elif eligible:
          evals_without_gain += 1
        log.info("step %d eval %s", step, json.dumps(eval_metrics))
        if step % ckpt_every == 0 or step == s.total_steps or improved:
          ckpts.save(step, s.checkpointable(state), meta_for(step), best=improved, force=True)
        if patience and evals_without_gain >= patience:
          log.info("early stopping at step %d: %s did not improve for %d evals", step,
                   main_metric, patience)
          break
      elif step % ckpt_every == 0:
        ckpts.save(step, s.checkpointable(state), meta_for(step))

      if sigterm.raised:
        ckpts.save(step, s.checkpointable(state), meta_for(step), force=True)
        ckpts.wait()
        ckpts.close()
        writer.write("info", step, {"preempted": 1})
        writer.close()
        progress.close()
        raise Preempted(f"SIGTERM: saved a checkpoint at step {step} in {workdir}; run the same "
                        "command again to resume at the next step")

  ckpts.wait()
  ckpts.close()
  progress.close()
  if last_eval_step is None and eval_metrics is None:
    eval_metrics = evaluator.evaluate(state)
  quant = None
  if config.quant.method == "ptq_int8":
    from jaxft.train.evaluate import int8_metrics
    quant = int8_metrics(s, state)
    log.info("int8 (post-training) eval %s, %.1fx smaller", json.dumps(quant["eval"]),
             quant["size"]["ratio"])
  wall = time.time() - t_start
  results = {
      "experiment": config.experiment,
      "task": s.data.info.name,
      "model": config.model.name,
      "peft": config.peft.method,
      "objective": config.objective.name,
      "seed": config.seed,
      "eval": eval_metrics,
      "best": best_metrics or eval_metrics,
      "best_step": best_step if best_step is not None else step,
      "main_metric": main_metric,
      "steps": step,
      **s.counts,
      "wall_time_s": wall,
      "train_examples_per_s": (steps_run * config.train.batch_size / (time.time() - t_loop)
                               if steps_run else None),
      "data": {k: v for k, v in s.data.stats.items() if isinstance(v, (int, float, str))},
      "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
      "eval_with": config.train.eval_with,
      "learning_rates": optim_lib.learning_rates(
          config.train, config.peft, s.state.trainable,
          score_learning_rate=config.prune.score_learning_rate),
      "compilations": s.trace_count[0],  # traces of the train step: at most one per bucket shape
      "last_train": last_train,
  }
  if quant is not None:
    results["int8"] = quant
  if s.summarize is not None:
    results.update(s.summarize(history_eval))
  if jax.process_index() == 0:  # one writer per job, as for metrics.jsonl and checkpoints
    (workdir / "results.json").write_text(json.dumps(results, indent=2))
  writer.write("info", step, {"done": 1, "wall_time_s": wall})
  writer.close()
  return results
