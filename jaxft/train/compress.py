"""The I/O and config reading around compression: checks, the teacher, its cached logits.

Each compression method keeps its own step function (jaxft.objectives.distill.make_distill_step,
jaxft.objectives.prune.make_prune_step), which jaxft.train.parts hands to the step builder; this
module checks config.distill / prune / quant before any data loads, loads the teacher and the
student built from its layers, caches the teacher's logits, and builds the pruning schedule and
the quantization spec. Every function is a no-op when its method is off.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxft import assets
from jaxft.data import batching, tokenize
from jaxft.objectives import distill as distill_lib
from jaxft.objectives import prune as prune_lib
from jaxft.quant.int8 import QuantSpec

log = logging.getLogger("jaxft")

QUANT_METHODS = ("", "ptq_int8", "qat_int8")
PRUNE_METHODS = ("magnitude", "movement", "soft_movement")


def check(config) -> QuantSpec:
  """Refuses bad distill / prune / quant / keep_layers settings before data loads; -> the
  quantization spec."""
  keep = parse_layers(config.model.keep_layers, "model.keep_layers")
  if keep and config.distill.student_layers:
    raise ValueError("model.keep_layers and distill.student_layers both pick layers; a student "
                     "built from teacher layers ignores model.name: set only "
                     "distill.student_layers")
  parse_layers(config.distill.student_layers)
  if config.prune.method and config.prune.method not in PRUNE_METHODS:
    raise ValueError(f"unknown prune.method {config.prune.method!r}; known: "
                     f"{', '.join(PRUNE_METHODS)} (or '' for none)")
  return quant_spec(config.quant)


def quant_spec(quant_cfg) -> QuantSpec:
  if quant_cfg.method not in QUANT_METHODS:
    raise ValueError(f"unknown quant.method {quant_cfg.method!r}; known: ptq_int8, qat_int8 "
                     "(or '' for none)")
  emb = r"(^|/)(word|position|token_type)_embeddings/embedding$" if quant_cfg.embeddings else ""
  # Distillation projections and pruning scores are training-only: never quantized.
  exclude = "|".join(x for x in (quant_cfg.exclude, r"^(distill_proj|prune_scores)/") if x)
  return QuantSpec(embeddings=emb, exclude=exclude)


def prune_schedule(prune_cfg, total_steps: int) -> prune_lib.CubicSchedule:
  """Zhu & Gupta's cubic schedule from begin_fraction to end_fraction of training."""
  p = prune_cfg
  if not 0.0 <= p.begin_fraction <= p.end_fraction <= 1.0:
    raise ValueError(f"prune.begin_fraction={p.begin_fraction} and prune.end_fraction="
                     f"{p.end_fraction} must satisfy 0 <= begin <= end <= 1")
  begin = int(p.begin_fraction * total_steps)
  end = int(p.end_fraction * total_steps)
  freq = max(min(int(p.frequency), max(end - begin, 1)), 1)
  return prune_lib.CubicSchedule(final=float(p.final_sparsity), initial=float(p.initial_sparsity),
                                 begin_step=begin, num_updates=max((end - begin) // freq, 0),
                                 frequency=freq)


@dataclasses.dataclass
class Teacher:
  model: Any  # jaxft.models.Model, frozen
  layers: tuple[int, ...] | None  # student_layers, when the student is built from the teacher


def parse_layers(spec: str, key: str = "distill.student_layers") -> tuple[int, ...] | None:
  spec = str(spec).strip()
  if not spec:
    return None
  try:
    return tuple(int(x) for x in spec.split(","))
  except ValueError:
    raise ValueError(f"{key}={spec!r}: expected comma-separated layer indices "
                     "such as '0,2,4,6,8,10'") from None


def load_teacher(config, head: str, info, tokenizer) -> Teacher | None:
  """The frozen teacher (config.distill.teacher): a fine-tuned checkpoint with a head for this
  task; None without one."""
  from jaxft.models import from_pretrained
  d = config.distill
  if not d.teacher:
    return None
  model = from_pretrained(assets.resolve_model(d.teacher), head=head, num_labels=info.num_labels,
                          dtype=config.model.dtype,
                          tokenizer=None if d.own_tokenizer else tokenizer,
                          load_tokenizer=bool(d.own_tokenizer))
  untrained = list(model.loading_info.missing) + [k for k, *_ in model.loading_info.mismatched]
  if untrained:
    raise ValueError(f"distill.teacher={d.teacher!r} has no trained {head} head for "
                     f"{info.num_labels} labels (weights not in the checkpoint: {untrained[:3]}). "
                     "Fine-tune the teacher on this task first and pass its exported directory")
  return Teacher(model, parse_layers(d.student_layers))


def load_model(config, teacher: Teacher | None, **model_kwargs):
  """The model that trains: config.model.name (its layers model.keep_layers when set), or a
  student made of the teacher's layers distill.student_layers. model_kwargs go to
  from_pretrained / init_random."""
  from jaxft.models import from_pretrained
  if teacher is not None and teacher.layers:
    log.info("student: teacher layers %s", teacher.layers)
    return student_from_teacher(teacher, **model_kwargs)
  model = from_pretrained(assets.resolve_model(config.model.name), **model_kwargs)
  keep = parse_layers(config.model.keep_layers, "model.keep_layers")
  if not keep:
    return model
  try:  # a shallower model from the checkpoint's own layers (same rule as a student's)
    model = student_from_teacher(Teacher(model, keep), **model_kwargs)
  except ValueError as e:
    raise ValueError(f"model.keep_layers={config.model.keep_layers!r} does not fit "
                     f"{config.model.name}: {e}") from None
  log.info("model: layers %s of %s", keep, config.model.name)
  return model


def student_from_teacher(teacher: Teacher, **model_kwargs):
  """A student of the teacher's family holding teacher layers `teacher.layers` (DistilBERT's
  initialisation); model_kwargs go to init_random (head, num_labels, peft, dtype, ...). PEFT
  parameters the teacher lacks keep their fresh initialisation."""
  from jaxft.models import init_random
  from jaxft.core.state import flatten, unflatten
  params, cfg = distill_lib.student_from_teacher_layers(teacher.model.params, teacher.model.config,
                                                        teacher.layers)
  student = init_random(cfg, **model_kwargs)
  flat, taken = flatten(student.params), flatten(params)
  wrong = [k for k, v in taken.items() if k in flat and np.shape(v) != np.shape(flat[k])]
  if wrong:
    raise ValueError(f"teacher weights do not fit the student built from its layers: {wrong[:3]}")
  # Copies: the teacher's own buffers stay in the train state too, and the jitted step donates the
  # state, so student and teacher must not share an array (XLA would free it twice).
  flat.update({k: jnp.array(v, copy=True) for k, v in taken.items() if k in flat})
  return dataclasses.replace(student, params=unflatten(flat))


def with_teacher_logits(teacher: Teacher | None, config, data, mesh_put, num_shards: int = 1):
  """-> (data, cached): the train batches carry the teacher's cached logits where caching applies
  (`cache_teacher_logits`); (data, False) otherwise and without a teacher."""
  if teacher is None:
    return data, False
  cached = cache_teacher_logits(teacher, config, data, mesh_put, num_shards)
  if cached is None:
    return data, False
  from jaxft.data.views import WithTeacherLogits
  return dataclasses.replace(data, train=WithTeacherLogits(data.train, cached)), True


def cache_teacher_logits(teacher: Teacher, config, data, mesh_put,
                         num_shards: int = 1) -> np.ndarray | None:
  """Teacher logits [N, C] for every train example, in dataset order; None where caching does not
  apply (token classification; hidden-state or attention transfer needs the teacher online)."""
  d = config.distill
  if data.info.kind == "token_classification" or d.hidden_weight > 0 or d.attention_weight > 0:
    if d.own_tokenizer:
      raise ValueError("a teacher with its own tokenizer can only give sequence-level logits: "
                       "use a sequence classification task, hidden_weight=attention_weight=0, "
                       "or distill.own_tokenizer=False")
    return None
  if not d.cache_teacher_logits:
    if d.own_tokenizer:
      raise ValueError("distill.own_tokenizer=True needs distill.cache_teacher_logits=True (the "
                       "teacher's tokens are prepared once, before training)")
    return None
  train_split = config.data.train_split or "train"
  if d.own_tokenizer:
    tok = teacher.model.tokenizer
    enc = tokenize.encode(data.examples[train_split], tok, kind=data.info.kind,
                          max_length=min(int(config.data.max_length),
                                         int(getattr(tok, "model_max_length", 10**9))),
                          tokenizer_id=tokenize.tokenizer_fingerprint(tok))
  else:
    enc = data.encoded[train_split]
  path = _logits_path(config, teacher, enc, data.boundaries)
  if path.is_file():
    logits = np.load(path)
    log.info("teacher logits for %d train examples from %s", len(logits), path)
    return logits
  from jaxft.data.pipeline import local_shards
  from jaxft.train.mesh import gather_to_host
  apply = jax.jit(lambda p, b: teacher.model.apply(p, b, deterministic=True).logits)
  out = []
  bs = int(config.train.eval_batch_size)
  # Each process builds its rows of every batch; the logits of all rows come back to each.
  for batch in batching.eval_batches(enc, batch_size=bs, boundaries=data.boundaries,
                                     num_shards=num_shards, shards=local_shards(num_shards)):
    device_batch = mesh_put(batch)
    host = gather_to_host({"logits": apply(teacher.model.params, device_batch),
                           "example_mask": device_batch["example_mask"]})
    keep = np.asarray(host["example_mask"]) > 0
    out.append(np.asarray(host["logits"], np.float32)[keep])
  logits = np.concatenate(out)
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(tmp, logits)
    os.replace(tmp, path)  # atomic: a run killed mid-write leaves no half file behind
  log.info("computed teacher logits for %d train examples (saved to %s)", len(logits), path)
  return logits


def _logits_path(config, teacher: Teacher, enc, boundaries) -> pathlib.Path:
  """<data cache>/teacher_logits/<sha256>.npy, keyed by everything the logits depend on: the
  teacher's weights and config, the tokens it reads, the compute dtype and the padding buckets.
  A retrained or edited teacher, other data or another tokenizer gets a new file."""
  from jaxft.data import pipeline
  from jaxft.core.state import flatten
  h = hashlib.sha256(json.dumps({"v": 1, "dtype": str(config.model.dtype),
                                 "boundaries": [int(b) for b in boundaries],
                                 "teacher": teacher.model.config.to_json_string()}).encode())
  for k, v in sorted(flatten(teacher.model.params).items()):
    h.update(k.encode())
    h.update(np.ascontiguousarray(jax.device_get(v)).tobytes())
  for a in (enc.input_ids, enc.token_type_ids, enc.offsets):
    h.update(np.ascontiguousarray(a).tobytes())
  return pipeline.cache_dir(config.data) / "teacher_logits" / f"{h.hexdigest()}.npy"


def steps_note(total_steps: int, schedule: prune_lib.CubicSchedule) -> str:
  return (f"pruning: sparsity 0 -> {schedule.final:.2f} over steps {schedule.begin_step}.."
          f"{schedule.end_step} of {total_steps}, masks every {schedule.frequency} steps "
          f"({schedule.num_updates + 1} updates)")
