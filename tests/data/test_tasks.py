"""Task registry and loaders on the real files: exact counts from the PROVENANCE.md files, carved
splits, local-file validation errors."""

import collections
import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from jaxft.data import readers, tasks
from jaxft.data.readers import DataError


def cfg(**kw):
  d = dict(name="", data_dir="", train_file="", validation_file="", test_file="", text_columns="",
           label_column="label", task_kind="", num_labels=0)
  d.update(kw)
  return ml_collections.ConfigDict(d)


def test_unknown_task_lists_known_and_closest():
  with pytest.raises(KeyError) as e:
    tasks.get("conll2002")
  msg = str(e.value)
  assert "Did you mean 'conll2003'?" in msg
  for name in ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli", "conll2003",
               "wnut16", "mr", "bbc_news", "ag_news", "imdb", "local", "local_ner"):
    assert name in msg


def test_task_declarations():
  assert tasks.get("cola").main_metric == "mcc"
  assert tasks.get("mrpc").main_metric == "f1"
  stsb = tasks.get("stsb").info()
  assert (stsb.kind, stsb.num_labels, stsb.main_metric) == ("regression", 1, "pearson")
  assert tasks.get("conll2003").info().num_labels == 9
  assert tasks.get("wnut16").info().num_labels == 21
  assert tasks.get("mnli").info().label_names == ("entailment", "neutral", "contradiction")


@pytest.mark.parametrize("name,split,n,counts", [
    ("cola", "validation", 1043, {1: 721, 0: 322}),
    ("sst2", "validation", 872, {1: 444, 0: 428}),
    ("mrpc", "validation", 408, {1: 279, 0: 129}),
    ("rte", "validation", 277, {0: 146, 1: 131}),
    ("rte", "train", 2490, {0: 1249, 1: 1241}),
    ("cola", "train", 8551, {1: 6023, 0: 2528}),
    ("mrpc", "train", 3668, {1: 2474, 0: 1194}),
])
def test_glue_counts(shared_data, name, split, n, counts):
  info, out = tasks.load(cfg(name=name, data_dir=str(shared_data / "glue")), [split])
  ex = out[split]
  assert len(ex) == n
  assert dict(collections.Counter(ex.labels)) == counts
  assert len(ex.texts) == len(info.text_columns)


def test_glue_rows_read_verbatim(shared_data):
  _, out = tasks.load(cfg(name="mrpc", data_dir=str(shared_data / "glue")), ["validation", "test"])
  dev = out["validation"]
  # first dev row: an unbalanced quote that a quoting CSV reader would swallow
  assert dev.texts[0][0] == ("He said the foodservice pie business doesn't fit the company's "
                             "long-term growth strategy.")
  assert dev.texts[1][0] == '"The foodservice pie business does not fit our long-term growth ' \
                            'strategy.'
  assert out["test"].labels is None and len(out["test"]) == 1725
  _, out = tasks.load(cfg(name="stsb", data_dir=str(shared_data / "glue")), ["validation"])
  stsb = out["validation"]
  assert len(stsb) == 1500 and stsb.labels[:2] == [5.0, 4.75]
  assert stsb.texts[0][0] == "A man with a hard hat is dancing."
  _, out = tasks.load(cfg(name="cola", data_dir=str(shared_data / "glue")), ["test"])
  assert len(out["test"]) == 1063  # CoLA test has a header line, train/dev do not


def test_conll2003_counts_and_iob1_entities(shared_data):
  from seqeval.metrics.sequence_labeling import get_entities
  info, out = tasks.load(cfg(name="conll2003", data_dir=str(shared_data / "conll2003")),
                         ["validation"])
  ex = out["validation"]
  assert len(ex) == 3250  # 3,466 minus the 216 -DOCSTART- lines
  assert sum(len(w) for w in ex.words) == 51362
  tags = [[info.label_names[t] for t in seq] for seq in ex.labels]
  types = collections.Counter(t for seq in tags for t, _, _ in get_entities(seq))
  assert types == {"PER": 1842, "LOC": 1837, "ORG": 1341, "MISC": 922}  # the official counts
  assert ex.words[0] == ["CRICKET", "-", "LEICESTERSHIRE", "TAKE", "OVER", "AT", "TOP", "AFTER",
                         "INNINGS", "VICTORY", "."]


def test_conll2003_test_split_and_a_file_in_its_format(shared_data, tmp_path):
  """The test split is eng.testb where the folder has it (`jaxft eval --split test`); any CoNLL
  file scores as `jaxft eval --file` with the task's tag set."""
  head = "\n".join((shared_data / "conll2003" / "eng.testa").read_text().split("\n")[:200])
  for name in ("eng.train", "eng.testa", "eng.testb"):
    (tmp_path / name).write_text(head)
  info, out = tasks.load(cfg(name="conll2003", data_dir=str(tmp_path)),
                         ["test", tasks.file_split(tmp_path / "eng.testb")])
  assert out["test"].source.endswith("eng.testb") and len(out["test"]) > 0
  assert out[tasks.file_split(tmp_path / "eng.testb")].labels == out["test"].labels
  assert info.num_labels == 9


def test_packaged_and_carved_splits(shared_data):
  sizes = {}
  for name, data_dir in (("mr", ""), ("mr", str(shared_data / "mr")), ("bbc_news", ""),
                         ("wnut16", ""), ("ag_news", str(shared_data / "ag_news"))):
    _, out = tasks.load(cfg(name=name, data_dir=data_dir), ["train", "validation"])
    sizes[name, bool(data_dir)] = (len(out["train"]), len(out["validation"]))
    assert "seeded" in out["validation"].source
  assert sizes == {("mr", False): (9545, 1060), ("mr", True): (9596, 1066),
                   ("bbc_news", False): (1780, 445), ("wnut16", False): (2155, 239),
                   ("ag_news", True): (6080, 1520)}
  tr, va = tasks.seeded_split(2225, 0.2)  # disjoint, covering, in permuted order
  assert len(set(tr) | set(va)) == 2225 and not set(tr) & set(va)
  assert list(tr) != sorted(tr) and list(va) != sorted(va)
  # the movie-review file is sorted by label; the first rows of each carved split are mixed
  _, mr = tasks.load(cfg(name="mr"), ["train", "validation"])
  for split in mr.values():
    assert 0.35 < np.mean(split.labels[:200]) < 0.65
  # a second load gives the same split (fixed seed)
  _, again = tasks.load(cfg(name="bbc_news"), ["validation"])
  _, first = tasks.load(cfg(name="bbc_news"), ["validation"])
  assert again["validation"].texts == first["validation"].texts


def test_ag_news_labels_and_classes(shared_data):
  _, out = tasks.load(cfg(name="ag_news", data_dir=str(shared_data / "ag_news")),
                      ["train", "validation"])
  both = collections.Counter(out["train"].labels) + collections.Counter(out["validation"].labels)
  assert both == {0: 1900, 1: 1900, 2: 1900, 3: 1900}  # 1,900 per class in test.csv
  first = "Fears for T N pension after talks Unions"  # test.csv's first row, in one of the splits
  assert any(t.startswith(first) for t in out["train"].texts[0] + out["validation"].texts[0])


def test_mr_latin1_rt_polarity(shared_data):
  _, out = tasks.load(cfg(name="mr", data_dir=str(shared_data / "mr")), ["train", "validation"])
  texts = out["train"].texts[0] + out["validation"].texts[0]
  labels = out["train"].labels + out["validation"].labels
  assert collections.Counter(labels) == {0: 5331, 1: 5331}
  assert any("\xe9" in t for t in texts)  # latin-1 e-acute decoded, not mangled


def test_hub_failure_tells_to_pass_local_files(tmp_path):
  code = ("import ml_collections as m; from jaxft.data import tasks\n"
          "try:\n  tasks.load(m.ConfigDict({'name': 'imdb', 'data_dir': ''}), ['train'])\n"
          "except tasks.DataError as e: print('ERR', e)\n")
  env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path))
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=120).stdout
  assert out.startswith("ERR could not load task 'imdb'")
  assert "data.data_dir" in out and "data.name=local" in out


def _write_sst2_subset(shared_data, tmp_path, n=60):
  _, rows = readers.read_delimited(shared_data / "glue" / "SST-2" / "dev.tsv", delimiter="\t",
                                   header=True, quoting=False)
  rows = rows[:n]
  return rows


@pytest.mark.parametrize("fmt", ["csv", "tsv", "json", "jsonl", "parquet"])
def test_local_formats_agree(shared_data, tmp_path, fmt):
  rows = _write_sst2_subset(shared_data, tmp_path)
  records = [{"sentence": s, "label": int(l)} for s, l in rows]
  path = tmp_path / f"train.{fmt}"
  if fmt in ("csv", "tsv"):
    import csv
    with open(path, "w", newline="", encoding="utf-8") as f:
      w = csv.writer(f, delimiter="," if fmt == "csv" else "\t",
                     quoting=csv.QUOTE_MINIMAL if fmt == "csv" else csv.QUOTE_NONE,
                     escapechar=None if fmt == "csv" else "\\")
      w.writerow(["sentence", "label"])
      w.writerows([[r["sentence"], r["label"]] for r in records])
  elif fmt == "json":
    path.write_text(json.dumps(records))
  elif fmt == "jsonl":
    path.write_text("\n".join(json.dumps(r) for r in records))
  else:
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(records), path)
  info, out = tasks.load(cfg(name="local", train_file=str(path), validation_file=str(path),
                             text_columns="sentence"), ["train", "validation"])
  assert info.label_names == ("0", "1") and info.kind == "classification"
  assert out["train"].texts[0] == [r["sentence"] for r in records]
  assert out["train"].labels == [r["label"] for r in records]
  assert info.main_metric == "accuracy" and "f1" in info.metric_names


def _csv(path, header, rows):
  import csv
  with open(path, "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(header)
    w.writerows(rows)
  return str(path)


def test_local_errors(shared_data, tmp_path):
  rows = _write_sst2_subset(shared_data, tmp_path, 20)
  train = _csv(tmp_path / "train.csv", ["sentence", "label"], [[s, "pos" if l == "1" else "neg"]
                                                               for s, l in rows])
  with pytest.raises(DataError, match=r"no column 'text'; available columns: sentence, label"):
    tasks.load(cfg(name="local", train_file=train, text_columns="text"), ["train"])
  with pytest.raises(DataError, match=r"no column 'y'; available columns: sentence, label"):
    tasks.load(cfg(name="local", train_file=train, text_columns="sentence", label_column="y"),
               ["train"])
  bad = _csv(tmp_path / "dev.csv", ["sentence", "label"],
             [[s, "neg"] for s, _ in rows[:3]] + [["a fine film", "neutral"]])
  with pytest.raises(DataError, match=r"dev.csv, row 3: label 'neutral' is not in the label set "
                                      r"\['neg', 'pos'\]"):
    tasks.load(cfg(name="local", train_file=train, validation_file=bad, text_columns="sentence"),
               ["train", "validation"])
  empty = _csv(tmp_path / "empty.csv", ["sentence", "label"],
               [[s, "neg"] for s, _ in rows[:5]] + [["  ", "pos"]])
  with pytest.raises(DataError, match=r"empty text in row 5"):
    tasks.load(cfg(name="local", train_file=empty, text_columns="sentence"), ["train"])
  with pytest.raises(DataError, match=r"data.num_labels=3 but the labels have 2 distinct values"):
    tasks.load(cfg(name="local", train_file=train, text_columns="sentence", num_labels=3),
               ["train"])
  ints = _csv(tmp_path / "ints.csv", ["sentence", "label"], [[s, l] for s, l in rows[:4]] +
              [["x", "2"]])
  with pytest.raises(DataError, match=r"row 4 has label 2, outside 0..1 \(data.num_labels=2\)"):
    tasks.load(cfg(name="local", train_file=ints, text_columns="sentence", num_labels=2),
               ["train"])
  latin = tmp_path / "latin.csv"
  latin.write_bytes("sentence,label\ncaf\xe9 society,1\n".encode("latin-1"))
  with pytest.raises(DataError, match=r"latin.csv is not valid UTF-8 .*line 2.*cp1252.*iconv"):
    tasks.load(cfg(name="local", train_file=str(latin), text_columns="sentence"), ["train"])
  with pytest.raises(DataError, match=r"unknown file format '.xlsx'.*supported: .csv, .json, "
                                      r".jsonl, .parquet, .tsv"):
    tasks.load(cfg(name="local", train_file=str(tmp_path / "t.xlsx"), text_columns="sentence"),
               ["train"])
  with pytest.raises(DataError, match=r"needs --config.data.validation_file"):
    tasks.load(cfg(name="local", train_file=train, text_columns="sentence"), ["validation"])
  with pytest.raises(DataError, match="does not exist"):
    tasks.load(cfg(name="local", train_file=str(tmp_path / "nope.csv")), ["train"])


def test_local_regression_and_pairs(shared_data, tmp_path):
  _, rows = readers.read_delimited(shared_data / "glue" / "STS-B" / "dev.tsv", delimiter="\t",
                                   header=True, quoting=False)
  path = _csv(tmp_path / "sts.csv", ["a", "b", "score"], [[r[7], r[8], r[9]] for r in rows[:30]])
  info, out = tasks.load(cfg(name="local", train_file=path, text_columns="a,b",
                             label_column="score", task_kind="regression"), ["train"])
  assert (info.kind, info.num_labels, info.main_metric) == ("regression", 1, "pearson")
  assert out["train"].labels[:2] == [5.0, 4.75] and len(out["train"].texts) == 2
  with pytest.raises(DataError, match="regression label 'high' is not a finite number"):
    tasks.load(cfg(name="local", train_file=_csv(tmp_path / "x.csv", ["a", "score"],
                                                 [["ok", "1.0"], ["fine", "high"]]),
                   text_columns="a", label_column="score", task_kind="regression"), ["train"])


def test_local_ner_from_real_conll_subset(shared_data, tmp_path):
  lines = (shared_data / "conll2003" / "eng.testa").read_text().split("\n")[:400]
  path = tmp_path / "dev.conll"
  path.write_text("\n".join(lines) + "\n")
  info, out = tasks.load(cfg(name="local_ner", train_file=str(path), validation_file=str(path)),
                         ["train", "validation"])
  assert info.kind == "token_classification" and info.main_metric == "entity_f1"
  assert info.label_names[0] == "O"
  assert set(info.label_names) == {t for _, tags in readers.read_conll(path) for t in tags}
  assert out["train"].words[0][0] == "CRICKET"
  with pytest.raises(DataError, match="local_ner reads CoNLL-format files"):
    tasks.load(cfg(name="local_ner", train_file=str(tmp_path / "x.csv")), ["train"])
