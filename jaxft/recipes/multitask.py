"""Multitask fine-tuning: one shared encoder, a head per task, one task's batch per step.

    jaxft train --config experiments/multitask_glue.py:sst2,mrpc --workdir workdirs/mt

With multitask.tasks = "t_1,...,t_K" a run trains through the one step builder and the one loop
(jaxft.train.build, jaxft.train.loop), so it has their NaN guard, checkpoints and exact resume:

  params    {"backbone": encoder, "head": {task: that task's head}}, so the PEFT rules and the
            optimizer's head groups (`^head/`) see every head as a head. `MultiHeadModel.apply`
            reads the task from the batch's marker key "task/<name>" and runs that task's model on
            the {"backbone", "head"} view (heads of different sizes are different Flax modules).
            The marker is part of the batch's pytree structure, so the jitted step is traced once
            per task and bucket shape, the way it is traced once per bucket.
  batches   step s trains task[s] on its index[s]-th batch (the k-th time a task is drawn it gets
            its k-th batch, walking its own epochs in order). Task i is drawn i.i.d. with
              p_i = n_i^(1/T) / sum_j n_j^(1/T)   (n_i training examples; T = 1 proportional,
            T -> inf uniform: the temperature sampling of Arivazhagan et al. 2019 / Raffel et al.
            2020) from a generator seeded by the run's seed, so (task, index) at step s is a pure
            function of (seed, s) and resume needs no state beyond the step.
  step      "sup" is the task's supervised term (jaxft.objectives.supervised.task_term of its kind),
            metrics loss, loss/sup and sup/<task>/<metric>. Heads of tasks not in the batch keep
            their params and optimizer-state leaves bitwise (PyTorch semantics for parameters
            without gradients; weight decay and Adam momentum would otherwise move them). The
            optimizer's step count (bias correction, schedule) is one count for the run, as in one
            optax optimizer, where PyTorch's Adam counts steps per parameter.
  eval      every task with its own head: <task>/<metric>, and "average", the mean of the tasks'
            main metrics (the GLUE score's convention), as the run's main metric.

jaxft.recipes.continual reuses all of this with a stage-by-stage plan.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import types
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from jax.tree_util import DictKey

from jaxft.core.part import Part
from jaxft.objectives.base import Weighted, global_norm

log = logging.getLogger("jaxft")

MARK = "task/"  # batch key prefix naming the batch's task


# ------------------------------------------------------------------------------ sampling (pure)

def sampling_probs(sizes: Sequence[int], temperature: float = 1.0) -> np.ndarray:
  """p_i = n_i^(1/T) / sum_j n_j^(1/T), float64 [K]."""
  n = np.asarray(sizes, np.float64)
  if n.ndim != 1 or n.size == 0 or np.any(n <= 0):
    raise ValueError(f"task sizes must be positive counts, got {list(sizes)}")
  if not temperature > 0:
    raise ValueError(f"sampling temperature must be > 0, got {temperature}")
  z = np.log(n) / temperature
  w = np.exp(z - z.max())  # n^(1/T) up to a constant, without overflow for small T
  return w / w.sum()


def task_schedule(probs: Sequence[float], steps: int, seed: int = 0) -> np.ndarray:
  """int32 [steps]: the task index trained at each step, drawn i.i.d. from `probs`."""
  rng = np.random.default_rng(seed)
  return rng.choice(len(probs), size=steps, p=np.asarray(probs, np.float64)).astype(np.int32)


def positions(task: np.ndarray) -> np.ndarray:
  """int32 [T]: for each step, how many earlier steps trained the same task (its batch index)."""
  task = np.asarray(task)
  index = np.zeros(len(task), np.int32)
  for t in np.unique(task):
    at = task == t
    index[at] = np.arange(int(at.sum()))
  return index


# ------------------------------------------------------------------------- batches and model

def mark(batch: dict, task: str) -> dict:
  """The batch with its task's marker: "task/<name>" -> ones [B] (B this process's rows), shaped
  like example_mask so it shards and splits with it: [E] slots for a packed batch."""
  return {**batch, MARK + task: np.ones(len(batch["example_mask"]), np.float32)}


def task_of(batch: Mapping) -> str:
  """The task a batch's marker names (static: read from its keys, also under jit)."""
  found = [k[len(MARK):] for k in batch if k.startswith(MARK)]
  if len(found) != 1:
    raise KeyError(f"a multi-head batch needs exactly one {MARK}<name> marker key; it has keys "
                   f"{sorted(batch)}")
  return found[0]


def head_view(params, task: str) -> dict:
  """{"backbone", "head": {task: ...}} params -> the {"backbone", "head"} tree of one task."""
  return {"backbone": params["backbone"], "head": params["head"][task]}


@dataclasses.dataclass(eq=False)
class MultiHeadModel:
  """One encoder, a head per task, shaped like a jaxft.models.Model for the step builder.

  models: task -> its Model (module, config; its own params dropped). params: {"backbone": the
  shared encoder, "head": {task: head params}}. config: the encoder's transformers config.
  """

  models: dict
  params: Any
  config: Any

  @classmethod
  def combine(cls, models: Mapping[str, Any]) -> "MultiHeadModel":
    """Per-task Models of one checkpoint -> the encoder of the first and every task's head."""
    first = next(iter(models.values()))
    params = {"backbone": first.params["backbone"],
              "head": {t: m.params["head"] for t, m in models.items()}}
    return cls({t: dataclasses.replace(m, params=None) for t, m in models.items()}, params,
               first.config)

  @property
  def tasks(self) -> list[str]:
    return list(self.models)

  def apply(self, params, batch, **kwargs):
    """The apply_fn of jaxft.models.Model, for the task the batch's marker names."""
    task = task_of(batch)
    return self.models[task].apply(head_view(params, task), batch, **kwargs)


class TaskBatcher:
  """Train batches of several tasks, one task per step, with the batcher interface of the loop.

  The batch at step s is task[s]'s TrainBatcher batch index[s], marked with its task. (task,
  index) [T] are a plan fixed by the config and the seed, so batch_at is a pure function of the
  step; state_dict() / from_state_dict() carry only a fingerprint of the plan and the data.
  """

  def __init__(self, names: Sequence[str], batchers: Sequence, task, index, *,
               steps_per_epoch: int, what: str):
    self.names, self.batchers = list(names), list(batchers)
    self.task, self.index = np.asarray(task, np.int32), np.asarray(index, np.int32)
    self.steps_per_epoch = int(steps_per_epoch)
    self.num_examples = sum(b.num_examples for b in self.batchers)
    self.seed, self.step = self.batchers[0].seed, 0
    h = hashlib.sha256(json.dumps([what, self.names, [b.fingerprint for b in self.batchers]])
                       .encode())
    h.update(self.task.tobytes())
    h.update(self.index.tobytes())
    self.fingerprint = h.hexdigest()

  @property
  def shapes(self):
    return sorted({s for b in self.batchers for s in b.shapes})

  def counts(self) -> dict[str, int]:
    """Steps each task trains over the plan."""
    n = np.bincount(self.task, minlength=len(self.names))
    return {t: int(c) for t, c in zip(self.names, n)}

  def batch_at(self, step: int) -> dict:
    if not 0 <= step < len(self.task):
      raise IndexError(f"step {step} is outside the {len(self.task)} planned steps of this run")
    t = int(self.task[step])
    return mark(self.batchers[t].batch_at(int(self.index[step])), self.names[t])

  def state_dict(self) -> dict:
    return {"step": self.step, "seed": self.seed, "fingerprint": self.fingerprint}

  def from_state_dict(self, state: dict) -> "TaskBatcher":
    """Refuses a checkpoint made with another plan or other data; batch_at needs no position."""
    if state.get("fingerprint", "") != self.fingerprint:
      raise ValueError("the checkpoint's task plan was made with other tasks, data or sampling "
                       "settings: the batch order would not match. Fix: resume with the same "
                       "config, or start a new workdir.")
    return self


@dataclasses.dataclass
class TasksData:
  """What the loop reads of Setup.data: the run's info (name "t1+t2", main metric "average"),
  the TaskBatcher and stats ("<task>/<split>/<name>"); bundles: task -> its DataBundle."""

  info: Any
  train: TaskBatcher
  stats: dict
  bundles: dict


# ---------------------------------------------------------------------------------- the step

def keep_other_heads(new, old, task: str):
  """`new` TrainState with the trainable leaves and optimizer-state leaves of every head but
  `task`'s taken from `old` (leaves are found by their flat param key, "head/<t>/...")."""
  def other(key) -> bool:
    return (isinstance(key, str) and key.startswith("head/")
            and not key.startswith(f"head/{task}/"))

  trainable = {k: old.trainable[k] if other(k) else v for k, v in new.trainable.items()}
  opt_state = jax.tree_util.tree_map_with_path(
      lambda path, n, o: o if any(isinstance(p, DictKey) and other(p.key) for p in path) else n,
      new.opt_state, old.opt_state)
  return new.replace(trainable=trainable, opt_state=opt_state)


def _per_task_factory(inner, names, lr_period, apply_fn, terms, tx, *, update_extras=None,
                      lr_schedule=None, **options):
  """The step factory `heads_part` installs: one inner step per task (traced only for the tasks
  that come), dispatching on the batch's marker, then keep_other_heads. update_extras (EMA, SWA)
  see the state with the other heads kept."""
  if lr_period and lr_schedule is not None:  # the schedule restarts every stage (continual)
    schedule = lr_schedule
    lr_schedule = lambda s: schedule(s % lr_period)

  def keeping(task):
    if update_extras is None:
      return None
    return lambda old, new, metrics: update_extras(old, keep_other_heads(new, old, task), metrics)

  steps = {t: inner(apply_fn, terms, tx, update_extras=keeping(t), lr_schedule=lr_schedule,
                    **options) for t in names}

  def step(state, batch, rng):
    task = task_of(batch)
    new, metrics = steps[task](state, batch, rng)
    new = keep_other_heads(new, state, task)
    metrics = dict(metrics)
    if "param_norm" in metrics:
      metrics["param_norm"] = global_norm(new.trainable)
    if "update_norm" in metrics:  # what was applied, after keeping the other heads
      metrics["update_norm"] = global_norm(
          jax.tree_util.tree_map(lambda a, b: a - b, new.trainable, state.trainable))
    return new, metrics

  return step


def per_task_term(terms: Mapping[str, Callable]):
  """One loss term dispatching on the batch's task: terms[task](...), its metrics under
  "<task>/..." plus "<task>/loss"."""

  def term(apply_fn, params, batch, rng, ctx):
    task = task_of(batch)
    loss, metrics = terms[task](apply_fn, params, batch, rng, ctx)
    return loss, {f"{task}/loss": loss, **{f"{task}/{k}": v for k, v in metrics.items()}}

  return term


def heads_part(kinds: Mapping[str, str], *, label_smoothing: float = 0.0,
               extra_terms: Mapping[str, Weighted] | None = None, lr_period: int = 0,
               init_extras=None, name: str = "multitask") -> Part:
  """The Part a multi-head run adds: "sup" becomes each task's supervised term, the step keeps
  other tasks' heads (module docstring). kinds: task -> kind, in task order. lr_period > 0: the
  logged lr follows a schedule that restarts every lr_period steps (the optimizer restarts too)."""
  from jaxft.objectives.supervised import task_term
  sup = per_task_term({t: task_term(k, label_smoothing) for t, k in kinds.items()})
  return Part(name=name, terms={"sup": Weighted(sup), **(extra_terms or {})}, replaces=("sup",),
              init_extras=init_extras,
              wrap_step=lambda inner: functools.partial(_per_task_factory, inner, tuple(kinds),
                                                        int(lr_period)))


# ------------------------------------------------------------------------------------ eval

class TasksEvaluator:
  """Scores every task (or those `seen(step)` returns) with its own head, through
  jaxft.train.evaluate.Evaluator on each task's eval split: {"<task>/<metric>": value, ...,
  "average": mean of the tasks' main metrics}."""

  def __init__(self, setup, bundles: Mapping[str, Any],
               seen: Callable[[int], Sequence[str]] | None = None):
    from jaxft.train.evaluate import Evaluator
    self.names = list(bundles)
    self.main = {t: b.info.main_metric for t, b in bundles.items()}
    self.seen = seen or (lambda step: self.names)
    self._evaluators = {}
    for t, b in bundles.items():
      marked = {s: functools.partial(_marked, make, t) for s, make in b.eval.items()}
      view = types.SimpleNamespace(config=setup.config, data=dataclasses.replace(b, eval=marked),
                                   apply_fn=setup.apply_fn, model=setup.model,
                                   eval_params=setup.eval_params, mesh=setup.mesh)
      self._evaluators[t] = Evaluator(view)

  def evaluate(self, state) -> dict:
    out = {}
    tasks = list(self.seen(int(jax.device_get(state.step))))
    for t in tasks:
      out.update({f"{t}/{k}": v for k, v in self._evaluators[t].evaluate(state).items()})
    out["average"] = float(np.mean([out[f"{t}/{self.main[t]}"] for t in tasks]))
    return out


def _marked(make_batches, task):
  for batch in make_batches():
    yield mark(batch, task)


# ----------------------------------------------------------------------------- config, setup

def task_names(spec: str, where: str) -> list[str]:
  """'sst2, mrpc' -> ['sst2', 'mrpc']: catalog tasks (an unknown one lists the known), distinct."""
  from jaxft.data import tasks
  names = [t.strip() for t in str(spec).split(",") if t.strip()]
  if not names:
    raise ValueError(f"{where}={spec!r} names no task; e.g. {where}=sst2,mrpc")
  for t in names:
    try:
      tasks.get(t)
    except KeyError as e:
      raise KeyError(f"{where}: {e.args[0]}") from None
  if len(set(names)) != len(names):
    raise ValueError(f"{where}={spec!r} names a task twice")
  return names


def check_common(config, names: Sequence[str], recipe: str) -> None:
  """What a multi-head run (multitask or continual) cannot combine with, refused up front."""
  from jaxft.data import tasks
  refuse = [
      (config.multitask.tasks and config.continual.tasks,
       "multitask.tasks and continual.tasks are both set; a run is either a mixture or a "
       "sequence of tasks: clear one of them"),
      (config.self_training.rounds > 0, "self_training.rounds > 0 is a recipe of its own"),
      (config.objective.name != "supervised",
       f"objective.name={config.objective.name!r}: each task trains on its supervised loss "
       "(objective.name=supervised; its label_smoothing applies)"),
      (config.distill.teacher, "distill.teacher: a teacher has one head"),
      (config.prune.method, "prune.method: pruning runs its own step"),
      (config.quant.method == "ptq_int8", "quant.method=ptq_int8 scores one task's head"),
      (config.model.head, f"model.head={config.model.head!r}: each head follows its task's kind"),
      (config.data.labeled_per_class or config.data.unlabeled_ratio or config.data.pseudo_labels,
       "data.labeled_per_class / unlabeled_ratio / pseudo_labels: semi-supervised data"),
  ]
  for bad, why in refuse:
    if bad:
      raise ValueError(f"{recipe}.tasks is set: {why}")
  metric = config.train.early_stopping_metric
  allowed = ["average"] + [f"{t}/{m}" for t in names for m in tasks.get(t).metric_names]
  if metric and metric not in allowed:
    raise ValueError(f"train.early_stopping_metric={metric!r} is not a metric of this "
                     f"{recipe} run; use one of {', '.join(allowed)}")


def check(config) -> list[str]:
  """Refuses a multitask config that cannot run, before any data or model loads; -> the tasks."""
  names = task_names(config.multitask.tasks, "multitask.tasks")
  check_common(config, names, "multitask")
  if not float(config.multitask.temperature) > 0:
    raise ValueError(f"multitask.temperature must be > 0, got {config.multitask.temperature}")
  return names


def task_data_config(config, task: str):
  """config.data with name = task (every other data option shared)."""
  data = config.data.copy_and_resolve_references()
  data.name = task
  return data


@dataclasses.dataclass
class Loaded:
  mesh: Any
  bundles: dict  # task -> DataBundle
  model: MultiHeadModel
  peft_spec: Any
  quant_spec: Any


def load(config, names: Sequence[str], devices=None) -> Loaded:
  """Mesh, tokenizer, every task's data (all validated before any model), then one model per
  task from the checkpoint, combined: build_setup's order, for several tasks."""
  from jaxft import peft
  from jaxft.data import pipeline
  from jaxft.train import compress
  from jaxft.train import mesh as mesh_lib
  from jaxft.train.setup import check_and_mesh, check_max_length, load_tokenizer, model_kwargs
  mesh, qspec = check_and_mesh(config, devices)
  tokenizer = load_tokenizer(config.model.name)
  bundles = {}
  for t in names:
    bundles[t] = pipeline.build(task_data_config(config, t), tokenizer,
                                batch_size=config.train.batch_size,
                                eval_batch_size=config.train.eval_batch_size, seed=config.seed,
                                num_shards=mesh_lib.num_batch_shards(mesh))
    for note in bundles[t].notes:
      log.info("data %s: %s", t, note)
  spec = peft.spec_from_config(config.peft)
  models = {t: compress.load_model(config, None, **model_kwargs(config, b.info, spec, tokenizer))
            for t, b in bundles.items()}
  model = MultiHeadModel.combine(models)
  check_max_length(config.data.max_length, model.config)
  return Loaded(mesh, bundles, model, spec, qspec)


def tasks_info(bundles: Mapping[str, Any]):
  """The run's TaskInfo: name "t1+t2", main metric "average"; kind and labels of the first task
  (read only by the builder's objective part, whose "sup" the per-task term replaces)."""
  from jaxft.data.tasks import TaskInfo
  first = next(iter(bundles.values())).info
  metrics = ("average",) + tuple(f"{t}/{m}" for t, b in bundles.items()
                                 for m in b.info.metric_names)
  return TaskInfo(name="+".join(bundles), kind=first.kind, label_names=first.label_names,
                  num_labels=first.num_labels, metric_names=metrics, main_metric="average")


def tasks_data(bundles: Mapping[str, Any], train: TaskBatcher) -> TasksData:
  stats = {f"{t}/{k}": v for t, b in bundles.items() for k, v in b.stats.items()}
  return TasksData(tasks_info(bundles), train, stats, dict(bundles))


def assemble(config, loaded: Loaded, data: TasksData, part: Part, *, total_steps: int,
             schedule_steps: int, setup_cls=None, **fields):
  """build(...) with `part`, then shard and jit as build_setup does -> a Setup (or setup_cls)."""
  from jaxft.train import build as build_lib
  from jaxft.train import mesh as mesh_lib
  from jaxft.train.setup import Setup
  built = build_lib.build(config, loaded.model, data.info, total_steps=schedule_steps,
                          extra_parts=[part])
  log.info("step: %s", " + ".join(built.part_names))
  state, shardings = mesh_lib.shard_state(built.state, loaded.mesh)
  trace_count = [0]

  def counted_step(state, batch, rng):
    trace_count[0] += 1  # runs only while tracing: once per task and bucket shape
    return built.step(state, batch, rng)

  step_fn = mesh_lib.jit_step(counted_step, loaded.mesh, shardings)
  return (setup_cls or Setup)(
      config=config, mesh=loaded.mesh, data=data, model=loaded.model, peft_spec=loaded.peft_spec,
      built=built, state=state, state_shardings=shardings, step_fn=step_fn,
      total_steps=total_steps, trace_count=trace_count, quant_spec=loaded.quant_spec, **fields)


def setup(config, devices=None):
  """The Setup of a multitask run (loop.train_and_evaluate's setup_fn)."""
  from jaxft.train.setup import total_steps_of
  names = check(config)
  loaded = load(config, names, devices)
  batchers = [loaded.bundles[t].train for t in names]
  steps_per_epoch = sum(b.steps_per_epoch for b in batchers)
  total = total_steps_of(config.train, steps_per_epoch)
  probs = sampling_probs([b.num_examples for b in batchers], float(config.multitask.temperature))
  task = task_schedule(probs, total, int(config.seed))
  train = TaskBatcher(names, batchers, task, positions(task), steps_per_epoch=steps_per_epoch,
                      what=f"multitask T={float(config.multitask.temperature)!r}")
  counts = train.counts()
  log.info("multitask: %s", ", ".join(f"{t} p={p:.3f} ({counts[t]} steps)"
                                       for t, p in zip(names, probs)))
  part = heads_part({t: loaded.bundles[t].info.kind for t in names},
                    label_smoothing=float(config.objective.supervised.label_smoothing))
  summary = {"multitask": {"tasks": names, "probs": dict(zip(names, probs.tolist())),
                           "steps": counts}}
  s = assemble(config, loaded, tasks_data(loaded.bundles, train), part, total_steps=total,
               schedule_steps=total, summarize=lambda history: summary)
  s.evaluator = TasksEvaluator(s, loaded.bundles)
  return s


def run(config, workdir, *, overwrite: bool = False, devices=None) -> dict:
  """Runs (or resumes) a multitask experiment in `workdir`; returns its results dict."""
  from jaxft.train import loop
  check(config)  # before the workdir is touched
  return loop.train_and_evaluate(config, workdir, overwrite=overwrite, devices=devices,
                                 setup_fn=setup)
