"""The config's methods as step parts (jaxft.core.part.Part), one small factory per method.

Each factory reads its own section of the config and returns a Part, or None when the config does
not ask for the method. `jaxft.train.build` runs them in the order of `FACTORIES` and composes what
they return; nothing else decides which methods a run uses. A new kind of method (beyond a new
objective, which only needs the objectives registry) is one factory here and one line in FACTORIES.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax

from jaxft.core.part import Part
from jaxft.core.state import Flat


@dataclasses.dataclass(frozen=True)
class BuildContext:
  """What a part factory may read: the config, the model, the task, the run length, and what
  setup loaded for it (the distillation teacher, whether its logits ride in the batches)."""

  config: Any
  model: Any  # jaxft.models.Model (the student under distillation)
  info: Any  # jaxft.data.tasks.TaskInfo-like: kind, num_labels, main_metric
  total_steps: int
  main_metric: str
  teacher: Any = None  # jaxft.train.compress.Teacher, or None
  teacher_logits_cached: bool = False


def objective_part(ctx: BuildContext) -> Part:
  """config.objective.name from the objectives registry."""
  from jaxft.objectives import registry
  part = registry.build(ctx.config.objective, ctx.info)
  return dataclasses.replace(part, name=part.name or ctx.config.objective.name)


def distill_part(ctx: BuildContext) -> Part | None:
  """Knowledge distillation from ctx.teacher: its own step (make_distill_step), alpha * CE in
  place of the supervised term, learned hidden-state projections, the teacher in the extras
  unless its logits are cached in the batches."""
  if ctx.teacher is None:
    return None
  from jaxft.objectives import distill
  d = ctx.config.distill
  teacher = ctx.teacher.model
  layers = (tuple(int(x) for x in d.layer_map.split(",")) if d.layer_map[:1].isdigit()
            else d.layer_map)
  proj = {}
  if d.hidden_weight > 0:
    proj = distill.init_projections(jax.random.key(ctx.config.seed),
                                    int(ctx.model.config.hidden_size),
                                    int(teacher.config.hidden_size))
  extras = {} if ctx.teacher_logits_cached else distill.distill_extras(teacher.params)

  def wrap_step(inner):
    return functools.partial(_distill_factory, teacher.apply, inner, dict(
        kind=ctx.info.kind, alpha=d.alpha, temperature=d.temperature,
        hidden_weight=d.hidden_weight, attention_weight=d.attention_weight, layers=layers,
        attention_heads=d.attention_heads))

  return Part(name="distill", replaces=("sup",), init=lambda tr, fr: ({**tr, **proj}, extras),
              wrap_step=wrap_step, eval_params=lambda flat, ex: distill.strip_distill_params(flat))


def _distill_factory(teacher_apply, inner, options, apply_fn, terms, tx, **step_options):
  from jaxft.objectives.distill import make_distill_step
  return make_distill_step(apply_fn, teacher_apply, tx, extra_terms=terms, step_factory=inner,
                           **options, **step_options)


def prune_part(ctx: BuildContext) -> Part | None:
  """Magnitude / movement / soft-movement pruning (config.prune): its own step (make_prune_step),
  masks in the extras, movement scores as trainable leaves; evaluated weights are masked."""
  p = ctx.config.prune
  if not p.method:
    return None
  from jaxft.objectives import prune
  from jaxft.train.compress import prune_schedule, steps_note
  schedule = prune_schedule(p, ctx.total_steps)
  options = dict(method=p.method, schedule=schedule, scope=p.scope,
                 soft_threshold=p.soft_threshold, l1_weight=p.l1_weight)

  def init(trainable, frozen):
    return prune.init_pruning(trainable, frozen, p.method, schedule=schedule, scope=p.scope,
                              score_init=p.score_init, soft_threshold=p.soft_threshold)

  def eval_params(flat: Flat, extras) -> Flat:
    kept = {k: v for k, v in flat.items() if not k.startswith(prune.SCORES + "/")}
    return prune.apply_masks(kept, extras["masks"])

  def wrap_step(inner):
    return functools.partial(prune.make_prune_step, step_factory=inner, **options)

  return Part(name="prune", init=init, wrap_step=wrap_step, eval_params=eval_params,
              eval_from_step=min(schedule.end_step + 1, ctx.total_steps),
              note=steps_note(ctx.total_steps, schedule))


def qat_part(ctx: BuildContext) -> Part | None:
  """Quantization-aware training: the forward (training and eval) sees fake-quantized weights."""
  if ctx.config.quant.method != "qat_int8":
    return None
  from jaxft.quant import qat
  from jaxft.train.compress import quant_spec
  spec = quant_spec(ctx.config.quant)
  return Part(name="qat", wrap_apply=lambda apply_fn: qat.qat_apply(apply_fn, spec))


def spike_part(ctx: BuildContext) -> Part | None:
  """The spike guard (train.spike_factor > 0): its window of recent gradient norms in the extras."""
  from jaxft.train import spike
  guard = spike.from_config(ctx.config.train)
  if guard is None:
    return None
  return Part(name="spike", init_extras=lambda tr, fr: guard.init(),
              step_options={"spike_guard": guard})


def averaging_part(ctx: BuildContext) -> Part | None:
  """EMA (train.ema_decay > 0) and SWA (train.swa_start >= 0) of the trainable weights; with
  train.eval_with = ema / swa, evaluation and export use the average."""
  from jaxft.train import averaging
  t = ctx.config.train
  if t.eval_with not in ("params", "ema", "swa"):
    raise ValueError(f"train.eval_with={t.eval_with!r}: use params, ema or swa")
  if t.eval_with == "ema" and not t.ema_decay > 0:
    raise ValueError("train.eval_with=ema needs train.ema_decay > 0 (e.g. 0.999)")
  if t.eval_with == "swa" and t.swa_start < 0:
    raise ValueError("train.eval_with=swa needs train.swa_start >= 0")
  inits, updates = [], []
  if t.ema_decay > 0:
    inits.append(averaging.init_ema)
    updates.append(averaging.ema_update(float(t.ema_decay)))
  if t.swa_start >= 0:
    inits.append(averaging.init_swa)
    updates.append(averaging.swa_update(int(t.swa_start), int(t.swa_every)))
  if not inits:
    return None
  which = t.eval_with

  def eval_params(flat: Flat, extras) -> Flat:
    if which == "params":
      return flat
    avg = extras[which]
    return {k: (avg[k].astype(v.dtype) if k in avg else v) for k, v in flat.items()}

  return Part(name="averaging",
              init_extras=lambda tr, fr: {k: v for f in inits for k, v in f(tr).items()},
              update_extras=averaging.chain_update_extras(*updates), eval_params=eval_params)


def plateau_part(ctx: BuildContext) -> Part | None:
  """Reduce-on-plateau (train.schedule = plateau): after every evaluation the optimizer's scale
  drops by plateau_factor once plateau_patience evaluations bring no gain."""
  t = ctx.config.train
  if t.schedule != "plateau":
    return None
  from jaxft.train.averaging import plateau_observe
  mode = "min" if ctx.main_metric == "loss" else "max"

  def after_eval(state, value: float):
    return state.replace(opt_state=plateau_observe(
        state.opt_state, float(value), mode=mode, factor=t.plateau_factor,
        patience=t.plateau_patience))

  return Part(name="plateau", after_eval=after_eval)


# Order matters: init runs in this order (averaging sees the leaves distillation and pruning add),
# eval_params in reverse (the average is taken first, then masks applied, then extra leaves
# dropped), and each wrap_step wraps the factory of the parts after it (distillation's step hands
# its terms to pruning's, which hands them to make_step).
FACTORIES: tuple[Callable[[BuildContext], Part | None], ...] = (
    objective_part, distill_part, prune_part, qat_part, spike_part, averaging_part, plateau_part)
