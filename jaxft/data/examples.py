"""What a task's data are, before any tokenizer: the types, label encoding and validation.

`TaskInfo` (what heads, objectives and metrics need), `Examples` (one split, columnar), `Task` and
`HubSpec` (a registered task and where its data live), raw labels -> ids (`encode_labels`), the
empty-text check, and the seeded carving of splits. The registry of tasks is `catalog.py`; lookup
and loading by name is `tasks.py`, which re-exports these names.
"""

from __future__ import annotations

import dataclasses
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
  data_folder: str = ""  # its folder under the data root (jaxft.data.tasks.data_root), e.g. "glue"
  hub: HubSpec | None = None
  notes: str = ""  # said once when the task loads (e.g. "validation carved from train")

  def info(self, label_names=None) -> TaskInfo:
    names = tuple(label_names if label_names is not None else self.label_names)
    return TaskInfo(self.name, self.kind, names, 1 if self.kind == "regression" else len(names),
                    self.metric_names, self.main_metric, self.text_columns)


def cfg_get(cfg, key, default):
  try:
    value = cfg[key]
  except (KeyError, AttributeError):
    return default
  return default if value is None else value


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


def as_list(spec: Any) -> list[str]:
  """'a,b' / ['a', 'b'] / 'a' -> ['a', 'b'] / ['a']."""
  if spec is None:
    return []
  if isinstance(spec, str):
    return [s.strip() for s in spec.split(",") if s.strip()]
  return [str(s) for s in spec]

