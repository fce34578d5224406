"""Saving what PEFT trained, and exporting models for inference.

A PEFT checkpoint is the small trained part plus a reference to the base checkpoint:

    out_dir/peft_params.safetensors   the trainable leaves, keyed by their '/'-joined flat paths
    out_dir/peft_config.json          {"format": "jaxft-peft", "version": 1, "method": "lora",
                                       "base_model": "<HF dir or hub id>", "spec": {PeftSpec fields},
                                       "params": {path: [shape]}, "num_params": n}

`jaxft export --adapter-only` (jaxft.train.restore.export_workdir) writes every leaf the run
trained (PEFT leaves, BitFit's biases, the head, ...) and adds to the record
    "options": {config.peft as trained: method, ranks, targets, ...},
    "model": {"head", "num_labels", "id2label", "pooling", "dtype"}   (what rebuilds the model)
`load_adapter(out_dir)` rebuilds the model from them: the base model with the saved spec and head,
the saved leaves put in (`from_pretrained(base_model, peft=spec, head=...)`, then
`apply_trainable(model.params, trainable)`). `export(..., merged=True)` instead writes an ordinary
Hugging Face directory with LoRA / DoRA / (IA)^3 folded into the weights.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.models.peft_layers import PeftSpec
from jaxft.peft.merge import merge
from jaxft.peft.rules import PEFT_LEAF, TRAINABLE, is_flat
from jaxft.core.state import flatten, unflatten

PARAMS_FILE = "peft_params.safetensors"
CONFIG_FILE = "peft_config.json"
FORMAT = "jaxft-peft"
VERSION = 1


class Trainable(NamedTuple):
  """What `load_trainable` returns: flat params, the PeftSpec, the base model name, the method,
  the run's peft options and the model record ({} when the checkpoint has none)."""

  trainable: dict
  spec: PeftSpec
  base_model: str
  method: str
  options: dict = {}
  model: dict = {}


def save_trainable(out_dir, trainable, spec: PeftSpec, base_model: str, *, method: str = "",
                   options: Mapping[str, Any] | None = None,
                   model: Mapping[str, Any] | None = None) -> pathlib.Path:
  """Writes the trainable leaves (flat '/'-keyed dict or nested tree) and the json record.

  base_model: what `from_pretrained` loads the frozen part from (a local HF dir, hub id or asset
  name). options: the peft config the run trained with; model: `model_record(model)`, what
  `load_adapter` rebuilds the model with. Returns out_dir."""
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  flat = dict(trainable) if is_flat(trainable) else flatten(trainable)
  if not flat:
    raise ValueError("nothing to save: the trainable part is empty")
  arrays = {k: np.ascontiguousarray(np.asarray(jax.device_get(v))) for k, v in flat.items()}
  from safetensors.numpy import save_file
  save_file(arrays, str(out / PARAMS_FILE), metadata={"format": FORMAT})
  record = {"format": FORMAT, "version": VERSION, "method": method, "base_model": str(base_model),
            "spec": dataclasses.asdict(spec),
            "params": {k: list(v.shape) for k, v in sorted(arrays.items())},
            "num_params": int(sum(v.size for v in arrays.values()))}
  if options is not None:
    record["options"] = dict(options)
  if model is not None:
    record["model"] = dict(model)
  (out / CONFIG_FILE).write_text(json.dumps(record, indent=2, sort_keys=True))
  return out


def load_trainable(in_dir) -> Trainable:
  """-> Trainable(trainable: flat dict of jnp arrays, spec, base_model, method)."""
  d = pathlib.Path(in_dir)
  cfg_file, params_file = d / CONFIG_FILE, d / PARAMS_FILE
  for f in (cfg_file, params_file):
    if not f.is_file():
      raise FileNotFoundError(f"{f} not found: {d} is not a PEFT checkpoint written by "
                              "jaxft.peft.save_trainable / export(merged=False)")
  record = json.loads(cfg_file.read_text())
  if record.get("format") != FORMAT or record.get("version") != VERSION:
    raise ValueError(f"{cfg_file}: format {record.get('format')!r} version {record.get('version')} "
                     f"is not {FORMAT!r} version {VERSION}")
  known = {f.name for f in dataclasses.fields(PeftSpec)}
  unknown = sorted(set(record["spec"]) - known)
  if unknown:
    raise ValueError(f"{cfg_file}: unknown PeftSpec fields {unknown}; known: {sorted(known)}")
  from safetensors.numpy import load_file
  arrays = load_file(str(params_file))
  shapes = {k: list(v.shape) for k, v in arrays.items()}
  if shapes != record["params"]:
    raise ValueError(f"{params_file} does not hold the parameters {cfg_file} lists")
  return Trainable(trainable={k: jnp.asarray(v) for k, v in arrays.items()},
                   spec=PeftSpec(**record["spec"]), base_model=record["base_model"],
                   method=record["method"], options=record.get("options", {}),
                   model=record.get("model", {}))


def model_record(model) -> dict:
  """What rebuilds `model`'s head on its base checkpoint: head kind, label count and names,
  pooling, compute dtype (json-ready)."""
  head = model.head
  labels = getattr(model.config, "id2label", None) if head is not None else None
  return {"head": head, "num_labels": model.num_labels if head not in (None, "mlm") else None,
          "id2label": {str(k): v for k, v in labels.items()} if labels else None,
          "pooling": model.pooling, "dtype": jnp.dtype(model.module.cfg.dtype).name}


def load_adapter(in_dir, base_model: str | None = None, **from_pretrained_kwargs):
  """-> jaxft Model: the base model (`base_model`, default the recorded one) built with the saved
  PeftSpec and head, every saved leaf put in: the model the adapter was exported from.

  Needs a record with "model" (written by `jaxft export --adapter-only` or export(merged=False)).
  from_pretrained_kwargs override the recorded model options (e.g. dtype, remat)."""
  from jaxft.models import pretrained
  t = load_trainable(in_dir)
  if not t.model:
    raise ValueError(f"{pathlib.Path(in_dir) / CONFIG_FILE} does not record the model's head "
                     "(an older export): build the model yourself, from_pretrained(base_model, "
                     "peft=spec, head=..., num_labels=...), then apply_trainable")
  m = t.model
  kwargs = dict(head=m.get("head"), num_labels=m.get("num_labels"),
                id2label=({int(k): v for k, v in m["id2label"].items()} if m.get("id2label")
                          else None),
                pooling=m.get("pooling"), dtype=m.get("dtype") or "float32")
  kwargs.update(from_pretrained_kwargs)
  with pretrained.restoring():  # the adapter supplies the head: no "newly initialized" warning
    model = pretrained.from_pretrained(base_model or t.base_model, peft=t.spec, **kwargs)
  return model.with_params(apply_trainable(model.params, t.trainable))


def apply_trainable(params, trainable: Mapping[str, Any]):
  """Nested params with the leaves of `trainable` (flat dict) put in; every path must exist with
  the same shape (a checkpoint for another model or spec fails here, naming the leaf)."""
  flat = flatten(params)
  for k, v in trainable.items():
    if k not in flat:
      raise KeyError(f"saved parameter {k!r} is not in the model; build the model with the saved "
                     "PeftSpec and the same base model and head")
    if tuple(flat[k].shape) != tuple(v.shape):
      raise ValueError(f"saved parameter {k!r} has shape {tuple(v.shape)}, the model "
                       f"{tuple(flat[k].shape)}")
    flat[k] = jnp.asarray(v, flat[k].dtype)
  return unflatten(flat)


def peft_part(params, labels: Mapping[str, str] | None = None) -> dict:
  """The small part worth saving: the leaves labelled trainable, or without labels every PEFT leaf
  and the task head."""
  flat = flatten(params)
  if labels is not None:
    return {k: v for k, v in flat.items() if labels.get(k) == TRAINABLE}
  return {k: v for k, v in flat.items() if k.startswith("head/") or re.search(PEFT_LEAF, k)}


def export(model, params, out_dir, merged: bool = True, *, spec: PeftSpec | None = None,
           labels: Mapping[str, str] | None = None, method: str = "",
           base_model: str | None = None,
           options: Mapping[str, Any] | None = None) -> pathlib.Path:
  """Exports a PEFT-trained model.

  merged=True: LoRA / DoRA / (IA)^3 folded into the kernels (`merge`), written as an ordinary HF
  directory by `model.with_params(merged).save_pretrained(out_dir)` (adapters, prefixes and prompts
  cannot merge: error). merged=False: only the trained part (`peft_part(params, labels)`: pass the
  run's labels, else BitFit's biases and other trained pretrained leaves are left out) with the
  spec, the base model name, `options` (the run's peft config) and `model_record(model)`
  (`save_trainable`), which `load_adapter` reads back.
  spec: defaults to the spec the model was built with; base_model: to the model's source path.
  """
  spec = spec if spec is not None else model_spec(model)
  if merged:
    m = model.with_params(merge(params, spec))
    m.save_pretrained(out_dir)
    return pathlib.Path(out_dir)
  base = base_model if base_model is not None else _model_source(model)
  return save_trainable(out_dir, peft_part(params, labels), spec, base, method=method,
                        options=options, model=model_record(model))


def model_spec(model) -> PeftSpec:
  """The PeftSpec a jaxft model was built with."""
  for get in (lambda m: m.peft, lambda m: m.arch.peft, lambda m: m.module.cfg.peft):
    try:
      spec = get(model)
    except AttributeError:
      continue
    if isinstance(spec, PeftSpec):
      return spec
  raise ValueError(f"cannot find the PeftSpec of {type(model).__name__}; pass spec=")


def _model_source(model) -> str:
  for attr in ("name_or_path", "source", "path"):
    value = getattr(model, attr, None)
    if value:
      return str(value)
  cfg = getattr(model, "config", None)
  value = getattr(cfg, "_name_or_path", None) or getattr(cfg, "name_or_path", None)
  if value:
    return str(value)
  raise ValueError(f"cannot tell which checkpoint {type(model).__name__} was loaded from; pass "
                   "base_model=")
