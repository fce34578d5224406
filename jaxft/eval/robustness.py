"""Robustness evaluation: accuracy under an embedding-space PGD attack, and a greedy WordNet
synonym-substitution attack on raw text.

PGD (Madry et al. 2018) on the embedding output: for each epsilon, K projected ascent steps of size
alpha = alpha_ratio * eps / K on the supervised loss (dropout off), from zero or a random start in
the ball; accuracy is taken on x + delta_K. One jitted attack serves every epsilon (eps is traced).

Word substitution (a greedy attack in the style of Alzantot et al. 2018 / Ren et al. 2019's PWWS,
without their language-model filter): for each correctly classified text, repeatedly apply the one
synonym swap that lowers the true-class probability most, until the prediction flips, no swap
lowers it, or the budget floor(max_swap_fraction * number of words) is spent. Reported:
  clean_accuracy, accuracy_under_attack (over all texts),
  attack_success_rate = flipped / correctly classified, mean_swap_fraction over flipped texts,
  queries_per_example (model calls per attacked text).
Synonyms come from any `word -> list[str]` callable; `WordNet` reads the WordNet 3.0 database files
(Debian: `apt-get install wordnet-base` -> /usr/share/wordnet; or set $WNSEARCHDIR).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
from typing import Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.objectives import perturb as P
from jaxft.objectives.adversarial import attack_loss
from jaxft.objectives.base import StepContext, example_weights, token_weights
from jaxft.objectives.supervised import task_term

# ------------------------------------------------------------------------------------------------
# Embedding-space PGD


def make_pgd_eval(apply_fn, kind: str, *, steps: int = 10, norm: str = "l2",
                  alpha_ratio: float = 2.5, random_init: bool = False):
  """-> jitted `fn(params, batch, epsilon, rng) -> (correct_clean, correct_adv, count)`, float32
  scalars summed over real examples (classification) or labelled tokens (token classification)."""
  if kind not in ("classification", "token_classification"):
    raise ValueError(f"PGD accuracy needs a classification task, got kind {kind!r}; for regression "
                     "compare the task metric on clean and perturbed inputs instead")
  P.check_norm(norm)
  sup = task_term(kind)
  ctx = StepContext(step=jnp.zeros((), jnp.int32), extras={})

  def correct(logits, batch):
    hit = (jnp.argmax(logits, -1) == batch["labels"]).astype(jnp.float32)
    if kind == "token_classification":  # per token, padded or packed rows alike
      w = token_weights(batch, batch["labels"])
    else:
      w = example_weights(batch)
    return jnp.sum(hit * w), jnp.sum(w)

  @jax.jit
  def fn(params, batch, epsilon, rng):
    shape = P.embedding_shape(apply_fn, params, batch)
    mask = P.token_mask(batch, shape)
    loss_of_delta = attack_loss(sup, apply_fn, params, batch, rng, ctx, deterministic=True)
    delta = P.pgd_delta(loss_of_delta, shape, mask, epsilon=epsilon,
                        alpha=alpha_ratio * epsilon / steps, steps=steps, norm=norm, rng=rng,
                        random_init=random_init)
    clean = apply_fn(params, batch, rng=None, deterministic=True).logits
    adv = apply_fn(params, batch, rng=None, deterministic=True, embedding_perturbation=delta).logits
    c_clean, n = correct(clean, batch)
    c_adv, _ = correct(adv, batch)
    return c_clean, c_adv, n

  return fn


def pgd_robustness(apply_fn, params, batches: Iterable[Mapping], kind: str,
                   epsilons: Sequence[float], *, steps: int = 10, norm: str = "l2",
                   alpha_ratio: float = 2.5, random_init: bool = False, seed: int = 0) -> dict:
  """Accuracy on clean inputs and under PGD at each epsilon over the eval batches.

  -> {"clean_accuracy": a, "pgd_<norm>/<eps>/accuracy": a_eps, ...} (floats). Batches are the usual
  padded dicts (example_mask 0 rows are ignored); they are iterated once and kept on the host."""
  fn = make_pgd_eval(apply_fn, kind, steps=steps, norm=norm, alpha_ratio=alpha_ratio,
                     random_init=random_init)
  batches = list(batches)
  if not batches:
    raise ValueError("pgd_robustness got no eval batches")
  totals = {float(e): np.zeros(3) for e in epsilons}
  for i, batch in enumerate(batches):
    rng = jax.random.fold_in(jax.random.key(seed), i)
    for e in totals:
      totals[e] += np.asarray(jax.device_get(fn(params, batch, jnp.float32(e), rng)), np.float64)
  first = next(iter(totals.values()))
  out = {"clean_accuracy": float(first[0] / max(first[2], 1.0))}
  for e, (_, c_adv, n) in totals.items():
    out[f"pgd_{norm}/{e:g}/accuracy"] = float(c_adv / max(n, 1.0))
  return out


# ------------------------------------------------------------------------------------------------
# WordNet synonyms


_POS = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}


def wordnet_dir() -> pathlib.Path:
  """The WordNet database folder: $WNSEARCHDIR, else Debian's /usr/share/wordnet."""
  return pathlib.Path(os.environ.get("WNSEARCHDIR", "/usr/share/wordnet"))


class WordNet:
  """Synonyms from the WordNet 3.0 database files (index.<pos>, data.<pos>), read directly.

  `wn(word)` -> single-word synonyms of `word` (lowercase, the word itself excluded), from every
  synset the word is a lemma of, in WordNet's sense order (most frequent sense first), without
  duplicates. pos: which parts of speech to use, of "n", "v", "a", "r". max_senses: use only the
  first k senses per part of speech (None = all, as PWWS does). Words are looked up as written
  (lowercased), without morphological reduction: "movies" has no entry, "movie" does.
  """

  def __init__(self, root: str | os.PathLike | None = None, pos: Sequence[str] = ("n", "v", "a", "r"),
               max_senses: int | None = None):
    self.root = pathlib.Path(root) if root is not None else wordnet_dir()
    bad = [p for p in pos if p not in _POS]
    if bad:
      raise ValueError(f"unknown WordNet parts of speech {bad}; use n, v, a, r")
    missing = [f"index.{_POS[p]}" for p in pos if not (self.root / f"index.{_POS[p]}").is_file()]
    if missing:
      raise FileNotFoundError(
          f"WordNet database not found in {self.root} (missing {', '.join(missing)}). Install it "
          "with `apt-get install wordnet-base` (Debian/Ubuntu) or set WNSEARCHDIR to a WordNet 3.0 "
          "dict/ folder")
    self.pos, self.max_senses = tuple(pos), max_senses
    self._index: dict[str, dict[str, list[int]]] = {}
    self._data: dict[str, bytes] = {}
    self._cache: dict[str, list[str]] = {}

  def _load(self, p: str):
    if p not in self._index:
      index = {}
      with open(self.root / f"index.{_POS[p]}", encoding="utf-8") as f:
        for line in f:
          if line.startswith(" "):  # license header
            continue
          fields = line.split()
          n_synsets, n_ptrs = int(fields[2]), int(fields[3])
          # lemma pos synset_cnt p_cnt [ptr_symbol]*p_cnt sense_cnt tagsense_cnt offsets...
          index[fields[0]] = [int(o) for o in fields[6 + n_ptrs:6 + n_ptrs + n_synsets]]
      self._index[p] = index
      self._data[p] = (self.root / f"data.{_POS[p]}").read_bytes()
    return self._index[p], self._data[p]

  def synset_words(self, p: str, offset: int) -> list[str]:
    """Lemmas of the synset at byte `offset` of data.<pos> (adjective markers like "(a)" dropped)."""
    _, data = self._load(p)
    line = data[offset:data.index(b"\n", offset)].decode("utf-8").split()
    # offset lex_filenum ss_type w_cnt(hex) [word lex_id]*w_cnt ...
    n = int(line[3], 16)
    return [re.sub(r"\(.*\)$", "", w) for w in line[4:4 + 2 * n:2]]

  def __call__(self, word: str) -> list[str]:
    key = word.lower()
    if key not in self._cache:
      seen, out = {key}, []
      for p in self.pos:
        index, _ = self._load(p)
        offsets = index.get(key, [])[:self.max_senses]
        for off in offsets:
          for w in self.synset_words(p, off):
            w = w.lower()
            if w.isalpha() and w not in seen:
              seen.add(w)
              out.append(w)
      self._cache[key] = out
    return list(self._cache[key])


# ------------------------------------------------------------------------------------------------
# Greedy word-substitution attack

# Function words whose substitution changes meaning or grammar rather than wording.
STOPWORDS = frozenset("""a an the and or but if of at by for with about to from in on off up down
over under again further then once here there when where why how all any both each few more most
other some such no nor not only own same so than too very can will just don should now is are was
were be been being have has had having do does did doing i me my we our you your he him his she her
it its they them their what which who whom this that these those am s t""".split())

_WORD = re.compile(r"[A-Za-z]+")


def _match_case(template: str, word: str) -> str:
  if template.isupper() and len(template) > 1:
    return word.upper()
  if template[:1].isupper():
    return word[:1].upper() + word[1:]
  return word


@dataclasses.dataclass
class AttackResult:
  """metrics: the scalar summary (see module docstring). examples: one record per text with
  `text`, `adversarial`, `label`, `clean_pred`, `adv_pred`, `swaps` [(word index, old, new)]."""

  metrics: dict
  examples: list


def attack_text(predict_proba, text: str, label: int, synonyms: Callable[[str], Sequence[str]], *,
                max_swap_fraction: float = 0.2, max_candidates: int | None = None,
                stopwords: frozenset = STOPWORDS) -> dict:
  """Greedy synonym substitution on one text (see module docstring); returns its record."""
  spans = [m.span() for m in _WORD.finditer(text)]
  words = [text[a:b] for a, b in spans]
  budget = int(max_swap_fraction * len(words))

  def render(ws):
    out, last = [], 0
    for (a, b), w in zip(spans, ws):
      out += [text[last:a], w]
      last = b
    return "".join(out + [text[last:]])

  probs = np.asarray(predict_proba([text]))[0]
  record = {"text": text, "label": int(label), "clean_pred": int(np.argmax(probs)), "queries": 1,
            "swaps": [], "adversarial": text}
  record["adv_pred"] = record["clean_pred"]
  if record["clean_pred"] != label:
    return record
  current, p_true = list(words), float(probs[label])
  options = {}
  for i, w in enumerate(words):
    if w.lower() not in stopwords:
      syns = list(synonyms(w.lower()))[:max_candidates]
      if syns:
        options[i] = [_match_case(w, s) for s in syns]
  for _ in range(budget):
    done = {i for i, _, _ in record["swaps"]}
    cands = [(i, s) for i, syns in options.items() if i not in done for s in syns]
    if not cands:
      break
    texts = []
    for i, s in cands:
      ws = list(current)
      ws[i] = s
      texts.append(render(ws))
    probs = np.asarray(predict_proba(texts))
    record["queries"] += len(texts)
    best = int(np.argmin(probs[:, label]))
    if probs[best, label] >= p_true:  # no swap helps: a greedy local optimum
      break
    i, s = cands[best]
    record["swaps"].append((i, current[i], s))
    current[i], p_true = s, float(probs[best, label])
    record["adversarial"], record["adv_pred"] = texts[best], int(np.argmax(probs[best]))
    if record["adv_pred"] != label:
      break
  record["num_words"] = len(words)
  return record


def word_substitution_attack(predict_proba: Callable[[list[str]], np.ndarray],
                             texts: Sequence[str], labels: Sequence[int],
                             synonyms: Callable[[str], Sequence[str]], *,
                             max_swap_fraction: float = 0.2, max_candidates: int | None = None,
                             stopwords: frozenset = STOPWORDS) -> AttackResult:
  """Greedy synonym-swap attack over a text set. predict_proba(list of n texts) -> [n, C] class
  probabilities (e.g. `text_classifier`). max_swap_fraction: at most floor(f * words) swaps per
  text. max_candidates: synonyms tried per word (None = all)."""
  if not 0.0 <= max_swap_fraction <= 1.0:
    raise ValueError(f"max_swap_fraction must be in [0, 1], got {max_swap_fraction}")
  if len(texts) != len(labels):
    raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
  records = [attack_text(predict_proba, t, int(y), synonyms, max_swap_fraction=max_swap_fraction,
                         max_candidates=max_candidates, stopwords=stopwords)
             for t, y in zip(texts, labels)]
  n = max(len(records), 1)
  correct = [r for r in records if r["clean_pred"] == r["label"]]
  flipped = [r for r in correct if r["adv_pred"] != r["label"]]
  metrics = {
      "clean_accuracy": len(correct) / n,
      "accuracy_under_attack": (len(correct) - len(flipped)) / n,
      "attack_success_rate": len(flipped) / max(len(correct), 1),
      "mean_swap_fraction": (float(np.mean([len(r["swaps"]) / r["num_words"] for r in flipped]))
                             if flipped else 0.0),
      "queries_per_example": float(np.mean([r["queries"] for r in correct])) if correct else 0.0,
  }
  return AttackResult(metrics=metrics, examples=records)


def text_classifier(apply_fn, params, tokenizer, *, max_length: int = 64, batch_size: int = 64):
  """-> predict_proba(texts) -> np.float32 [n, C] softmax probabilities, from a sequence
  classifier and a Hugging Face tokenizer. Texts are padded to max_length and rows to batch_size,
  so one compiled forward serves every call."""

  @jax.jit
  def probs(params, batch):
    return jax.nn.softmax(apply_fn(params, batch, rng=None, deterministic=True).logits, -1)

  def predict_proba(texts: list[str]) -> np.ndarray:
    out = []
    for start in range(0, len(texts), batch_size):
      chunk = list(texts[start:start + batch_size])
      enc = tokenizer(chunk, padding="max_length", truncation=True, max_length=max_length,
                      return_tensors="np")
      pad = batch_size - len(chunk)
      batch = {k: np.pad(np.asarray(enc[k], np.int32), ((0, pad), (0, 0)))
               for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
      batch["example_mask"] = (np.arange(batch_size) < len(chunk)).astype(np.float32)
      out.append(np.asarray(probs(params, batch))[:len(chunk)])
    return np.concatenate(out, 0) if out else np.zeros((0, 0), np.float32)

  return predict_proba
