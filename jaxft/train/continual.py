"""Continual learning: tasks fine-tuned one after another on one encoder, a head per task.

Stage k trains the shared encoder and task k's head (jaxft.train.multitask machinery) for
`steps_per_task` steps, then every task seen so far is evaluated with its own head: R[k, j] is
task j's main metric after stage k (NaN for j > k). Against forgetting:
  replay: each step of stage k is, with probability `replay`, a step on a batch of an earlier task
    j < k (uniform over j; that task's head trains too), so a fraction `replay` of the examples
    seen in stage k come from earlier tasks; `memory_batches` limits which earlier batches can be
    replayed (the first M batches of each task: a memory of M * batch_size examples);
  EWC (Kirkpatrick et al. 2017): after stage j, the diagonal Fisher
    F^j_i = E_x E_{y} [(d log p(y|x; theta) / d theta_i)^2]   (y the true label: "empirical"
    Fisher; or y ~ p(y|x) when empirical=False) at theta*^j, over the shared encoder's parameters;
    later stages add the penalty  lambda/2 * sum_{j<k} sum_i F^j_i (theta_i - theta*^j_i)^2.
Metrics: average accuracy A = mean_j R[K-1, j]; forgetting of task j < K-1 (Chaudhry et al. 2018)
  f_j = max_{l in [j, K-2]} R[l, j] - R[K-1, j], average forgetting = mean_j f_j.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxft.objectives.base import StepContext, Weighted, example_weights
from jaxft.train import multitask as mt
from jaxft.core.state import Flat, flatten


def ewc_penalty(params: Flat, anchors: Sequence[Flat], fishers: Sequence[Flat], lam: float):
  """lambda/2 * sum_j sum_i F^j_i (theta_i - theta*^j_i)^2 over the keys of each Fisher dict.

  params, anchors[j], fishers[j]: flat dicts; f32[] result."""
  if len(anchors) != len(fishers):
    raise ValueError(f"{len(anchors)} anchors but {len(fishers)} Fisher diagonals")
  total = jnp.zeros((), jnp.float32)
  for anchor, fisher in zip(anchors, fishers):
    for k, f in fisher.items():
      if k not in params:
        raise KeyError(f"EWC: Fisher entry {k!r} has no parameter; parameters have e.g. "
                       f"{sorted(params)[:3]}")
      d = params[k].astype(jnp.float32) - anchor[k].astype(jnp.float32)
      total = total + jnp.sum(f.astype(jnp.float32) * d * d)
  return 0.5 * lam * total


def ewc_term(lam: float):
  """Loss term adding the EWC penalty of the encoder params ("backbone/..." in the task view)
  against ctx.extras["ewc/anchors"] / ["ewc/fishers"] (lists of flat backbone dicts)."""

  def term(apply_fn, params, batch, rng, ctx: StepContext):
    del apply_fn, batch, rng
    anchors = ctx.extras.get("ewc/anchors", [])
    fishers = ctx.extras.get("ewc/fishers", [])
    flat = flatten(params["backbone"])
    return ewc_penalty(flat, anchors, fishers, lam), {}

  return term


def log_likelihood(logits: jax.Array, labels: jax.Array, kind: str) -> jax.Array:
  """log p(y|x) per example [B]: classification log_softmax[y]; regression a unit-variance
  Gaussian -(y - f)^2 / 2 (up to a constant); token tasks the sum over labelled tokens."""
  logits = logits.astype(jnp.float32)
  if kind == "classification":
    return jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], -1)[:, 0]
  if kind == "regression":
    return -0.5 * jnp.square(labels.astype(jnp.float32) - logits[..., 0])
  valid = labels != -100
  lp = jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.where(valid, labels, 0)[..., None], -1)
  return jnp.sum(lp[..., 0] * valid, axis=-1)


def fisher_diagonal(apply_fn, backbone: Flat, head: Flat, frozen: Flat, batches: Iterable[dict],
                    kind: str, *, empirical: bool = True, rng=None, max_examples: int = 0) -> Flat:
  """Diagonal Fisher of the encoder params (flat dict like `backbone`): the mean over real examples
  (example_mask > 0) of the squared per-example gradient of log p(y|x) (module docstring).

  empirical=False draws y ~ softmax(logits) per example (classification only) from `rng`."""
  if not empirical and kind != "classification":
    raise ValueError("sampled-label Fisher (empirical=False) is implemented for classification")
  rng = jax.random.key(0) if rng is None else rng

  def one(bb, example, key):
    batch = {k: v[None] for k, v in example.items()}
    out = apply_fn(mt.task_view(bb, head, frozen), batch, deterministic=True)
    labels = batch["labels"]
    if not empirical:
      labels = jax.random.categorical(key, out.logits.astype(jnp.float32), axis=-1)
    return log_likelihood(out.logits, labels, kind)[0]

  per_example = jax.jit(jax.vmap(jax.grad(one), in_axes=(None, 0, 0)))
  total = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, jnp.float32), backbone)
  count = 0
  for bi, batch in enumerate(batches):
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    w = example_weights(batch)
    keys = jax.random.split(jax.random.fold_in(rng, bi), w.shape[0])
    grads = per_example(backbone, batch, keys)
    total = jax.tree_util.tree_map(
        lambda t, g: t + jnp.einsum("b,b...->...", w, jnp.square(g.astype(jnp.float32))),
        total, grads)
    count += int(jnp.sum(w))
    if max_examples and count >= max_examples:
      break
  if count == 0:
    raise ValueError("fisher_diagonal: no real examples in the batches")
  return jax.tree_util.tree_map(lambda t: t / count, total)


def forgetting(matrix) -> dict:
  """R [K, K] (R[k, j]: task j after stage k, NaN where j > k) -> average accuracy and forgetting.

  Returns {"average_accuracy", "average_forgetting", "forgetting": [f_j for j < K-1]}."""
  r = np.asarray(matrix, np.float64)
  if r.ndim != 2 or r.shape[0] != r.shape[1]:
    raise ValueError(f"forgetting needs a square stage x task matrix, got shape {r.shape}")
  k = r.shape[0]
  final = r[k - 1]
  f = [float(np.max(r[j:k - 1, j]) - final[j]) for j in range(k - 1)]
  return {"average_accuracy": float(np.mean(final)),
          "average_forgetting": float(np.mean(f)) if f else 0.0, "forgetting": f}


@dataclasses.dataclass
class ContinualResult:
  tasks: list[str]
  matrix: np.ndarray  # [K, K] main metric of task j after stage k (NaN for j > k)
  stage_metrics: list[dict]  # per stage: {task: metrics dict} for the tasks seen so far
  summary: dict  # forgetting(matrix)
  replayed: list[dict]  # per stage: {task: replay steps}
  state: mt.MultiHeadState


def train_continual(apply_fns, params, tasks: Sequence[mt.TaskData],
                    make_tx: Callable[[], optax.GradientTransformation], steps_per_task: int, *,
                    replay: float = 0.0, memory_batches: int = 0, ewc_lambda: float = 0.0,
                    fisher_examples: int = 256, empirical_fisher: bool = True, seed: int = 0,
                    is_trainable=None, log: Callable[[int, dict], None] | None = None
                    ) -> ContinualResult:
  """Fine-tunes `tasks` in order (module docstring). make_tx() gives a fresh optimizer per stage
  (the usual practice: a new task starts its own schedule). params: {"backbone", "heads": {task}}."""
  if not 0.0 <= replay < 1.0:
    raise ValueError(f"replay is a fraction of steps in [0, 1), got {replay}")
  if ewc_lambda > 0 and fisher_examples < 1:
    raise ValueError("EWC needs fisher_examples >= 1 (examples used for the Fisher diagonal)")
  names = [t.name for t in tasks]
  k_tasks = len(tasks)
  state = None
  matrix = np.full((k_tasks, k_tasks), np.nan)
  stage_metrics, replayed = [], []
  anchors, fishers = [], []
  forwards = {t.name: jax.jit(lambda p, b, f=mt.apply_for(apply_fns, t.name):
                              f(p, b, deterministic=True).logits) for t in tasks}
  rng = jax.random.key(seed)
  for k, task in enumerate(tasks):
    tx = make_tx()
    extras = {"ewc/anchors": anchors, "ewc/fishers": fishers} if ewc_lambda > 0 and anchors else {}
    if state is None:
      state = mt.init_state(params, tx, is_trainable, extras)
    else:  # keep the params, restart the optimizers (fresh schedule per stage)
      state = state.replace(opt_backbone=tx.init(state.backbone),
                            opt_heads={t: tx.init(h) for t, h in state.heads.items()},
                            extras=extras)

    def terms_for(t: mt.TaskData):
      terms = mt.supervised_terms(t.kind)
      if extras:
        terms["ewc"] = Weighted(ewc_term(ewc_lambda))
      return terms

    step_fns = {}
    sampler = np.random.default_rng([seed, k])
    counters = {n: 0 for n in names[:k + 1]}
    replay_steps = {n: 0 for n in names[:k]}
    for s in range(steps_per_task):
      if k > 0 and replay > 0 and sampler.random() < replay:
        j = int(sampler.integers(k))
        t = tasks[j]
        idx = counters[t.name] % memory_batches if memory_batches else counters[t.name]
        replay_steps[t.name] += 1
      else:
        t, idx = task, counters[task.name]
      counters[t.name] += 1
      if t.name not in step_fns:
        step_fns[t.name] = jax.jit(mt.make_task_step(mt.apply_for(apply_fns, t.name), t.name,
                                                     terms_for(t), tx))
      batch = {kk: jnp.asarray(v) for kk, v in t.batch_at(idx).items()}
      state, metrics = step_fns[t.name](state, batch, rng)
      if log is not None:
        log(int(state.step), {"stage": k, "task": t.name,
                              **{m: float(v) for m, v in metrics.items()}})
    seen = {}
    for j in range(k + 1):
      seen[names[j]] = mt.evaluate_task(apply_fns, state, tasks[j], forwards[names[j]])
      matrix[k, j] = mt.main_value(tasks[j], seen[names[j]])
    stage_metrics.append(seen)
    replayed.append(replay_steps)
    if ewc_lambda > 0 and k < k_tasks - 1:
      memory = (task.batch_at(i) for i in range(10**9))  # stops at fisher_examples
      fisher = fisher_diagonal(mt.apply_for(apply_fns, task.name), state.backbone, state.heads[task.name], state.frozen,
                               memory, task.kind, empirical=empirical_fisher,
                               rng=jax.random.fold_in(rng, 10_000 + k), max_examples=fisher_examples)
      anchors = anchors + [jax.tree_util.tree_map(jnp.copy, state.backbone)]
      fishers = fishers + [fisher]
  return ContinualResult(tasks=names, matrix=matrix, stage_metrics=stage_metrics,
                         summary=forgetting(matrix), replayed=replayed, state=state)
