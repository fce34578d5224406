"""Readers for local data files: tables (CSV/TSV/JSON/JSONL/parquet), CoNLL token files, plain text.

Every reader returns plain Python columns (dict column name -> list) or sentence lists, and fails
with a `DataError` that names the file and the fix: a file that is not UTF-8 (with the encoding it
probably is), an unknown extension, a ragged row. TSV files are read like GLUE's own processors:
`csv.reader(delimiter="\\t", quotechar=None)` (QUOTE_NONE), because GLUE text holds unbalanced
quotes that a quoting reader would merge across lines.
"""

from __future__ import annotations

import csv
import json
import pathlib
import sys

TABLE_FORMATS = {".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "jsonl",
                 ".parquet": "parquet"}

# Some GLUE fields (QQP, MNLI) are longer than csv's default 128 KiB limit.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


class DataError(ValueError):
  """Bad or missing input data; the message names the file/column/row and how to fix it."""


def read_text(path, encoding: str = "utf-8-sig") -> str:
  """The file's text. For UTF-8 (the default) a byte-order mark is dropped and a decoding failure
  becomes a DataError naming the file, the line, and the encoding the bytes probably are."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise DataError(f"data file {str(path)!r} does not exist (or is not a file)")
  raw = path.read_bytes()
  try:
    return raw.decode(encoding)
  except UnicodeDecodeError as e:
    line = raw[:e.start].count(b"\n") + 1
    guess = _guess_encoding(raw)
    name = "UTF-8" if encoding.lower().startswith("utf-8") else encoding
    raise DataError(
        f"{path} is not valid {name} (byte 0x{raw[e.start]:02x} at offset {e.start}, line "
        f"{line}). It looks like {guess}. Fix: convert it, e.g. `iconv -f {guess} -t utf-8 "
        f"{path.name} > {path.stem}.utf8{path.suffix}`, and point the config at the new file."
    ) from None


def _guess_encoding(raw: bytes) -> str:
  for enc in ("utf-16", "cp1252"):
    try:
      raw.decode(enc)
      if enc == "utf-16" and not raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        continue
      return enc
    except UnicodeDecodeError:
      pass
  return "latin-1"


def table_format(path) -> str:
  """'csv' | 'tsv' | 'json' | 'jsonl' | 'parquet' from the extension, else a DataError."""
  suffix = pathlib.Path(path).suffix.lower()
  if suffix not in TABLE_FORMATS:
    raise DataError(f"unknown file format {suffix or '(no extension)'!r} of {path}; supported: "
                    f"{', '.join(sorted(TABLE_FORMATS))}. Fix: rename or convert the file.")
  return TABLE_FORMATS[suffix]


def read_delimited(path, *, delimiter: str, header: bool, quoting: bool,
                   encoding: str = "utf-8-sig") -> tuple[list[str] | None, list[list[str]]]:
  """(header row or None, data rows). quoting=False reads fields verbatim (csv.QUOTE_NONE)."""
  text = read_text(path, encoding)
  kw = {"delimiter": delimiter}
  kw.update({"quoting": csv.QUOTE_MINIMAL} if quoting else {"quoting": csv.QUOTE_NONE,
                                                            "quotechar": None})
  reader = csv.reader(lines(text), **kw)
  try:
    rows = [r for r in reader if r]
  except csv.Error as e:  # e.g. a lone carriage return (old Mac line ends) in an unquoted field
    raise DataError(f"{path}, line {reader.line_num}: cannot be read as "
                    f"{'CSV' if quoting else 'TSV'} ({e}). Fix: save the file with \\n or "
                    "\\r\\n line endings, and quote fields that hold line breaks") from None
  if header:
    if not rows:
      raise DataError(f"{path} is empty; expected a header row")
    return [h.strip() for h in rows[0]], rows[1:]
  return None, rows


def read_table(path) -> dict[str, list]:
  """A local table as columns: {column: [values]}. CSV/TSV need a header row; JSON is a list of
  records or a dict of equal-length columns; JSONL is one record per line; parquet via pyarrow.
  A table without a single row is a DataError naming the file (it would otherwise surface later
  as an empty label set, blamed on another split)."""
  path = pathlib.Path(path)
  cols = _read_table(path)
  if not cols or not any(len(v) for v in cols.values()):
    what = (f"a header ({', '.join(cols)}) but no data rows" if cols else "no rows")
    raise DataError(f"{path} holds no examples: {what}. Fix: fill it, or point the config at the "
                    "file that holds the data")
  return cols


def _read_table(path: pathlib.Path) -> dict[str, list]:
  fmt = table_format(path)
  if fmt in ("csv", "tsv"):
    names, rows = read_delimited(path, delimiter="," if fmt == "csv" else "\t", header=True,
                                 quoting=fmt == "csv")
    cols: dict[str, list] = {n: [] for n in names}
    for i, r in enumerate(rows):
      if len(r) != len(names):
        raise DataError(f"{path}: data row {i} has {len(r)} fields but the header has {len(names)} "
                        f"({', '.join(names)}). Fix: quote fields that hold the delimiter"
                        + (" (TSV fields are read verbatim, without quoting)" if fmt == "tsv"
                           else ""))
      for n, v in zip(names, r):
        cols[n].append(v)
    return cols
  if fmt == "parquet":
    if not path.is_file():
      raise DataError(f"data file {str(path)!r} does not exist (or is not a file)")
    import pyarrow.parquet as pq
    return pq.read_table(path).to_pydict()
  text = read_text(path)
  try:
    if fmt == "jsonl":
      records = [json.loads(line) for line in lines(text) if line.strip()]
    else:
      data = json.loads(text)
      if isinstance(data, dict):
        return _columns(path, data)
      records = data
  except json.JSONDecodeError as e:
    raise DataError(f"{path} is not valid {fmt.upper()}: {e}") from None
  if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
    raise DataError(f"{path}: expected a list of records (objects), one per example")
  names = list(dict.fromkeys(k for r in records for k in r))
  return {n: [r.get(n) for r in records] for n in names}


def _columns(path, data: dict) -> dict[str, list]:
  """A JSON object of columns {name: [values]}: every value a list, all of one length."""
  bad = [k for k, v in data.items() if not isinstance(v, list)]
  if bad:
    raise DataError(f"{path}: a JSON object is read as columns (name -> list of values), but "
                    f"{', '.join(repr(k) for k in bad[:3])} {'is' if len(bad) == 1 else 'are'} not "
                    "lists. Fix: write a list of records, one object per example")
  lengths = {k: len(v) for k, v in data.items()}
  if len(set(lengths.values())) > 1:
    raise DataError(f"{path}: the columns have different lengths {lengths}; every column needs "
                    "one value per example")
  return dict(data)


def read_conll(path, *, encoding: str = "utf-8-sig") -> list[tuple[list[str], list[str]]]:
  """CoNLL token files -> [(words, tags)]: one token per line, whitespace-separated columns, the
  word first and the tag last (CoNLL-2003's `word POS chunk NER` or WNUT's `word<TAB>tag`);
  sentences separated by blank (or whitespace-only) lines; `-DOCSTART-` lines and the empty
  sentence after them are skipped."""
  text = read_text(path, encoding)
  sentences, words, tags = [], [], []
  for n, line in enumerate(lines(text), 1):
    fields = line.split()
    if not fields:
      if words:
        sentences.append((words, tags))
        words, tags = [], []
      continue
    if fields[0] == "-DOCSTART-":
      continue
    if len(fields) < 2:
      raise DataError(f"{path}:{n}: expected 'word ... tag' (at least 2 columns), got {line!r}")
    words.append(fields[0])
    tags.append(fields[-1])
  if words:
    sentences.append((words, tags))
  if not sentences:
    raise DataError(f"{path} holds no sentences (one 'word ... tag' per line, a blank line "
                    "between sentences). Fix: fill it, or point the config at the file that "
                    "holds the data")
  return sentences


def read_lines(path, encoding: str = "utf-8-sig") -> list[str]:
  """Non-empty lines of a one-example-per-line file."""
  return [line for line in lines(read_text(path, encoding)) if line.strip()]


def lines(text: str) -> list[str]:
  """Splits on \n (and \r\n) only: str.splitlines would also split inside a text at U+0085,
  U+2028 or \x0c, which latin-1 files and web text contain."""
  out = text.split("\n")
  if out and out[-1] == "":
    out.pop()
  return [line[:-1] if line.endswith("\r") else line for line in out]
