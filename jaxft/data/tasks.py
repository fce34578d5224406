"""Tasks by name: what a dataset is (kind, label space, metrics) and how to load its splits.

A `Task` declares its kind ("classification" | "regression" | "token_classification"), label
names, text columns, metric names and the main metric (early stopping). `load(data_config, splits)`
returns the resolved `TaskInfo` and one `Examples` per split, validated before any compute.

Where a registered task's data come from, first match wins:
  1. `data.data_dir` (local files in the task's usual layout, e.g. GLUE's <dir>/CoLA/dev.tsv),
  2. a packaged default (`jaxft.assets`: mr, bbc_news, wnut16),
  3. the Hugging Face hub (`datasets.load_dataset`, parquet data), when the machine is online.
The generic tasks `local` and `local_ner` read `data.train_file` / `validation_file` / `test_file`.
The catalog of registered tasks is `jaxft/data/catalog.py`; its loaders register on import.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import pathlib
from typing import Any, Callable, Sequence

import numpy as np

from jaxft.data.readers import DataError

KINDS = ("classification", "regression", "token_classification")
IGNORE = -100
SPLIT_SEED = 0  # seed of every carved train/validation split (mr, bbc_news, wnut16, ag_news)


@dataclasses.dataclass(frozen=True)
class TaskInfo:
  """What the model head, objectives and metrics need to know about a task."""

  name: str
  kind: str
  label_names: tuple[str, ...]
  num_labels: int  # 1 for regression
  metric_names: tuple[str, ...]
  main_metric: str  # higher is better for every metric jaxft selects on
  text_columns: tuple[str, ...] = ()


@dataclasses.dataclass
class Examples:
  """One split, columnar.

  texts: sequence tasks: a tuple of 1 (single sentences) or 2 (pairs) equal-length lists of str.
  words: token tasks: list of word lists (one per sentence); None otherwise.
  labels: int class ids [N], float targets [N], per-word tag id lists (token tasks), or None when
    the split has no labels (e.g. GLUE test).
  source: where the rows came from (for messages).
  """

  texts: tuple[list[str], ...] = ()
  labels: list | None = None
  words: list[list[str]] | None = None
  source: str = ""

  def __len__(self) -> int:
    return len(self.words) if self.words is not None else len(self.texts[0])

  def select(self, indices: Sequence[int]) -> "Examples":
    idx = [int(i) for i in indices]
    return Examples(
        texts=tuple([col[i] for i in idx] for col in self.texts),
        labels=None if self.labels is None else [self.labels[i] for i in idx],
        words=None if self.words is None else [self.words[i] for i in idx],
        source=self.source)

  def fingerprint(self) -> str:
    """sha256 of the content (texts/words and labels), the tokenization cache key's data part."""
    h = hashlib.sha256()
    h.update(json.dumps({"texts": self.texts, "words": self.words, "labels": self.labels},
                        ensure_ascii=False, separators=(",", ":")).encode())
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class HubSpec:
  """A hub dataset: load_dataset(path, config, split=splits.get(s, s), revision=revision)."""

  path: str
  config: str | None = None
  text_columns: tuple[str, ...] = ("text",)
  label_column: str = "label"
  splits: tuple[tuple[str, str], ...] = ()  # our split name -> the hub's
  revision: str | None = None


@dataclasses.dataclass(frozen=True)
class Task:
  """A registered task. read_local(data_dir, split) -> Examples with raw labels (strings or ints);
  default_dir() -> packaged data folder (or None); hub: where to find it online."""

  name: str
  kind: str
  label_names: tuple[str, ...]
  metric_names: tuple[str, ...]
  main_metric: str
  text_columns: tuple[str, ...] = ("text",)
  description: str = ""
  read_local: Callable[[pathlib.Path, str], Examples] | None = None
  default_dir: Callable[[], pathlib.Path] | None = None
  hub: HubSpec | None = None
  notes: str = ""  # said once when the task loads (e.g. "validation carved from train")

  def info(self, label_names=None) -> TaskInfo:
    names = tuple(label_names if label_names is not None else self.label_names)
    return TaskInfo(self.name, self.kind, names, 1 if self.kind == "regression" else len(names),
                    self.metric_names, self.main_metric, self.text_columns)


_REGISTRY: dict[str, Task] = {}
_CUSTOM: dict[str, Callable] = {}  # generic tasks with their own load(data_config, splits)


def register(task: Task, load_fn: Callable | None = None) -> Task:
  if task.name in _REGISTRY:
    raise ValueError(f"task {task.name!r} registered twice")
  if task.kind not in KINDS:
    raise ValueError(f"task {task.name!r}: kind must be one of {KINDS}, got {task.kind!r}")
  if task.main_metric not in task.metric_names:
    raise ValueError(f"task {task.name!r}: main metric {task.main_metric!r} not in metric_names")
  _REGISTRY[task.name] = task
  if load_fn is not None:
    _CUSTOM[task.name] = load_fn
  return task


def names() -> list[str]:
  _import_catalog()
  return sorted(_REGISTRY)


def get(name: str) -> Task:
  """The task registered under `name`; an unknown name lists the known ones and the closest."""
  _import_catalog()
  if name not in _REGISTRY:
    close = difflib.get_close_matches(name.lower(), _REGISTRY, n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise KeyError(f"unknown task {name!r}.{hint} Known tasks: {', '.join(names())}")
  return _REGISTRY[name]


def _import_catalog():
  import jaxft.data.catalog  # noqa: F401  (registers the tasks)


def load(data_config, splits: Sequence[str]) -> tuple[TaskInfo, dict[str, Examples]]:
  """(TaskInfo, {split: Examples}) with labels as ids/floats, every split validated."""
  task = get(data_config.name)
  if task.name in _CUSTOM:
    return _CUSTOM[task.name](task, data_config, splits)
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


def cfg_get(cfg, key, default):
  try:
    value = cfg[key]
  except (KeyError, AttributeError):
    return default
  return default if value is None else value


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


def class_id(value, label_names: Sequence[str], where: str) -> int:
  """A raw label (a label name, or an int / int-string index) -> class id; else a DataError."""
  if isinstance(value, str):
    if value in label_names:
      return label_names.index(value)
    s = value.strip()
    if s in label_names:
      return label_names.index(s)
    if s.lstrip("-").isdigit():
      value = int(s)
  if isinstance(value, (bool, float)) and str(value) in label_names:
    # JSON true/false or 0.5 as class labels: their names are str(value) (never an index).
    return label_names.index(str(value))
  if isinstance(value, float) and value.is_integer():
    value = int(value)
  if isinstance(value, (int, np.integer)) and not isinstance(value, bool) \
      and 0 <= value < len(label_names):
    return int(value)
  raise DataError(f"{where}: label {value!r} is not in the label set "
                  f"{list(label_names)} (or an index 0..{len(label_names) - 1})")


def encode_labels(ex: Examples, kind: str, label_names: Sequence[str]) -> Examples:
  """Raw labels -> class ids / floats / per-word tag ids, with the offending row in any error."""
  if ex.labels is None:
    return ex
  if len(ex.labels) != len(ex):
    raise DataError(f"{ex.source}: {len(ex.labels)} labels for {len(ex)} examples")
  if kind == "classification":
    fast = {**{str(i): i for i in range(len(label_names))}, **{n: i for i, n in
                                                                enumerate(label_names)}}
    labels = [fast[v] if isinstance(v, str) and v in fast else
              class_id(v, label_names, f"{ex.source}, row {i}") for i, v in enumerate(ex.labels)]
  elif kind == "regression":
    labels = []
    for i, v in enumerate(ex.labels):
      try:
        f = float(v)
      except (TypeError, ValueError):
        f = math.nan
      if not math.isfinite(f):
        raise DataError(f"{ex.source}, row {i}: regression label {v!r} is not a finite number")
      labels.append(f)
  else:
    labels = []
    for i, (words, tags) in enumerate(zip(ex.words, ex.labels)):
      if len(words) != len(tags):
        raise DataError(f"{ex.source}, sentence {i}: {len(words)} words but {len(tags)} tags")
      labels.append([class_id(t, label_names, f"{ex.source}, sentence {i}") for t in tags])
  return dataclasses.replace(ex, labels=labels)


def check_texts(ex: Examples) -> None:
  """Every text (or sentence) must be non-empty: an empty one is [CLS][SEP] and teaches nothing."""
  if ex.words is not None:
    for i, w in enumerate(ex.words):
      if not w:
        raise DataError(f"{ex.source}: sentence {i} has no words")
    return
  for c, col in enumerate(ex.texts):
    for i, t in enumerate(col):
      if not isinstance(t, str) or not t.strip():
        raise DataError(f"{ex.source}: empty text in row {i}"
                        + (f" (text column {c})" if len(ex.texts) > 1 else "")
                        + f": {t!r}. Fix: drop or fill that row.")


def seeded_split(n: int, heldout_fraction: float, seed: int = SPLIT_SEED):
  """(train indices, held-out indices) of a numpy default_rng(seed) permutation; the first
  round(n * fraction) are held out. Both parts stay in permuted order, so that the first rows
  (data.max_train_examples / max_eval_examples) are a random sample even of a file sorted by
  label, as the movie-review file is."""
  perm = np.random.default_rng(seed).permutation(n)
  k = int(round(n * heldout_fraction))
  return perm[k:], perm[:k]


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


def as_list(spec: Any) -> list[str]:
  """'a,b' / ['a', 'b'] / 'a' -> ['a', 'b'] / ['a']."""
  if spec is None:
    return []
  if isinstance(spec, str):
    return [s.strip() for s in spec.split(",") if s.strip()]
  return [str(s) for s in spec]
