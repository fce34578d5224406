"""The one step builder: (config, model, task info) -> initial state, pure step, eval params.

    built = build(config, model, info, total_steps=n)
    state, metrics = built.step(built.state, batch, rng)      # pure; jit it (jaxft.train.mesh)
    params = built.eval_params(state.trainable, state.frozen, state.extras)   # nested, traceable

No I/O: the model (and a distillation teacher) come loaded; setup does the loading, sharding and
jitting around it. `jaxft train`, `jaxft eval / export`, the benchmarks and the tests all get
their step here. The run's methods arrive as parts (jaxft.train.parts.FACTORIES, each reading its
own config section) and are composed the same way whatever they are:

  trainable / frozen  the PEFT partition of the model's params (config.peft), then each part's
                      `init` in order (added leaves, state extras);
  terms               every part's loss terms; a part's `replaces` removes earlier ones;
  apply_fn            model.apply wrapped by each part's `wrap_apply`;
  step factory        jaxft.objectives.base.make_step wrapped by each part's `wrap_step`, innermost
                      last (distillation hands its terms to pruning's step, which hands them on);
  step options        learning-rate schedule, gradient accumulation, clipping, NaN policy
                      (config.train),
                      every part's update_extras / post_update chained in order, its step_options;
  eval_params         {frozen, trainable} through each part's `eval_params`, last part first.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

from jaxft.core.part import Part
from jaxft.core.state import Flat, TrainState, flatten, unflatten
from jaxft.objectives.base import make_step
from jaxft.train import parts as parts_lib
from jaxft.train.averaging import chain_update_extras
from jaxft.train.optim import make_optimizer


@dataclasses.dataclass
class Built:
  """state: the initial TrainState (host arrays, unsharded). step: pure `step(state, batch, rng)
  -> (state, metrics)`, not jitted. eval_params(trainable, frozen, extras) -> nested params, the
  weights evaluated and exported. apply_fn: the forward training and eval use. parts: the
  composed parts, in order. counts: trainable / total parameter counts (the model's own)."""

  state: TrainState
  step: Callable
  eval_params: Callable
  apply_fn: Callable
  lr_schedule: Callable
  tx: Any
  parts: list[Part]
  counts: dict
  eval_from_step: int = 0
  after_eval: Callable | None = None

  @property
  def part_names(self) -> list[str]:
    return [p.name for p in self.parts]


def num_layers(hf_config) -> int:
  for attr in ("num_hidden_layers", "n_layers", "num_layers"):
    if hasattr(hf_config, attr):
      return int(getattr(hf_config, attr))
  raise AttributeError(f"cannot tell the number of layers of {type(hf_config).__name__}")


def compose_terms(parts: Sequence[Part]) -> dict:
  terms = {}
  for p in parts:
    for name in p.replaces:
      terms.pop(name, None)
    for name, term in p.terms.items():
      if name in terms:
        raise ValueError(f"loss term {name!r} of part {p.name!r} clashes with another part's")
      terms[name] = term
  return terms


def build(config, model, info, *, total_steps: int, teacher=None,
          teacher_logits_cached: bool = False, main_metric: str | None = None,
          extra_parts: Sequence[Part] = ()) -> Built:
  """Composes the parts the config asks for (plus `extra_parts`, appended) into one step.

  config: the run's config (attribute access: a ConfigDict or anything shaped like
  jaxft.config.base_config()). model: a jaxft.models.Model. info: the task (kind, num_labels,
  main_metric). teacher: a loaded jaxft.train.compress.Teacher when config.distill.teacher is set.
  """
  from jaxft import peft
  main_metric = main_metric or config.train.early_stopping_metric or info.main_metric
  ctx = parts_lib.BuildContext(config=config, model=model, info=info, total_steps=total_steps,
                               main_metric=main_metric, teacher=teacher,
                               teacher_logits_cached=teacher_logits_cached)
  parts = [p for p in (f(ctx) for f in parts_lib.FACTORIES) if p is not None]
  parts += list(extra_parts)

  flat = flatten(model.params)
  layers = num_layers(model.config)
  labels = peft.partition(config.peft, flat, layers)
  trainable = {k: v for k, v in flat.items() if labels[k] == "trainable"}
  frozen = {k: v for k, v in flat.items() if labels[k] != "trainable"}
  counts = peft.count(flat, labels)
  extras = {}
  for p in parts:
    trainable, more = p.start(trainable, frozen)
    extras.update(more)

  tx, lr_schedule = make_optimizer(
      config.train, trainable, layers, total_steps,
      score_learning_rate=config.prune.score_learning_rate,
      plateau_mode="min" if main_metric == "loss" else "max", clip=False, guarded=True,
      peft_cfg=config.peft)
  state = TrainState.create(trainable, frozen, tx, extras)

  apply_fn = model.apply
  factory = make_step
  options = {}
  for p in parts:
    if p.wrap_apply is not None:
      apply_fn = p.wrap_apply(apply_fn)
    options.update(p.step_options)
  for p in reversed(parts):
    if p.wrap_step is not None:
      factory = p.wrap_step(factory)
  update_extras = chain_update_extras(*[p.update_extras for p in parts])
  post_fns = [p.post_update for p in parts if p.post_update is not None]

  def post_update(trainable: Flat, state) -> Flat:
    for f in post_fns:
      trainable = f(trainable, state)
    return trainable

  step = factory(apply_fn, compose_terms(parts), tx, lr_schedule=lr_schedule,
                 grad_accum_steps=config.train.grad_accum_steps,
                 grad_clip=float(config.train.grad_clip),
                 log_norms=bool(config.train.log_norms), guard_in_optimizer=True,
                 nan_policy=config.train.nan_policy, update_extras=update_extras,
                 post_update=post_update if post_fns else None, **options)

  eval_fns = [p.eval_params for p in reversed(parts) if p.eval_params is not None]

  def eval_params(trainable: Flat, frozen: Flat, extras: dict):
    flat = {**frozen, **trainable}
    for f in eval_fns:
      flat = f(flat, extras)
    return unflatten(flat)

  after = [p.after_eval for p in parts if p.after_eval is not None]

  def after_eval(state, value):
    for f in after:
      state = f(state, value)
    return state

  return Built(state=state, step=step, eval_params=eval_params, apply_fn=apply_fn,
               lr_schedule=lr_schedule, tx=tx, parts=parts, counts=counts,
               eval_from_step=max([0] + [p.eval_from_step for p in parts]),
               after_eval=after_eval if after else None)
