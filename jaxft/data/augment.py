"""Seeded augmentation for semi-supervised and robust fine-tuning: words (EDA: Wei & Zou 2019, with
WordNet synonyms and NER-safe variants), token ids (token dropout, span cutoff: Shen et al. 2020),
paraphrase / back-translation columns (UDA), and images (flip, pad-and-crop, RandAugment: Cubuk et
al. 2020, Cutout: DeVries & Taylor 2017) as FixMatch's weak and strong policies.

Reproducibility: every random choice for example `index` in `epoch` under a policy draws from
np.random.default_rng(SeedSequence([seed, epoch, index, crc32(policy)])), so an augmented view is a
pure function of (seed, epoch, index, policy), whatever the batch composition, order or workers.
Token ops return, with the new ids, `source` [n'] int: the position each output token came from,
so any per-token array (token_type_ids, word ids, NER labels) is carried along by `x[source]`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import zlib
from typing import Callable, Mapping, Sequence

import numpy as np

# ------------------------------------------------------------------------------------------------
# Seeding


def example_rng(seed: int, index: int, epoch: int = 0, stream: str = "") -> np.random.Generator:
  """The generator for one example's augmentation: independent streams per (seed, epoch, index,
  stream); `stream` names the view (e.g. the policy) so weak and strong views draw differently."""
  return np.random.default_rng(np.random.SeedSequence(
      [int(seed), int(epoch), int(index), zlib.crc32(stream.encode())]))


# ------------------------------------------------------------------------------------------------
# Synonym sources: any callable word -> list of synonyms (multi-word ones space-separated).

SynonymSource = Callable[[str], Sequence[str]]


class DictSynonyms:
  """A synonym source from a mapping word -> synonyms (lookups are lower-cased)."""

  def __init__(self, mapping: Mapping[str, Sequence[str]]):
    self._map = {k.lower(): list(v) for k, v in mapping.items()}

  def __call__(self, word: str) -> list[str]:
    return list(self._map.get(word.lower(), ()))


WORDNET_INSTALL = "apt-get install -y wordnet-base  (Debian; files in /usr/share/wordnet)"
_POS = ("noun", "verb", "adj", "adv")
# WordNet's morphy detachment rules (suffix -> replacement) per part of speech.
_MORPHY = {"noun": (("s", ""), ("ses", "s"), ("xes", "x"), ("zes", "z"), ("ches", "ch"),
                    ("shes", "sh"), ("men", "man"), ("ies", "y")),
           "verb": (("s", ""), ("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""),
                    ("ing", "e"), ("ing", "")),
           "adj": (("er", ""), ("est", ""), ("er", "e"), ("est", "e")), "adv": ()}


def wordnet_dir() -> str:
  """The WordNet 3.0 database directory: $WNSEARCHDIR, else /usr/share/wordnet."""
  path = os.environ.get("WNSEARCHDIR", "/usr/share/wordnet")
  if not os.path.isfile(os.path.join(path, "index.noun")):
    raise FileNotFoundError(f"no WordNet database at {path!r} (index.noun missing). Install it with "
                            f"`{WORDNET_INSTALL}`, or point $WNSEARCHDIR at a WordNet dict/ folder, "
                            "or pass any word -> synonyms callable (e.g. DictSynonyms) instead.")
  return path


class WordNetSynonyms:
  """Synonyms from the WordNet database files (index.<pos>, data.<pos>, <pos>.exc), read directly:
  the lemmas of every synset of the word (after morphy's base-form reduction), in sense order."""

  def __init__(self, path: str | None = None):
    self.path = path or wordnet_dir()
    self._index: dict[str, dict[str, list[int]]] | None = None
    self._exc: dict[str, dict[str, str]] = {}
    self._cache: dict[str, list[str]] = {}

  def _load(self):
    self._index = {}
    for pos in _POS:
      table = self._index[pos] = {}
      with open(os.path.join(self.path, f"index.{pos}"), encoding="utf-8") as f:
        for line in f:
          if line.startswith(" "):  # license header
            continue
          fields = line.split()
          table[fields[0]] = [int(o) for o in fields[-int(fields[2]):]]
      exc = os.path.join(self.path, f"{pos}.exc")
      if os.path.isfile(exc):
        with open(exc, encoding="utf-8") as f:
          self._exc[pos] = dict(line.split()[:2] for line in f if len(line.split()) >= 2)

  def _base_forms(self, word: str, pos: str) -> list[str]:
    table = self._index[pos]
    forms = [word] if word in table else []
    if word in self._exc.get(pos, {}):
      forms.append(self._exc[pos][word])
    forms += [word[:-len(s)] + r for s, r in _MORPHY[pos] if word.endswith(s) and len(word) > len(s)]
    return [f for i, f in enumerate(forms) if f in table and f not in forms[:i]]

  def __call__(self, word: str) -> list[str]:
    key = word.lower().replace(" ", "_")
    if key in self._cache:
      return list(self._cache[key])
    if self._index is None:
      self._load()
    out: list[str] = []
    for pos in _POS:
      forms = self._base_forms(key, pos)
      if not forms:
        continue
      with open(os.path.join(self.path, f"data.{pos}"), "rb") as f:
        for form in forms:
          for offset in self._index[pos][form]:
            f.seek(offset)
            fields = f.readline().decode("utf-8").split()
            for i in range(int(fields[3], 16)):
              lemma = re.sub(r"\(\w+\)$", "", fields[4 + 2 * i]).lower()
              if lemma not in (key, *forms) and lemma not in out:
                out.append(lemma)
    self._cache[key] = [s.replace("_", " ") for s in out]
    return list(self._cache[key])


# ------------------------------------------------------------------------------------------------
# Word-level ops (EDA). Each takes words (and optional BIO tags aligned with them) and returns new
# (words, tags). With tags, the ops are NER-safe: a word moves with its tag, entity spans are never
# split, deleted or entered (only "O" words are deleted, swapped or used as insertion sources and
# insertions never land inside a span), and a multi-word synonym of "B-X" becomes "B-X I-X ...".

STOP_WORDS = frozenset(
    "i me my myself we our ours ourselves you your yours yourself yourselves he him his himself she "
    "her hers herself it its itself they them their theirs themselves what which who whom this that "
    "these those am is are was were be been being have has had having do does did doing a an the "
    "and but if or because as until while of at by for with about against between into through "
    "during before after above below to from up down in out on off over under again further then "
    "once here there when where why how all any both each few more most other some such no nor not "
    "only own same so than too very s t can will just don should now".split())


def _count(alpha: float, n: int) -> int:
  return max(1, int(alpha * n)) if alpha > 0 and n else 0


def _is_o(tags, i) -> bool:
  return tags is None or tags[i] == "O"


def _match_case(src: str, new: str) -> str:
  return new[:1].upper() + new[1:] if src[:1].isupper() else new


def random_deletion(words, rng, p: float, tags=None):
  """Deletes each (eligible) word with probability p; never returns an empty sentence."""
  words, tags = list(words), None if tags is None else list(tags)
  drop = rng.random(len(words)) < p
  keep = [i for i in range(len(words)) if not (drop[i] and _is_o(tags, i))]
  if not keep and words:
    keep = [int(rng.integers(len(words)))]
  return [words[i] for i in keep], None if tags is None else [tags[i] for i in keep]


def random_swap(words, rng, n: int, tags=None):
  """Swaps two random (eligible) words, n times."""
  words, tags = list(words), None if tags is None else list(tags)
  slots = [i for i in range(len(words)) if _is_o(tags, i)]
  for _ in range(n if len(slots) >= 2 else 0):
    a, b = rng.choice(slots, 2, replace=False)
    words[a], words[b] = words[b], words[a]
    # with tags, both are "O": nothing to move
  return words, tags


def random_insertion(words, rng, n: int, synonyms: SynonymSource, tags=None):
  """n times: a synonym of a random (eligible, non-stop) word is inserted at a random position."""
  words, tags = list(words), None if tags is None else list(tags)
  for _ in range(n):
    cands = [i for i in range(len(words)) if _is_o(tags, i) and words[i].lower() not in STOP_WORDS]
    for i in rng.permutation(cands)[:10]:  # EDA: up to 10 tries for a word with synonyms
      syns = synonyms(words[i])
      if syns:
        new = str(syns[int(rng.integers(len(syns)))]).split()
        slots = [j for j in range(len(words) + 1)
                 if tags is None or j == len(words) or not tags[j].startswith("I-")]
        j = int(slots[int(rng.integers(len(slots)))])
        words[j:j] = new
        if tags is not None:
          tags[j:j] = ["O"] * len(new)
        break
  return words, tags


def synonym_replacement(words, rng, n: int, synonyms: SynonymSource, tags=None):
  """Replaces up to n distinct non-stop words (every occurrence, case-insensitively, keeping an
  initial capital) with one random synonym each."""
  words, tags = list(words), None if tags is None else list(tags)
  vocab = sorted({w.lower() for w in words if w.lower() not in STOP_WORDS})
  done = 0
  for w in (rng.permutation(np.array(vocab, dtype=object)) if vocab else ()):
    syns = synonyms(w)
    if not syns:
      continue
    new = str(syns[int(rng.integers(len(syns)))]).split()
    out_w, out_t = [], []
    for i, word in enumerate(words):
      t = None if tags is None else tags[i]
      if word.lower() != w:
        out_w.append(word)
        out_t.append(t)
        continue
      out_w += [_match_case(word, new[0])] + new[1:]
      out_t += [t] + [None if t is None else "O" if t == "O" else "I-" + t[2:]] * (len(new) - 1)
    words, tags = out_w, None if tags is None else out_t
    done += 1
    if done >= n:
      break
  return words, tags


# ------------------------------------------------------------------------------------------------
# Text policies: named compositions.


@dataclasses.dataclass(frozen=True)
class TextPolicy:
  """ops: (name, amount) applied in order: "synonym"/"insert"/"swap" take alpha (n = max(1, alpha *
  len)), "delete" takes p. paraphrase: use a random paraphrase / back-translation of the example
  when the data provides one (and skip the ops), as UDA and USB do for text."""
  ops: tuple = ()
  paraphrase: bool = False


_EDA = (("synonym", 0.1), ("insert", 0.1), ("swap", 0.1), ("delete", 0.1))
TEXT_POLICIES = {
    "identity": TextPolicy(),
    "weak": TextPolicy(ops=(("swap", 0.05), ("delete", 0.05))),
    "eda": TextPolicy(ops=_EDA),
    "backtranslation": TextPolicy(paraphrase=True),
    "strong": TextPolicy(ops=_EDA, paraphrase=True),
}


def _check_rows(indices, rows: int):
  if len(indices) != rows:
    raise ValueError(f"indices has {len(indices)} entries for a batch of {rows} rows; pass the "
                     "dataset index of every row (padding rows included)")


def _policy(policy, table, kind):
  if isinstance(policy, str):
    if policy not in table:
      raise KeyError(f"unknown {kind} policy {policy!r}; known: {', '.join(sorted(table))}")
    return table[policy]
  return policy


def augment_words(words, policy, rng, *, synonyms: SynonymSource | None = None, tags=None):
  """(words, tags) after the policy's word ops (see TextPolicy); tags None for plain text."""
  pol = _policy(policy, TEXT_POLICIES, "text")
  for op, amount in pol.ops:
    if op in ("synonym", "insert") and synonyms is None:
      raise ValueError(f"text op {op!r} needs a synonym source: pass synonyms=WordNetSynonyms() "
                       f"(`{WORDNET_INSTALL}`) or DictSynonyms, or use policy 'weak'")
    n = _count(amount, len(words))
    if op == "synonym":
      words, tags = synonym_replacement(words, rng, n, synonyms, tags)
    elif op == "insert":
      words, tags = random_insertion(words, rng, n, synonyms, tags)
    elif op == "swap":
      words, tags = random_swap(words, rng, n, tags)
    elif op == "delete":
      words, tags = random_deletion(words, rng, amount, tags)
    else:
      raise ValueError(f"unknown text op {op!r}; known: synonym, insert, swap, delete")
  return words, tags


def augment_texts(texts: Sequence[str], policy, *, seed: int, epoch: int, indices: Sequence[int],
                  synonyms: SynonymSource | None = None, paraphrases=None) -> list[str]:
  """Augments each text (whitespace words). indices: the examples' dataset indices (seeding).
  paraphrases: optional per-example str / list of str / None (a back-translation column)."""
  pol = _policy(policy, TEXT_POLICIES, "text")
  stream = policy if isinstance(policy, str) else repr(policy)
  out = []
  for k, (text, index) in enumerate(zip(texts, indices, strict=True)):
    rng = example_rng(seed, index, epoch, stream)
    para = None if paraphrases is None else paraphrases[k]
    para = [p for p in ([para] if isinstance(para, str) else (para or ())) if p]
    if pol.paraphrase and para:
      out.append(para[int(rng.integers(len(para)))])
    else:
      out.append(" ".join(augment_words(text.split(), pol, rng, synonyms=synonyms)[0]))
  return out


def augment_tagged(words, tags, policy, *, seed: int, epoch: int, index: int,
                   synonyms: SynonymSource | None = None):
  """NER-safe word augmentation of one sentence: (words, BIO tags) -> (words, tags), aligned."""
  if len(words) != len(tags):
    raise ValueError(f"words and tags differ in length: {len(words)} vs {len(tags)}")
  stream = "tagged/" + (policy if isinstance(policy, str) else repr(policy))
  return augment_words(list(words), policy, example_rng(seed, index, epoch, stream),
                       synonyms=synonyms, tags=list(tags))


# ------------------------------------------------------------------------------------------------
# Token-id ops (on one unpadded sequence); special tokens ([CLS], [SEP], ...) are never touched.


def token_dropout(ids, rng, rate: float, special_ids=(), replace_id: int | None = None):
  """Drops each non-special token with probability `rate` (or replaces it by `replace_id`, e.g.
  [MASK]). -> (ids [n'] int32, source [n'] int)."""
  ids = np.asarray(ids)
  hit = (rng.random(len(ids)) < rate) & ~np.isin(ids, list(special_ids))
  if replace_id is not None:
    return np.where(hit, replace_id, ids).astype(np.int32), np.arange(len(ids))
  source = np.flatnonzero(~hit)
  return ids[source].astype(np.int32), source


def span_cutoff(ids, rng, ratio: float, special_ids=(), replace_id: int | None = None):
  """Cuts one contiguous span of max(1, round(ratio * n)) of the n non-special tokens (Shen et al.
  2020's span cutoff on ids: removed, or replaced by `replace_id`). -> (ids, source)."""
  ids = np.asarray(ids)
  content = np.flatnonzero(~np.isin(ids, list(special_ids)))
  if ratio <= 0 or not len(content):
    return ids.astype(np.int32), np.arange(len(ids))
  length = min(len(content), max(1, int(round(ratio * len(content)))))
  start = int(rng.integers(len(content) - length + 1))
  cut = np.zeros(len(ids), bool)
  cut[content[start:start + length]] = True
  if replace_id is not None:
    return np.where(cut, replace_id, ids).astype(np.int32), np.arange(len(ids))
  source = np.flatnonzero(~cut)
  return ids[source].astype(np.int32), source


TOKEN_OPS = {"token_dropout": token_dropout, "span_cutoff": span_cutoff}
TOKEN_POLICIES = {
    "identity": (),
    "token_weak": (("token_dropout", 0.05),),
    "token_strong": (("span_cutoff", 0.1), ("token_dropout", 0.1)),
}


def augment_token_batch(input_ids, attention_mask, policy, *, seed: int, epoch: int,
                        indices: Sequence[int], special_ids: Sequence[int], pad_id: int = 0,
                        replace_id: int | None = None, token_type_ids=None) -> dict:
  """Token policy on a right-padded batch [B, S] -> {"input_ids", "attention_mask",
  "token_type_ids"} int32 [B, S] (same S; token_type_ids follow their tokens)."""
  ops = _policy(policy, TOKEN_POLICIES, "token")
  stream = policy if isinstance(policy, str) else repr(policy)
  input_ids, attention_mask = np.asarray(input_ids), np.asarray(attention_mask)
  types = np.zeros_like(input_ids) if token_type_ids is None else np.asarray(token_type_ids)
  out = {k: np.zeros(input_ids.shape, np.int32) for k in ("input_ids", "attention_mask",
                                                          "token_type_ids")}
  out["input_ids"][:] = pad_id
  _check_rows(indices, input_ids.shape[0])
  for b, index in enumerate(indices):
    n = int(attention_mask[b].sum())
    if not attention_mask[b, :n].all():
      raise ValueError(f"row {b}: augment_token_batch needs right-padded rows (mask 1...1 0...0)")
    rng = example_rng(seed, index, epoch, stream)
    ids, source = input_ids[b, :n], np.arange(n)
    for name, amount in ops:
      ids, src = TOKEN_OPS[name](ids, rng, amount, special_ids, replace_id)
      source = source[src]
    out["input_ids"][b, :len(ids)] = ids
    out["attention_mask"][b, :len(ids)] = 1
    out["token_type_ids"][b, :len(ids)] = types[b, source]
  return out


def add_strong_view(batch: Mapping[str, np.ndarray], policy="token_strong", *, seed: int,
                    epoch: int, indices: Sequence[int], special_ids: Sequence[int],
                    pad_id: int = 0, replace_id: int | None = None, view: str = "strong") -> dict:
  """batch + "unlabeled/<view>/{input_ids, attention_mask, token_type_ids}" built from the
  "unlabeled/..." rows by a token policy (indices: those rows' dataset indices)."""
  aug = augment_token_batch(batch["unlabeled/input_ids"], batch["unlabeled/attention_mask"], policy,
                            seed=seed, epoch=epoch, indices=indices, special_ids=special_ids,
                            pad_id=pad_id, replace_id=replace_id,
                            token_type_ids=batch.get("unlabeled/token_type_ids"))
  return {**batch, **{f"unlabeled/{view}/{k}": v for k, v in aug.items()}}


# ------------------------------------------------------------------------------------------------
# Images: float arrays [H, W, C] with values in [0, 1].


def random_flip(img, rng, p: float = 0.5):
  return img[:, ::-1] if rng.random() < p else img


def random_crop(img, rng, padding: int = 4):
  """Pad by reflection and crop back to [H, W] at a random offset (FixMatch's flip-and-shift)."""
  h, w = img.shape[:2]
  padded = np.pad(img, ((padding, padding), (padding, padding), (0, 0)), mode="reflect")
  y, x = rng.integers(2 * padding + 1, size=2)
  return padded[y:y + h, x:x + w]


def cutout(img, rng, ratio: float = 0.5, fill: float = 0.5):
  """A square of side ratio * min(H, W) centred at a random pixel set to `fill`."""
  h, w = img.shape[:2]
  side = int(ratio * min(h, w))
  cy, cx = rng.integers(h), rng.integers(w)
  out = img.copy()
  out[max(0, cy - side // 2):cy + (side + 1) // 2, max(0, cx - side // 2):cx + (side + 1) // 2] = fill
  return out


def _affine(img, matrix, fill=0.5):
  from scipy import ndimage  # only the geometric ops need it
  h, w = img.shape[:2]
  center = np.array([h / 2, w / 2])
  offset = center - matrix @ center
  return np.stack([ndimage.affine_transform(img[..., c], matrix, offset, order=1, cval=fill)
                   for c in range(img.shape[-1])], -1)


def _blend(a, b, factor):
  return np.clip(b + factor * (a - b), 0.0, 1.0)


def _gray(img):
  """[H, W, 1] luminance (ITU-R 601 weights for RGB, the channel mean otherwise)."""
  if img.shape[-1] == 3:
    return (img @ np.array([0.299, 0.587, 0.114]))[..., None]
  return img.mean(-1, keepdims=True)


def _equalize(img):
  out = np.empty_like(img)
  for c in range(img.shape[-1]):
    q = np.round(img[..., c] * 255).astype(int)
    cdf = np.cumsum(np.bincount(q.ravel(), minlength=256)).astype(np.float64)
    cdf = (cdf - cdf.min()) / max(cdf.max() - cdf.min(), 1.0)
    out[..., c] = cdf[q]
  return out


def _smooth(img):
  from scipy import ndimage
  k = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float64) / 13.0  # PIL's SMOOTH kernel
  return np.stack([ndimage.convolve(img[..., c], k, mode="nearest")
                   for c in range(img.shape[-1])], -1)


# RandAugment ops: (img, v) with v in [0, 1] the magnitude; signed ops flip sign at random.
_RA_OPS = {
    "identity": lambda x, v, s: x,
    "auto_contrast": lambda x, v, s: ((x - x.min((0, 1)))
                                      / np.maximum(x.max((0, 1)) - x.min((0, 1)), 1e-6)),
    "equalize": lambda x, v, s: _equalize(x),
    "rotate": lambda x, v, s: _affine(x, _rot(s * 30 * v)),
    "solarize": lambda x, v, s: np.where(x >= 1.0 - v, 1.0 - x, x),
    "posterize": lambda x, v, s: np.floor(x * 2 ** (8 - int(4 * v))) / 2 ** (8 - int(4 * v)),
    "color": lambda x, v, s: _blend(x, _gray(x), 1 + s * 0.9 * v),
    "contrast": lambda x, v, s: _blend(x, np.full_like(x, _gray(x).mean()), 1 + s * 0.9 * v),
    "brightness": lambda x, v, s: _blend(x, np.zeros_like(x), 1 + s * 0.9 * v),
    "sharpness": lambda x, v, s: _blend(x, _smooth(x), 1 + s * 0.9 * v),
    "shear_x": lambda x, v, s: _affine(x, np.array([[1, 0], [s * 0.3 * v, 1]])),
    "shear_y": lambda x, v, s: _affine(x, np.array([[1, s * 0.3 * v], [0, 1]])),
    "translate_x": lambda x, v, s: _shift(x, 0, s * 0.3 * v),
    "translate_y": lambda x, v, s: _shift(x, s * 0.3 * v, 0),
}


def _rot(deg):
  t = np.deg2rad(deg)
  return np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])


def _shift(img, fy, fx, fill=0.5):
  from scipy import ndimage
  h, w = img.shape[:2]
  return ndimage.shift(img, (fy * h, fx * w, 0), order=0, cval=fill)


def rand_augment(img, rng, n: int = 2, magnitude: float | None = None):
  """n ops drawn uniformly from _RA_OPS, each at `magnitude` in [0, 1] (or a uniform random one per
  op, FixMatch's RandAugment variant)."""
  names = sorted(_RA_OPS)
  for name in rng.choice(names, n):
    v = rng.random() if magnitude is None else magnitude
    sign = 1.0 if rng.random() < 0.5 else -1.0
    img = np.clip(_RA_OPS[name](img, v, sign), 0.0, 1.0)
  return img


IMAGE_POLICIES = {
    "identity": (),
    "weak": ((random_flip, {}), (random_crop, {"padding": 4})),
    "strong": ((random_flip, {}), (random_crop, {"padding": 4}), (rand_augment, {"n": 2}),
               (cutout, {"ratio": 0.5})),
}


def augment_images(pixel_values, policy, *, seed: int, epoch: int, indices: Sequence[int],
                   value_range: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
  """An image policy on a batch [B, H, W, C] float32 whose values span `value_range` (e.g. (-1, 1)
  after ViT normalization); returns the same shape, range and dtype."""
  ops = _policy(policy, IMAGE_POLICIES, "image")
  stream = policy if isinstance(policy, str) else repr(policy)
  x = np.asarray(pixel_values, np.float64)
  lo, hi = value_range
  out = np.empty(x.shape, np.float32)
  _check_rows(indices, x.shape[0])
  for b, index in enumerate(indices):
    rng = example_rng(seed, index, epoch, stream)
    img = (x[b] - lo) / (hi - lo)
    for fn, kwargs in ops:
      img = fn(img, rng, **kwargs)
    out[b] = np.clip(img, 0.0, 1.0) * (hi - lo) + lo
  return out
