"""Tasks by name: what a dataset is (kind, label space, metrics) and how to load its splits.

A `Task` declares its kind ("classification" | "regression" | "token_classification"), label
names, text columns, metric names and the main metric (early stopping). `load(data_config, splits)`
returns the resolved `TaskInfo` and one `Examples` per split, validated before any compute.

Where a registered task's data come from, first match wins:
  1. `data.data_dir` (local files in the task's usual layout, e.g. GLUE's <dir>/CoLA/dev.tsv),
  2. a packaged default (`jaxft.assets`: mr, bbc_news, wnut16),
  3. the Hugging Face hub (`datasets.load_dataset`, parquet data), when the machine is online.
The generic tasks `local` and `local_ner` read `data.train_file` / `validation_file` / `test_file`.
The registry of tasks is `jaxft/data/catalog.py` (filled when it is imported, here); the types and
label encoding are `jaxft/data/examples.py`, re-exported here (`tasks.Examples` etc. keep working).
"""

from __future__ import annotations

import difflib
import pathlib
from typing import Sequence

import numpy as np

from jaxft.data import catalog
from jaxft.data.catalog import register
from jaxft.data.examples import (IGNORE, KINDS, SPLIT_SEED, Examples, HubSpec, Task, TaskInfo,
                                 as_list, cfg_get, check_texts, class_id, encode_labels,
                                 seeded_split)
from jaxft.data.readers import DataError

__all__ = [
    "DataError", "Examples", "HubSpec", "IGNORE", "KINDS", "SPLIT_SEED", "Task", "TaskInfo",
    "as_list", "cfg_get", "check_texts", "class_id", "encode_labels", "get", "load", "load_hub",
    "names", "register", "seeded_split", "subset_per_class",
]


def names() -> list[str]:
  return sorted(catalog.TASKS)


def get(name: str) -> Task:
  """The task registered under `name`; an unknown name lists the known ones and the closest."""
  if name not in catalog.TASKS:
    close = difflib.get_close_matches(name.lower(), catalog.TASKS, n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise KeyError(f"unknown task {name!r}.{hint} Known tasks: {', '.join(names())}")
  return catalog.TASKS[name]


def load(data_config, splits: Sequence[str]) -> tuple[TaskInfo, dict[str, Examples]]:
  """(TaskInfo, {split: Examples}) with labels as ids/floats, every split validated."""
  task = get(data_config.name)
  if task.name in catalog.LOADERS:
    return catalog.LOADERS[task.name](task, data_config, splits)
  data_dir = cfg_get(data_config, "data_dir", "")
  if data_dir:
    data_dir = pathlib.Path(data_dir).expanduser()
    if not data_dir.is_dir():
      raise DataError(f"data.data_dir={str(data_dir)!r} is not a directory")
  elif task.default_dir is not None:
    data_dir = task.default_dir()
  out = {}
  for split in splits:
    if data_dir:
      if task.read_local is None:
        raise DataError(f"task {task.name!r} can only be loaded from the Hugging Face hub "
                        f"({task.hub.path}); unset data.data_dir, or use data.name=local with "
                        "data.train_file / data.validation_file")
      raw = task.read_local(pathlib.Path(data_dir), split)
    else:
      raw = load_hub(task, split)
    out[split] = encode_labels(raw, task.kind, task.label_names)
    check_texts(out[split])
  return task.info(), out


def load_hub(task: Task, split: str) -> Examples:
  """One split from the hub via datasets.load_dataset; offline failures become a DataError that
  tells the user to pass local files."""
  spec = task.hub
  if spec is None:
    raise DataError(f"task {task.name!r} has no hub source; pass data.data_dir=<folder>")
  hub_split = dict(spec.splits).get(split, split)
  where = spec.path + (f" ({spec.config})" if spec.config else "")
  try:
    import datasets
    ds = datasets.load_dataset(spec.path, spec.config, split=hub_split, revision=spec.revision)
  except Exception as e:  # connection errors, missing splits, hub outages: all need the same fix
    raise DataError(
        f"could not load task {task.name!r} split {split!r} from the Hugging Face hub ({where}, "
        f"split {hub_split!r}): {type(e).__name__}: {str(e)[:300]}\nFix: offline machines pass "
        f"local files: --config.data.data_dir=<folder in the task's layout> (see the task table "
        "in the README), or --config.data.name=local with --config.data.train_file=... "
        "--config.data.validation_file=...") from None
  cols = ds.column_names
  for c in spec.text_columns + (spec.label_column,):
    if c not in cols:
      raise DataError(f"hub dataset {where} has no column {c!r}; columns: {', '.join(cols)}")
  data = ds.to_dict()
  labels = data[spec.label_column]
  if all(isinstance(v, int) and v < 0 for v in labels) or (labels and labels[0] == -1):
    labels = None  # hub test splits mark missing labels with -1
  source = f"hub:{where}:{hub_split}"
  if task.kind == "token_classification":
    return Examples(words=data[spec.text_columns[0]], labels=labels, source=source)
  return Examples(texts=tuple(data[c] for c in spec.text_columns), labels=labels, source=source)


def subset_per_class(labels: Sequence[int], k: int, num_labels: int, seed: int):
  """(labeled indices, the rest), k per class chosen by default_rng([seed, 7919]); sorted."""
  labels = np.asarray(labels)
  rng = np.random.default_rng([seed, 7919])
  chosen = []
  for c in range(num_labels):
    members = np.flatnonzero(labels == c)
    if len(members) < k:
      raise DataError(f"data.labeled_per_class={k} but class {c} has only {len(members)} training "
                      "examples. Fix: lower data.labeled_per_class.")
    chosen.append(rng.choice(members, size=k, replace=False))
  labeled = np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)
  rest = np.setdiff1d(np.arange(len(labels)), labeled)
  return labeled, rest


