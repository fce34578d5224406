"""Tasks by name: what a dataset is (kind, label space, metrics) and how to load its splits.

A `Task` declares its kind ("classification" | "regression" | "token_classification"), label
names, text columns, metric names and the main metric (early stopping). `load(data_config, splits)`
returns the resolved `TaskInfo` and one `Examples` per split, validated before any compute.

Where a registered task's data come from, first match wins:
  1. `data.data_dir` (local files in the task's usual layout, e.g. GLUE's <dir>/CoLA/dev.tsv),
  2. a packaged default (`jaxft.assets`: mr, bbc_news, wnut16),
  3. <data root>/<task.data_folder> when it exists (GLUE tasks: glue, conll2003, ag_news), the data
     root being $JAXFT_DATA, else ../shared/data (from the working directory, then beside the
     source checkout): `data_root()`,
  4. the Hugging Face hub (`datasets.load_dataset`, parquet data), when the machine is online.
The generic tasks `local` and `local_ner` read `data.train_file` / `validation_file` / `test_file`.
The registry of tasks is `jaxft/data/catalog.py` (filled when it is imported, here); the types and
label encoding are `jaxft/data/examples.py`, re-exported here (`tasks.Examples` etc. keep working).
"""

from __future__ import annotations

import difflib
import os
import pathlib
from typing import Sequence

import numpy as np

from jaxft.data import catalog, readers
from jaxft.data.catalog import register
from jaxft.data.examples import (IGNORE, KINDS, SPLIT_SEED, Examples, HubSpec, Task, TaskInfo,
                                 as_list, cfg_get, check_texts, class_id, encode_labels,
                                 seeded_split)
from jaxft.data.readers import DataError

__all__ = [
    "DataError", "Examples", "HubSpec", "IGNORE", "KINDS", "SPLIT_SEED", "Task", "TaskInfo",
    "as_list", "cfg_get", "check_texts", "class_id", "encode_labels", "file_split", "get", "load",
    "load_hub", "names", "read_file", "register", "seeded_split", "subset_per_class",
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


DATA_ROOT_ENV = "JAXFT_DATA"


def data_root() -> pathlib.Path | None:
  """The folder holding the tasks' data folders (glue/, conll2003/, ag_news/, ...): $JAXFT_DATA when
  set, else the first existing ../shared/data, from the working directory, then beside the source
  checkout; None when there is none."""
  env = os.environ.get(DATA_ROOT_ENV, "")
  if env:
    return pathlib.Path(env).expanduser().absolute()
  for base in (pathlib.Path.cwd(), pathlib.Path(__file__).resolve().parents[2]):
    candidate = (base / ".." / "shared" / "data").resolve()
    if candidate.is_dir():
      return candidate
  return None


def default_data_dir(task: Task) -> pathlib.Path | None:
  """Where `task` reads its files when data.data_dir is unset: its packaged data, else
  <data root>/<task.data_folder> if that exists, else None (the hub)."""
  if task.default_dir is not None:
    return task.default_dir()
  root = data_root()
  if task.data_folder and root is not None and (root / task.data_folder).is_dir():
    return root / task.data_folder
  return None


FILE_SPLIT = "file:"  # an eval split "file:<path>" is a local file in the task's format


def file_split(path) -> str:
  """The split name under which `load` reads the local file `path` (`jaxft eval --file`)."""
  return FILE_SPLIT + str(pathlib.Path(path).expanduser().absolute())


def read_file(info: TaskInfo, data_config, path) -> Examples:
  """A local file in the task's format: CoNLL lines (word ... tag) for token classification, else
  a table (CSV/TSV/JSON/JSONL/parquet) with the task's text columns and a label column
  (data.label_column, default "label") of label names, ids or, for regression, numbers."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise DataError(f"{path}: no such file to evaluate on")
  if info.kind == "token_classification":
    raw = catalog._read_conll_examples(path)
  else:
    cols = readers.read_table(path)
    label_col = cfg_get(data_config, "label_column", "") or "label"
    missing = [c for c in (*info.text_columns, label_col) if c not in cols]
    if missing:
      raise DataError(f"{path}: no column {missing[0]!r}; task {info.name!r} reads the text "
                      f"columns {list(info.text_columns)} and the labels from {label_col!r} "
                      f"(data.label_column); the file has: {', '.join(cols)}")
    raw = Examples(texts=tuple([("" if v is None else str(v)) for v in cols[c]]
                               for c in info.text_columns), labels=cols[label_col], source=str(path))
  ex = encode_labels(raw, info.kind, info.label_names)
  check_texts(ex)
  return ex


def load(data_config, splits: Sequence[str]) -> tuple[TaskInfo, dict[str, Examples]]:
  """(TaskInfo, {split: Examples}) with labels as ids/floats, every split validated. A split named
  `file_split(path)` is the local file `path` read in the task's format (`read_file`)."""
  files = [s for s in splits if s.startswith(FILE_SPLIT)]
  if files:
    rest = [s for s in splits if s not in files]
    info, out = _load(data_config, rest) if rest else (get(data_config.name).info(), {})
    out.update({s: read_file(info, data_config, s[len(FILE_SPLIT):]) for s in files})
    return info, {s: out[s] for s in splits}
  return _load(data_config, splits)


def _load(data_config, splits: Sequence[str]) -> tuple[TaskInfo, dict[str, Examples]]:
  task = get(data_config.name)
  if task.name in catalog.LOADERS:
    return catalog.LOADERS[task.name](task, data_config, splits)
  data_dir = cfg_get(data_config, "data_dir", "")
  if data_dir:
    data_dir = pathlib.Path(data_dir).expanduser()
    if not data_dir.is_dir():
      raise DataError(f"data.data_dir={str(data_dir)!r} is not a directory")
  else:
    data_dir = default_data_dir(task)
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
        "in jaxft/data/catalog.py), or --config.data.name=local with --config.data.train_file=... "
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


