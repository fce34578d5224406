"""Hugging Face checkpoints <-> jaxft parameter trees: names, layouts, and weight files.

Names: a Flax path ("backbone", "encoder", "layer_3", "attention", "self", "query", "kernel") is the
HF key "<prefix>.encoder.layer.3.attention.self.query.weight": "layer_N" -> "layer.N" (but
"layers/layer_N" -> "layers.N", a ModuleList named layers as ModernBERT's), leaves
kernel/embedding/scale -> weight, bias -> bias, raw parameters (ViT cls_token,
position_embeddings) keep their name. Backbone keys carry the task class's base_model_prefix
("bert.") when a head is present; head keys have none. Layouts: torch Linear weight [out, in] is
the transpose of a Flax kernel [in, out], a Conv1d weight [out, in, k] that of Flax [k, in, out];
a Conv2d weight [out, in, kh, kw] is Flax [kh, kw, in, out]. Files: model.safetensors (read here
without torch, bf16 through ml_dtypes), sharded *.safetensors.index.json, or pytorch_model.bin
(needs torch).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import struct
from typing import Iterable

import ml_dtypes
import numpy as np

PEFT_LEAF = re.compile(r"^(lora_a|lora_b|dora_m|ia3|adapter_\w+|prefix_key|prefix_value|prompt)$")
_LAYER = re.compile(r"^layer_(\d+)$")
_LEAF_NAMES = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}
# Non-persistent torch buffers some older checkpoints still carry; never parameters.
_BUFFERS = re.compile(r"(^|\.)(position_ids|token_type_ids)$")
# Decoder weights tied to the word embeddings (and the decoder bias tied to the head's bias).
TIED_DECODER_KEYS = frozenset({
    "cls.predictions.decoder.weight", "cls.predictions.decoder.bias", "lm_head.decoder.weight",
    "lm_head.decoder.bias", "vocab_projector.weight", "generator_lm_head.weight",
    "decoder.weight"})
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")

_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
              "BOOL": np.bool_}


def is_peft_path(path: Iterable[str]) -> bool:
  return any(PEFT_LEAF.match(p) for p in path)


def hf_name(path: tuple, prefix: str = "") -> str:
  """Flax path (starting with "backbone" or "head") -> HF state-dict key."""
  mods = []
  for p in path[1:-1]:
    if mods and mods[-1] == "layers" and _LAYER.match(p):
      mods.append(_LAYER.match(p).group(1))
    else:
      mods.append(_LAYER.sub(r"layer.\1", p))
  leaf = _LEAF_NAMES.get(path[-1], path[-1])
  key = ".".join(mods + [leaf])
  return f"{prefix}.{key}" if prefix and path[0] == "backbone" else key


def to_hf_layout(leaf: str, x: np.ndarray) -> np.ndarray:
  if leaf == "kernel" and x.ndim in (2, 3):  # Linear; Conv1d [k, in, out] <-> [out, in, k]
    return x.T
  if leaf == "kernel" and x.ndim == 4:
    return x.transpose(3, 2, 0, 1)
  return x


def from_hf_layout(leaf: str, x: np.ndarray) -> np.ndarray:
  if leaf == "kernel" and x.ndim in (2, 3):
    return x.T
  if leaf == "kernel" and x.ndim == 4:
    return x.transpose(2, 3, 1, 0)
  return x


# ----------------------------------------------------------------------------- reading files


def read_safetensors(file) -> dict[str, np.ndarray]:
  """All tensors of one .safetensors file as numpy arrays (memory-mapped, read-only)."""
  file = pathlib.Path(file)
  with open(file, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(n))
  raw = np.memmap(file, dtype=np.uint8, mode="r", offset=8 + n)
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in _ST_DTYPES:
      raise ValueError(f"{file}: tensor {name} has unsupported dtype {info['dtype']}")
    start, end = info["data_offsets"]
    out[name] = raw[start:end].view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])
  return out


def _read_torch_bin(file) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError as e:
    raise ImportError(f"{file} is a PyTorch pickle; reading it needs torch (pip install torch), "
                      "or convert the checkpoint to model.safetensors") from e
  state = torch.load(file, map_location="cpu", weights_only=True)
  return {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in state.items()}


def read_state_dict(model_dir) -> dict[str, np.ndarray]:
  """The checkpoint of an HF model directory: safetensors first, then pytorch_model.bin."""
  d = pathlib.Path(model_dir)
  if (d / "model.safetensors").is_file():
    return read_safetensors(d / "model.safetensors")
  for index, reader in (("model.safetensors.index.json", read_safetensors),
                        ("pytorch_model.bin.index.json", _read_torch_bin)):
    if (d / index).is_file():
      shards = sorted(set(json.loads((d / index).read_text())["weight_map"].values()))
      state = {}
      for shard in shards:
        state.update(reader(d / shard))
      return state
  if (d / "pytorch_model.bin").is_file():
    return _read_torch_bin(d / "pytorch_model.bin")
  raise FileNotFoundError(f"no weights in {d}: expected one of {', '.join(WEIGHT_FILES)}. "
                          "Download the full model directory (or `jaxft assets fetch <name>`).")


def write_safetensors(tensors: dict[str, np.ndarray], file) -> None:
  """Writes a PyTorch-loadable model.safetensors (metadata format=pt)."""
  from safetensors.numpy import save_file
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(file),
            metadata={"format": "pt"})


# ----------------------------------------------------------------------------- name mapping


@dataclasses.dataclass
class LoadingInfo:
  """What from_pretrained did, like transformers' loading_info.

  missing: HF keys the model expects that the checkpoint lacks (freshly initialised);
  unexpected: checkpoint keys nothing used; mismatched: (key, checkpoint shape, model shape) of head
  weights re-initialised because the label count differs; added_by_peft: Flax paths of PEFT
  parameters (freshly initialised, not "missing")."""

  missing: list = dataclasses.field(default_factory=list)
  unexpected: list = dataclasses.field(default_factory=list)
  mismatched: list = dataclasses.field(default_factory=list)
  added_by_peft: list = dataclasses.field(default_factory=list)


def _hf_shape(leaf: str, shape) -> tuple:
  return tuple(to_hf_layout(leaf, np.empty(shape, np.uint8)).shape)


def load_params(flat_init: dict, state: dict, *, base_prefix: str, with_prefix: bool,
                load_head: bool, num_labels: int, tied_decoder: bool):
  """Fills `flat_init` ({path tuple: array or ShapeDtypeStruct}) from the HF `state`; entries
  the checkpoint does not provide keep their `flat_init` value. Returns (flat, LoadingInfo).

  Backbone keys are looked up with and without `base_prefix`, so a bare BertModel checkpoint feeds
  a classifier and vice versa. Head keys are read only when `load_head` (the checkpoint's head is
  of the requested kind). A head tensor whose shape differs only in the label axis (size
  `num_labels` in our model) is re-initialised and listed in `mismatched`; any other shape
  difference is an error naming the parameter and both shapes.
  """
  info = LoadingInfo()
  used, out = set(), {}
  for path, init in flat_init.items():
    if is_peft_path(path):
      info.added_by_peft.append("/".join(path))
      out[path] = init
      continue
    name = hf_name(path, base_prefix if with_prefix else "")
    if path[0] == "backbone":
      candidates = [name, hf_name(path, "" if with_prefix else base_prefix)]
    else:
      candidates = [name] if load_head else []
    key = next((c for c in candidates if c in state), None)
    if key is None:
      info.missing.append(name)
      out[path] = init
      continue
    used.add(key)
    value = from_hf_layout(path[-1], np.asarray(state[key]))
    if value.shape != tuple(init.shape):
      label_axis = init.shape[-1] == num_labels if init.ndim else False
      if path[0] == "head" and label_axis and value.ndim == init.ndim:
        info.mismatched.append((key, tuple(state[key].shape), _hf_shape(path[-1], init.shape)))
        out[path] = init
        continue
      raise ValueError(f"checkpoint tensor {key} has shape {tuple(state[key].shape)} but the model "
                       f"expects {_hf_shape(path[-1], init.shape)} (Flax {'/'.join(path)} {tuple(init.shape)}); the checkpoint does not "
                       "fit this config")
    out[path] = value.astype(np.dtype(init.dtype))
  for key in state:
    if key in used or _BUFFERS.search(key) or (tied_decoder and key in TIED_DECODER_KEYS):
      continue
    info.unexpected.append(key)
  return out, info


def export_params(flat: dict, *, base_prefix: str, with_prefix: bool) -> dict[str, np.ndarray]:
  """{path tuple: array} -> HF state dict (float32, torch layouts). PEFT leaves must be merged
  first (the caller checks)."""
  return {hf_name(path, base_prefix if with_prefix else ""):
          to_hf_layout(path[-1], np.asarray(v, np.float32)) for path, v in flat.items()}
