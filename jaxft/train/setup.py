"""Builds everything a run needs from its config, validating input before any compile.

Order matters for the promise "bad input fails before long compute": tokenizer and data first
(missing columns, bad labels, empty texts, a batch that does not divide over devices), then the
model (checkpoint shape mismatches), then the PEFT partition (rules that match nothing), and only
then the jitted step.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxft import assets
from jaxft.objectives import registry as objectives
from jaxft.objectives.base import make_step
from jaxft.train import mesh as mesh_lib
from jaxft.train.optim import make_optimizer
from jaxft.train.state import TrainState, count_params, flatten

log = logging.getLogger("jaxft")


@dataclasses.dataclass
class Setup:
  config: Any
  mesh: Any
  data: Any  # jaxft.data.pipeline.DataBundle
  model: Any  # jaxft.models.Model
  peft_spec: Any
  counts: dict
  state: TrainState
  state_shardings: Any
  step_fn: Callable  # jitted step(state, batch, rng) -> (state, metrics)
  total_steps: int
  trace_count: list  # [n]: how many times the step was traced (compiled)

  def checkpointable(self, state: TrainState) -> TrainState:
    """What goes into checkpoints: everything but frozen params, which reload from the base model."""
    return state.replace(frozen={})

  def from_checkpointable(self, saved: TrainState) -> TrainState:
    return saved.replace(frozen=self.state.frozen)


def load_tokenizer(name: str):
  from transformers import AutoTokenizer
  path = assets.resolve_model(name)
  try:
    return AutoTokenizer.from_pretrained(path)
  except OSError as e:
    raise OSError(f"could not load a tokenizer for model {name!r} ({e}). Offline? Use a local "
                  "Hugging Face directory or an asset name (jaxft assets list).") from e


def _num_layers(hf_config) -> int:
  for attr in ("num_hidden_layers", "n_layers", "num_layers"):
    if hasattr(hf_config, attr):
      return int(getattr(hf_config, attr))
  raise AttributeError(f"cannot tell the number of layers of {type(hf_config).__name__}")


def _head_for(kind: str, head: str) -> str:
  if head:
    return head
  return {"classification": "sequence_classification", "regression": "regression",
          "token_classification": "token_classification"}[kind]


def total_steps_of(train_cfg, steps_per_epoch: int) -> int:
  if train_cfg.num_steps > 0:
    return int(train_cfg.num_steps)
  return max(int(math.ceil(train_cfg.num_epochs * steps_per_epoch)), 1)


def build_setup(config, devices=None) -> Setup:
  from jaxft import peft
  from jaxft.data import pipeline
  from jaxft.models import from_pretrained

  mesh = mesh_lib.make_mesh(config.mesh, devices)
  mesh_lib.check_batch_divides(config.train.batch_size, mesh)
  mesh_lib.check_batch_divides(config.train.eval_batch_size, mesh, "train.eval_batch_size")
  if config.train.batch_size % config.train.grad_accum_steps:
    raise ValueError(f"train.batch_size={config.train.batch_size} is not a multiple of "
                     f"train.grad_accum_steps={config.train.grad_accum_steps}")

  objective_names = objectives.names()
  if config.objective.name not in objective_names:
    objectives.build(config.objective, None)  # raises with the known names
  tokenizer = load_tokenizer(config.model.name)
  data = pipeline.build(config.data, tokenizer, batch_size=config.train.batch_size,
                        eval_batch_size=config.train.eval_batch_size, seed=config.seed,
                        num_shards=mesh_lib.num_batch_shards(mesh),
                        unlabeled_ratio=config.data.unlabeled_ratio)
  info = data.info
  objective = objectives.build(config.objective, info)
  if objective.unlabeled and not config.data.labeled_per_class:
    raise ValueError(f"objective {config.objective.name!r} needs unlabeled data: set "
                     "data.labeled_per_class > 0 (and data.unlabeled_ratio, e.g. 3)")

  spec = peft.spec_from_config(config.peft)
  m = config.model
  model = from_pretrained(
      assets.resolve_model(m.name), head=_head_for(info.kind, m.head),
      num_labels=info.num_labels, dtype=m.dtype, pooling=m.pooling or None, peft=spec,
      remat=m.remat, attention_impl=m.attention_impl or None,
      hidden_dropout=None if m.hidden_dropout < 0 else m.hidden_dropout,
      attention_dropout=None if m.attention_dropout < 0 else m.attention_dropout,
      classifier_dropout=None if m.classifier_dropout < 0 else m.classifier_dropout,
      id2label=dict(enumerate(info.label_names)) if info.label_names else None,
      tokenizer=tokenizer)
  num_layers = _num_layers(model.config)
  flat = flatten(model.params)
  labels = peft.partition(config.peft, flat, num_layers)
  trainable = {k: v for k, v in flat.items() if labels[k] == "trainable"}
  frozen = {k: v for k, v in flat.items() if labels[k] != "trainable"}
  counts = peft.count(flat, labels)

  total_steps = total_steps_of(config.train, data.train.steps_per_epoch)
  tx, schedule = make_optimizer(config.train, trainable, num_layers, total_steps)
  extras = objective.init_extras(trainable, frozen) if objective.init_extras else {}
  state = TrainState.create(trainable, frozen, tx, extras)
  state, shardings = mesh_lib.shard_state(state, mesh)

  trace_count = [0]
  step = make_step(model.apply, objective.terms, tx, lr_schedule=schedule,
                   grad_accum_steps=config.train.grad_accum_steps,
                   nan_policy=config.train.nan_policy, update_extras=objective.update_extras)

  def counted_step(state, batch, rng):
    trace_count[0] += 1  # runs only while tracing
    return step(state, batch, rng)

  step_fn = mesh_lib.jit_step(counted_step, mesh, shardings)
  return Setup(config=config, mesh=mesh, data=data, model=model, peft_spec=spec, counts=counts,
               state=state, state_shardings=shardings, step_fn=step_fn, total_steps=total_steps,
               trace_count=trace_count)
