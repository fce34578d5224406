"""Continual learning: tasks fine-tuned one after another on one encoder, a head per task.

    jaxft train --config experiments/continual_glue.py:sst2,mrpc,rte --workdir workdirs/cl

With continual.tasks = "t_0,...,t_{K-1}" one run of K * steps_per_task steps goes through the one
step builder and the one loop with the multi-head model, markers and step of
jaxft.recipes.multitask (heads of tasks not in a batch stay bitwise untouched). Stage k (steps
k * steps_per_task + 1 ... (k + 1) * steps_per_task) trains the encoder and task k's head; each
stage starts a fresh optimizer (moments and learning-rate schedule, the usual practice: a new
task starts its own schedule). Every stage ends with an eval of every task seen so far, each with
its own head: R[k, j] is task j's main metric after stage k (NaN for j > k). Against forgetting:
  replay: each step of stage k is, with probability `replay`, a step on a batch of an earlier task
    j < k (uniform over j; that task's head trains too), so a fraction `replay` of the examples
    seen in stage k come from earlier tasks; `memory_batches` limits which earlier batches can be
    replayed (the first M batches of each task: a memory of M * batch_size examples);
  EWC (Kirkpatrick et al. 2017): after stage j, the diagonal Fisher
    F^j_i = E_x E_{y} [(d log p(y|x; theta) / d theta_i)^2]   (y the true label: "empirical"
    Fisher; or y ~ p(y|x) when empirical=False) at theta*^j, over the shared encoder's trainable
    parameters; later stages add the penalty  lambda/2 * sum_{j<k} sum_i F^j_i (theta_i -
    theta*^j_i)^2 (loss/ewc).
The plan (task and batch index of every step, replays included) is drawn up front from generators
seeded by (seed, stage), so the batch at step s is a pure function of (seed, s). Anchors and
Fisher diagonals live in state.extras as arrays [K - 1, ...] allocated at init (zeros: no
penalty), so the state's structure never changes; `ContinualSetup.after_eval` fills row k and
restarts the optimizer at the end of stage k, and both are in the checkpoint written after it.
Metrics (results.json "continual", from the stage-end evals of the history; average_accuracy and
average_forgetting also under "eval" and "best", which for a continual run is the final model, for
`jaxft table --metric`): average accuracy
A = mean_j R[K-1, j]; forgetting of task j < K-1 (Chaudhry et al. 2018)
  f_j = max_{l in [j, K-2]} R[l, j] - R[K-1, j], average forgetting = mean_j f_j.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.core.state import Flat, flatten, merge_params
from jaxft.objectives.base import StepContext, Weighted, example_weights, is_packed
from jaxft.recipes import multitask as mt
from jaxft.train.setup import Setup

ANCHORS, FISHERS = "ewc/anchors", "ewc/fishers"


# ------------------------------------------------------------------------------- EWC (pure)

def ewc_penalty(params: Flat, anchors: Sequence[Flat], fishers: Sequence[Flat], lam: float):
  """lambda/2 * sum_j sum_i F^j_i (theta_i - theta*^j_i)^2 over the keys of each Fisher dict.

  params, anchors[j], fishers[j]: flat dicts (an anchor / Fisher leaf may carry a leading stage
  axis [J, ...], summed over like the list); f32[] result."""
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
  """Loss term: the EWC penalty of the trainable encoder params against the stage-stacked
  ctx.extras["ewc/anchors"] / ["ewc/fishers"] ({flat key: [K - 1, ...]}; rows of stages not
  finished yet are zeros and add nothing)."""

  def term(apply_fn, params, batch, rng, ctx: StepContext):
    del apply_fn, batch, rng
    return ewc_penalty(flatten(params), [ctx.extras[ANCHORS]], [ctx.extras[FISHERS]], lam), {}

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


def slot_log_likelihood(logits: jax.Array, labels: jax.Array, kind: str, batch) -> jax.Array:
  """log p(y|x) per slot [E] of a packed batch: sequence logits [E, C] as `log_likelihood`; token
  logits [R, L, C] summed over each slot's labelled tokens (segment_ids)."""
  if kind != "token_classification":
    return log_likelihood(logits, labels, kind)
  valid = labels != -100
  lp = jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32)),
                           jnp.where(valid, labels, 0)[..., None], -1)[..., 0]
  ids = jnp.where(batch["segment_ids"] > 0, batch["segment_ids"] - 1, -1).reshape(-1)
  return jax.ops.segment_sum((lp * valid).reshape(-1), ids,
                             num_segments=batch["example_start"].shape[0])


def fisher_diagonal(apply_fn, trainable: Flat, frozen: Flat, batches: Iterable[dict], kind: str,
                    *, keys: Sequence[str] | None = None, empirical: bool = True, rng=None,
                    max_examples: int = 0, chunk: int = 4) -> Flat:
  """Diagonal Fisher of trainable[keys] (default all): the mean over real examples
  (example_mask > 0) of the squared per-example gradient of log p(y|x) (module docstring), f32.

  apply_fn(nested params, batch, deterministic=True) -> ModelOutput, on merge(trainable, frozen).
  Per-example gradients are taken `chunk` examples at a time (memory: chunk x the parameters).
  Stops after the batch that reaches max_examples (0 = all batches). empirical=False draws
  y ~ softmax(logits) per example (classification only) from `rng`. Packed batches
  (jaxft.data.packing): examples share rows, so slot e's gradient is a backward pass of the whole
  packed forward with the cotangent on its log-likelihood alone (the same gradient, since packed
  examples do not attend to each other), `chunk` slots at a time; the same per-slot keys."""
  if not empirical and kind != "classification":
    raise ValueError("sampled-label Fisher (empirical=False) is implemented for classification")
  rng = jax.random.key(0) if rng is None else rng
  keys = sorted(trainable if keys is None else keys)
  wrt = {k: trainable[k] for k in keys}
  rest = {k: v for k, v in trainable.items() if k not in wrt}

  def log_p(w, rest, frozen, example, key):
    batch = jax.tree_util.tree_map(lambda v: v[None], example)
    logits = apply_fn(merge_params({**rest, **w}, frozen), batch, deterministic=True).logits
    labels = batch["labels"]
    if not empirical:
      labels = jax.random.categorical(key, logits.astype(jnp.float32), axis=-1)
    return log_likelihood(logits, labels, kind)[0]

  per_example = jax.vmap(jax.grad(log_p), in_axes=(None, None, None, 0, 0))

  @jax.jit
  def batch_sum(w, rest, frozen, batch, key):
    weights = example_weights(batch)
    b = weights.shape[0]
    c = math.gcd(b, max(int(chunk), 1))
    split = lambda x: x.reshape((b // c, c) + x.shape[1:])
    xs = (jax.tree_util.tree_map(split, batch), split(jax.random.split(key, b)), split(weights))

    def body(acc, x):
      example, example_keys, wt = x
      g = per_example(w, rest, frozen, example, example_keys)
      return jax.tree_util.tree_map(
          lambda a, gi: a + jnp.einsum("b,b...->...", wt, jnp.square(gi.astype(jnp.float32))),
          acc, g), None

    zeros = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, jnp.float32), w)
    total, _ = jax.lax.scan(body, zeros, xs)
    return total, jnp.sum(weights)

  @jax.jit
  def packed_sum(w, rest, frozen, batch, key):
    weights = example_weights(batch)
    e = weights.shape[0]
    slot_keys = jax.random.split(key, e)

    def log_p_slots(w):
      logits = apply_fn(merge_params({**rest, **w}, frozen), batch, deterministic=True).logits
      labels = batch["labels"]
      if not empirical:  # per slot, as the padded path draws per example from its [1, C] logits
        draw = lambda k, z: jax.random.categorical(k, z[None].astype(jnp.float32), axis=-1)[0]
        labels = jax.vmap(draw)(slot_keys, logits)
      return slot_log_likelihood(logits, labels, kind, batch)

    _, pullback = jax.vjp(log_p_slots, w)
    c = math.gcd(e, max(int(chunk), 1))
    onehots = jnp.eye(e, dtype=jnp.float32).reshape(e // c, c, e)

    def body(acc, x):
      cotangents, wt = x
      (g,) = jax.vmap(pullback)(cotangents)
      return jax.tree_util.tree_map(
          lambda a, gi: a + jnp.einsum("b,b...->...", wt, jnp.square(gi.astype(jnp.float32))),
          acc, g), None

    zeros = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, jnp.float32), w)
    total, _ = jax.lax.scan(body, zeros, (onehots, weights.reshape(e // c, c)))
    return total, jnp.sum(weights)

  total, count = None, 0.0
  for bi, batch in enumerate(batches):
    summed = packed_sum if is_packed(batch) else batch_sum
    s, n = summed(wrt, rest, frozen, batch, jax.random.fold_in(rng, bi))
    total = s if total is None else jax.tree_util.tree_map(jnp.add, total, s)
    count += float(n)
    if max_examples and count >= max_examples:
      break
  if not count:
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


# ------------------------------------------------------------------------------------ plan

def stage_plan(num_tasks: int, steps_per_task: int, *, replay: float = 0.0,
               memory_batches: int = 0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(task, index) int32 [num_tasks * steps_per_task]: the task each step trains and which of its
  train batches. Stage k draws from default_rng([seed, k]): with probability `replay` (k > 0) a
  step replays task j ~ U{0..k-1}, its c-th replay in this stage taking batch c (c mod
  memory_batches with a memory); the other steps walk task k's batches from 0."""
  task = np.zeros(num_tasks * steps_per_task, np.int32)
  index = np.zeros_like(task)
  for k in range(num_tasks):
    sampler = np.random.default_rng([seed, k])
    counters = np.zeros(num_tasks, np.int64)
    for s in range(k * steps_per_task, (k + 1) * steps_per_task):
      j = k
      if k > 0 and replay > 0 and sampler.random() < replay:
        j = int(sampler.integers(k))
      c = counters[j]
      task[s], index[s] = j, (c % memory_batches if memory_batches and j != k else c)
      counters[j] += 1
  return task, index


def replayed(task: np.ndarray, steps_per_task: int, names: Sequence[str]) -> list[dict]:
  """Per stage: {earlier task: steps that replayed it}."""
  out = []
  for k in range(len(names)):
    stage = task[k * steps_per_task:(k + 1) * steps_per_task]
    out.append({names[j]: int(np.sum(stage == j)) for j in range(k)})
  return out


# ---------------------------------------------------------------------------- config, setup

def check(config) -> list[str]:
  """Refuses a continual config that cannot run, before any data or model loads; -> the tasks."""
  c = config.continual
  names = mt.task_names(c.tasks, "continual.tasks")
  mt.check_common(config, names, "continual")
  spt = int(c.steps_per_task)
  if spt <= 0:
    raise ValueError(f"continual.steps_per_task must be > 0 (steps of each stage), got {spt}")
  if not 0.0 <= float(c.replay) < 1.0:
    raise ValueError(f"continual.replay is a probability in [0, 1), got {c.replay}")
  if int(c.memory_batches) < 0:
    raise ValueError(f"continual.memory_batches must be >= 0, got {c.memory_batches}")
  if float(c.ewc_lambda) < 0:
    raise ValueError(f"continual.ewc_lambda must be >= 0, got {c.ewc_lambda}")
  if float(c.ewc_lambda) > 0 and int(c.fisher_examples) < 1:
    raise ValueError("continual.ewc_lambda > 0 needs continual.fisher_examples >= 1")
  total = len(names) * spt
  t = config.train
  if t.num_steps and int(t.num_steps) != total:
    raise ValueError(f"train.num_steps={t.num_steps}, but {len(names)} tasks x "
                     f"continual.steps_per_task={spt} make {total} steps: set train.num_steps=0")
  if t.eval_every and spt % int(t.eval_every):
    raise ValueError(f"train.eval_every={t.eval_every} must divide continual.steps_per_task={spt} "
                     "(every stage ends with an eval), or be 0 (once per stage)")
  if t.early_stopping_patience:
    raise ValueError("train.early_stopping_patience must be 0: a continual run trains every "
                     "stage")
  return names


@dataclasses.dataclass
class ContinualSetup(Setup):
  """A Setup whose after_eval also closes a stage: at step (k + 1) * steps_per_task < total it
  fills the EWC row k (anchor, Fisher of task k) and restarts the optimizer. The model of a
  continual run is the one after its last stage: only the final eval can be the best."""

  names: list = dataclasses.field(default_factory=list)
  steps_per_task: int = 0
  ewc_keys: list = dataclasses.field(default_factory=list)

  @property
  def best_from_step(self) -> int:
    return self.total_steps

  def after_eval(self, state, value: float):
    state = super().after_eval(state, value)
    step = int(jax.device_get(state.step))
    if step % self.steps_per_task or step >= self.total_steps:
      return state
    k = step // self.steps_per_task - 1
    extras = state.extras
    if self.ewc_keys:
      extras = {**extras, **self._ewc_row(state, k)}
    state = state.replace(opt_state=self.built.tx.init(state.trainable), extras=extras)
    return jax.device_put(state, self.state_shardings)

  def _ewc_row(self, state, k: int) -> dict:
    from jaxft.train import mesh as mesh_lib
    task = self.names[k]
    bundle = self.data.bundles[task]
    c = self.config.continual
    batches = (mesh_lib.put_batch(mt.mark(bundle.train.batch_at(i), task), self.mesh)
               for i in range(10**9))  # fisher_diagonal stops at fisher_examples
    fisher = fisher_diagonal(self.apply_fn, state.trainable, state.frozen, batches,
                             bundle.info.kind, keys=self.ewc_keys,
                             rng=jax.random.fold_in(jax.random.key(self.config.seed), k),
                             max_examples=int(c.fisher_examples))
    anchor = {key: state.trainable[key] for key in self.ewc_keys}
    put = jax.jit(lambda rows, new: jax.tree_util.tree_map(lambda r, x: r.at[k].set(x), rows,
                                                           new))
    return {ANCHORS: put(state.extras[ANCHORS], anchor),
            FISHERS: put(state.extras[FISHERS], fisher)}


def stage_matrix(history: Sequence[dict], names: Sequence[str], main: Sequence[str],
                 steps_per_task: int) -> np.ndarray:
  """R [K, K] from the loop's eval history (entries {"step", "metrics"}): row k from the eval at
  step (k + 1) * steps_per_task, R[k, j] = metrics["<task j>/<main metric j>"] for j <= k."""
  k_tasks = len(names)
  r = np.full((k_tasks, k_tasks), np.nan)
  for entry in history:
    k, rem = divmod(int(entry["step"]), steps_per_task)
    if rem or not 1 <= k <= k_tasks:
      continue
    for j in range(k):
      r[k - 1, j] = entry["metrics"].get(f"{names[j]}/{main[j]}", np.nan)
  return r


def setup(config, devices=None) -> ContinualSetup:
  """The Setup of a continual run (loop.train_and_evaluate's setup_fn)."""
  names = check(config)
  c = config.continual
  loaded = mt.load(config, names, devices)
  spt, k_tasks = int(c.steps_per_task), len(names)
  task, index = stage_plan(k_tasks, spt, replay=float(c.replay),
                           memory_batches=int(c.memory_batches), seed=int(config.seed))
  train = mt.TaskBatcher(names, [loaded.bundles[t].train for t in names], task, index,
                         steps_per_epoch=spt,
                         what=f"continual replay={float(c.replay)!r} "
                              f"memory={int(c.memory_batches)}")
  main = [loaded.bundles[t].info.main_metric for t in names]
  lam = float(c.ewc_lambda)
  ewc = lam > 0 and k_tasks > 1
  extra_terms = {"ewc": Weighted(ewc_term(lam))} if ewc else {}

  def ewc_rows(trainable, frozen):  # the trainable encoder leaves, one row per stage but K
    rows = lambda: {k: jnp.zeros((k_tasks - 1,) + v.shape, jnp.float32)
                    for k, v in trainable.items() if not k.startswith("head/")}
    return {ANCHORS: rows(), FISHERS: rows()}

  part = mt.heads_part({t: loaded.bundles[t].info.kind for t in names},
                       label_smoothing=float(config.objective.supervised.label_smoothing),
                       extra_terms=extra_terms, init_extras=ewc_rows if ewc else None,
                       lr_period=spt,
                       name="continual")
  plan = {"tasks": names, "main_metrics": main, "steps_per_task": spt,
          "replayed": replayed(task, spt, names)}

  def summarize(history):
    r = stage_matrix(history, names, main, spt)
    scores = forgetting(r)
    final = {**(history[-1]["metrics"] if history else {}),
             "average_accuracy": scores["average_accuracy"],
             "average_forgetting": scores["average_forgetting"]}
    matrix = [[None if np.isnan(x) else float(x) for x in row] for row in r]
    # The final eval is also the best (ContinualSetup.best_from_step): both carry A and F.
    return {"continual": {**plan, "matrix": matrix, **scores}, "eval": final, "best": final}

  def seen(step: int) -> list[str]:
    return names[:min(k_tasks, max(1, -(-step // spt)))]

  s = mt.assemble(config, loaded, mt.tasks_data(loaded.bundles, train), part,
                  total_steps=k_tasks * spt, schedule_steps=spt, setup_cls=ContinualSetup,
                  summarize=summarize, names=names, steps_per_task=spt)
  s.ewc_keys = sorted(s.state.extras.get(ANCHORS, {}))
  s.evaluator = mt.TasksEvaluator(s, loaded.bundles, seen=seen)
  return s


def run(config, workdir, *, overwrite: bool = False, devices=None) -> dict:
  """Runs (or resumes) a continual experiment in `workdir`; returns its results dict."""
  from jaxft.train import loop
  check(config)  # before the workdir is touched
  return loop.train_and_evaluate(config, workdir, overwrite=overwrite, devices=devices,
                                 setup_fn=setup)
