"""Multitask fine-tuning: one shared encoder, a head per task, tasks sampled step by step.

Parameters: {"backbone": shared encoder, "heads": {task: head params}}; task t sees the usual
{"backbone", "head"} tree (`task_view`), so any jaxft model's apply_fn and the supervised loss terms
work unchanged. Heads of different sizes need their own apply_fn (a Flax head module checks its
parameter shapes): pass `apply_fns` as {task: model_t.apply} (models built with the same backbone
config and each task's num_labels), or one callable when every head has the same shape. Each step trains on one task's batch: task i is drawn with probability
  p_i = n_i^(1/T) / sum_j n_j^(1/T)   (n_i training examples; T = 1 proportional, T -> inf uniform;
  the temperature sampling of Arivazhagan et al. 2019 / Raffel et al. 2020),
from a generator seeded by (seed), so the task sequence of a run is fixed in advance.

The step updates the backbone and that task's head only; each part has its own optimizer state
(the backbone's and every head's), so heads of tasks not in the batch keep their params and Adam
moments untouched (as PyTorch does for parameters without gradients). Each optimizer state counts
its own updates, so a head's learning-rate schedule advances when its task is sampled.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxft.objectives.base import StepContext, Weighted, global_norm
from jaxft.core.state import Flat, flatten, unflatten


@dataclasses.dataclass
class TaskData:
  """One task of a multitask or continual run.

  batch_at(i) -> the task's i-th training batch (numpy dict, the batch contract of jaxft.data);
  eval_batches() -> iterable of eval batches (rows with example_mask 0 are padding);
  metric_fn(preds, labels) -> dict (default: accuracy / pearson / token accuracy by kind);
  main_metric: the metric reported per stage (default the first key metric_fn returns).
  """

  name: str
  kind: str  # classification / regression / token_classification
  num_examples: int
  batch_at: Callable[[int], dict]
  eval_batches: Callable[[], Iterable[dict]]
  metric_fn: Callable[[np.ndarray, np.ndarray], dict] | None = None
  main_metric: str | None = None


def task_from_bundle(name: str, bundle, split: str | None = None) -> TaskData:
  """TaskData from a jaxft.data.pipeline DataBundle (train.batch_at, eval[split](), info)."""
  info = bundle.info
  split = split or next(iter(bundle.eval))
  n = getattr(bundle.train, "num_examples", None) or bundle.stats.get("train_examples")
  if not n:
    raise ValueError(f"task {name}: cannot tell its number of training examples from the bundle")

  def metric_fn(preds, labels):
    from jaxft.eval import metrics
    return metrics.compute(info, preds, labels)

  return TaskData(name=name, kind=info.kind, num_examples=int(n), batch_at=bundle.train.batch_at,
                  eval_batches=bundle.eval[split], metric_fn=metric_fn, main_metric=info.main_metric)


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


def task_view(backbone: Flat, head: Flat, frozen: Flat | None = None):
  """Flat backbone (+ frozen backbone leaves) and one head -> {"backbone": ..., "head": ...}."""
  flat = {f"backbone/{k}": v for k, v in {**(frozen or {}), **backbone}.items()}
  flat.update({f"head/{k}": v for k, v in head.items()})
  return unflatten(flat)


@flax.struct.dataclass
class MultiHeadState:
  """step i32[]; backbone: flat trainable encoder params; frozen: flat encoder params that do not
  train (PEFT); heads: {task: flat head params}; opt_backbone / opt_heads: optimizer states;
  extras: e.g. EWC anchors and Fisher diagonals."""

  step: jax.Array
  backbone: Flat
  frozen: Flat
  heads: dict
  opt_backbone: Any
  opt_heads: dict
  extras: dict = flax.struct.field(default_factory=dict)

  def params(self, task: str):
    return task_view(self.backbone, self.heads[task], self.frozen)


def init_state(params, tx: optax.GradientTransformation,
               is_trainable: Callable[[str], bool] | None = None, extras=None) -> MultiHeadState:
  """params: {"backbone": nested, "heads": {task: nested}}; is_trainable(path) on backbone paths
  (default all train)."""
  if set(params) != {"backbone", "heads"}:
    raise ValueError(f"multi-head params need exactly the keys backbone and heads, got {sorted(params)}"
                     "; build them with combine_heads(backbone, {task: head})")
  flat = flatten(params["backbone"])
  pred = is_trainable or (lambda k: True)
  backbone = {k: v for k, v in flat.items() if pred(k)}
  frozen = {k: v for k, v in flat.items() if not pred(k)}
  heads = {t: flatten(h) for t, h in params["heads"].items()}
  return MultiHeadState(step=jnp.zeros((), jnp.int32), backbone=backbone, frozen=frozen,
                        heads=heads, opt_backbone=tx.init(backbone),
                        opt_heads={t: tx.init(h) for t, h in heads.items()}, extras=dict(extras or {}))


def combine_heads(backbone, heads: Mapping[str, Any]) -> dict:
  """{"backbone": backbone, "heads": dict(heads)}: e.g. the backbone of one from_pretrained model
  and the "head" of one model per task (each built with that task's num_labels)."""
  return {"backbone": backbone, "heads": dict(heads)}


def apply_for(apply_fns, task: str):
  """apply_fns: one callable for every task, or {task: callable}."""
  if callable(apply_fns):
    return apply_fns
  if task not in apply_fns:
    raise KeyError(f"no apply_fn for task {task!r}; apply_fns has {sorted(apply_fns)}")
  return apply_fns[task]


def supervised_terms(kind: str) -> dict[str, Weighted]:
  from jaxft.objectives.supervised import task_term
  return {"sup": Weighted(task_term(kind))}


def make_task_step(apply_fn, task: str, terms: Mapping[str, Weighted],
                   tx: optax.GradientTransformation):
  """Pure step(state, batch, rng) -> (state, metrics) training backbone + heads[task] on `terms`
  (loss terms as in jaxft.objectives.base, evaluated on the task's {"backbone", "head"} view;
  ctx.extras is state.extras). Jit it; it is traced once per task."""

  def loss_fn(backbone, head, state, batch, rng):
    params = task_view(backbone, head, state.frozen)
    ctx = StepContext(step=state.step, extras=state.extras)
    total = jnp.zeros((), jnp.float32)
    metrics = {}
    for i, (name, wt) in enumerate(sorted(terms.items())):
      loss, m = wt.term(apply_fn, params, batch, jax.random.fold_in(rng, i), ctx)
      total = total + wt.weight_at(state.step) * loss
      metrics[f"loss/{name}"] = loss
      metrics.update({f"{name}/{k}": v for k, v in m.items()})
    metrics["loss"] = total
    return total, metrics

  grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)

  def step(state: MultiHeadState, batch, rng):
    rng = jax.random.fold_in(rng, state.step)
    (_, metrics), (g_b, g_h) = grad_fn(state.backbone, state.heads[task], state, batch, rng)
    u_b, opt_b = tx.update(g_b, state.opt_backbone, state.backbone)
    u_h, opt_h = tx.update(g_h, state.opt_heads[task], state.heads[task])
    new = state.replace(step=state.step + 1, backbone=optax.apply_updates(state.backbone, u_b),
                        heads={**state.heads, task: optax.apply_updates(state.heads[task], u_h)},
                        opt_backbone=opt_b, opt_heads={**state.opt_heads, task: opt_h})
    metrics["grad_norm"] = global_norm((g_b, g_h))
    return new, metrics

  return step


def default_metric(kind: str, preds: np.ndarray, labels: np.ndarray) -> dict:
  if kind == "classification":
    return {"accuracy": float(np.mean(preds == labels))}
  if kind == "regression":
    return {"pearson": float(np.corrcoef(preds, labels)[0, 1]) if len(labels) > 1 else 0.0}
  valid = labels != -100
  return {"token_accuracy": float(np.mean(preds[valid] == labels[valid]))}


def predict(apply_fn, params, batches: Iterable[dict], kind: str, forward=None):
  """-> (preds, labels) numpy over the real rows of `batches` (example_mask > 0)."""
  forward = forward or jax.jit(lambda p, b: apply_fn(p, b, deterministic=True).logits)
  preds, labels = [], []
  for batch in batches:
    keep = np.asarray(batch.get("example_mask", np.ones(len(batch["labels"])))) > 0
    logits = np.asarray(forward(params, {k: jnp.asarray(v) for k, v in batch.items()}))
    p = logits[..., 0] if kind == "regression" else logits.argmax(-1)
    preds.append(p[keep])
    labels.append(np.asarray(batch["labels"])[keep])
  return np.concatenate(preds), np.concatenate(labels)


def evaluate_task(apply_fns, state: MultiHeadState, task: TaskData, forward=None) -> dict:
  """Metrics of `task` with its own head: task.metric_fn or default_metric."""
  preds, labels = predict(apply_for(apply_fns, task.name), state.params(task.name), task.eval_batches(), task.kind, forward)
  if task.metric_fn is not None:
    return dict(task.metric_fn(preds, labels))
  return default_metric(task.kind, preds, labels)


def main_value(task: TaskData, metrics: dict) -> float:
  name = task.main_metric or next(iter(metrics))
  return float(metrics[name])


def train_multitask(apply_fns, params, tasks: Sequence[TaskData], tx: optax.GradientTransformation,
                    steps: int, *, temperature: float = 1.0, seed: int = 0, eval_every: int = 0,
                    is_trainable=None, log: Callable[[int, dict], None] | None = None):
  """Trains the shared encoder on the tasks by temperature sampling for `steps` steps.

  Returns (state, history) where history = {"probs": {task: p}, "counts": {task: steps trained},
  "evals": [{"step", task: metrics}], "final": {task: metrics}}. The k-th time task t is drawn,
  its batch is tasks[t].batch_at(k) (so each task walks through its own epochs in order).
  """
  names = [t.name for t in tasks]
  if len(set(names)) != len(names):
    raise ValueError(f"task names must be distinct, got {names}")
  missing = set(names) - set(params["heads"])
  if missing:
    raise KeyError(f"params['heads'] has no head for {sorted(missing)}; it has {sorted(params['heads'])}")
  probs = sampling_probs([t.num_examples for t in tasks], temperature)
  order = task_schedule(probs, steps, seed)
  state = init_state(params, tx, is_trainable)
  steps_fn = {t.name: jax.jit(make_task_step(apply_for(apply_fns, t.name), t.name,
                                             supervised_terms(t.kind), tx)) for t in tasks}
  forwards = {t.name: jax.jit(lambda p, b, f=apply_for(apply_fns, t.name):
                              f(p, b, deterministic=True).logits) for t in tasks}
  rng = jax.random.key(seed)
  seen = np.zeros(len(tasks), np.int64)
  history = {"probs": dict(zip(names, probs.tolist())), "evals": []}
  for s in range(steps):
    i = int(order[s])
    batch = {k: jnp.asarray(v) for k, v in tasks[i].batch_at(int(seen[i])).items()}
    seen[i] += 1
    state, metrics = steps_fn[names[i]](state, batch, rng)
    if log is not None:
      log(s + 1, {"task": names[i], **{k: float(v) for k, v in metrics.items()}})
    if eval_every and (s + 1) % eval_every == 0 and s + 1 < steps:
      history["evals"].append({"step": s + 1, **{
          t.name: evaluate_task(apply_fns, state, t, forwards[t.name]) for t in tasks}})
  history["counts"] = dict(zip(names, seen.tolist()))
  history["final"] = {t.name: evaluate_task(apply_fns, state, t, forwards[t.name]) for t in tasks}
  return state, history
