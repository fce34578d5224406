"""Augmentation: seeded determinism, exact behaviour of each op, NER label alignment on real CoNLL
sentences, the WordNet reader (on a file-format fixture and, when installed, the real database)."""


import numpy as np
import pytest

from jaxft.data import augment as A

SYN = A.DictSynonyms({"movie": ["film", "motion picture"], "good": ["fine"], "great": ["outstanding"],
                      "Germany": ["Federal Republic of Germany"], "call": ["phone call"],
                      "lamb": ["young sheep"], "rejects": ["turns down"]})


def test_example_rng_streams_are_reproducible_and_independent():
  draw = lambda *a: A.example_rng(*a).random(4).tolist()  # noqa: E731
  assert draw(0, 5, 1, "strong") == draw(0, 5, 1, "strong")
  variants = [draw(1, 5, 1, "strong"), draw(0, 6, 1, "strong"), draw(0, 5, 2, "strong"),
              draw(0, 5, 1, "weak")]
  assert all(v != draw(0, 5, 1, "strong") for v in variants)
  assert len({tuple(v) for v in variants}) == 4


def test_text_augmentation_is_a_function_of_seed_epoch_index_only():
  texts = ["the movie was good and the cast was great", "a good movie with a great story told well"]
  kw = dict(seed=3, synonyms=SYN)
  both = A.augment_texts(texts, "eda", epoch=0, indices=[10, 11], **kw)
  assert both == A.augment_texts(texts, "eda", epoch=0, indices=[10, 11], **kw)
  assert both[1] == A.augment_texts(texts[1:], "eda", epoch=0, indices=[11], **kw)[0]  # batch-free
  epochs = {tuple(A.augment_texts(texts, "eda", epoch=e, indices=[10, 11], **kw)) for e in range(6)}
  assert len(epochs) > 1
  assert A.augment_texts(texts, "identity", seed=0, epoch=0, indices=[0, 1]) == texts


def test_eda_ops_exact_behaviour():
  words = "the movie was good".split()
  rng = np.random.default_rng(0)
  assert A.random_deletion(words, rng, 0.0) == (words, None)
  kept, _ = A.random_deletion(words, rng, 1.0)
  assert len(kept) == 1 and kept[0] in words  # never empty
  swapped, _ = A.random_swap(words, rng, 3)
  assert sorted(swapped) == sorted(words)
  # "movie" and "good" have synonyms; n=1 replaces exactly one of them everywhere it occurs
  out, _ = A.synonym_replacement("Movie movie was good".split() + ["movie"], rng, 1,
                                 A.DictSynonyms({"movie": ["film"]}))
  assert out == "Film film was good film".split()
  out, _ = A.synonym_replacement(["Good", "the"], rng, 5, SYN)
  assert out == ["Fine", "the"]  # case kept, stop words untouched
  inserted, _ = A.random_insertion(["the", "movie"], rng, 2, A.DictSynonyms({"movie": ["film"]}))
  assert sorted(inserted) == ["film", "film", "movie", "the"]
  with pytest.raises(ValueError, match="synonym source"):
    A.augment_words(words, "eda", rng)


def test_paraphrase_column_is_used_by_strong_policies():
  texts = ["the movie was good", "great"]
  paras = [["le film etait bon -> the film was fine", "the picture was good"], None]
  out = A.augment_texts(texts, "strong", seed=0, epoch=0, indices=[0, 1], synonyms=SYN,
                        paraphrases=paras)
  assert out[0] in paras[0]
  assert out[1] == "outstanding"  # no paraphrase: EDA with synonyms
  assert A.augment_texts(texts, "backtranslation", seed=0, epoch=0, indices=[0, 1],
                         paraphrases=["p0", ""])[1] == "great"


# ------------------------------------------------------------------------------- NER alignment


def conll_sentences(path, n):
  """First n sentences of CoNLL-2003 as (words, BIO tags) (the file is IOB1)."""
  sents, words, tags = [], [], []
  for line in open(path, encoding="utf-8"):
    parts = line.split()
    if not parts or parts[0] == "-DOCSTART-":
      if words:
        sents.append((words, tags))
        words, tags = [], []
      if len(sents) == n:
        break
      continue
    tag = parts[-1]
    prev = tags[-1] if tags else "O"
    if tag.startswith("I-") and (prev == "O" or prev[2:] != tag[2:]):
      tag = "B-" + tag[2:]  # IOB1 -> BIO
    words.append(parts[0])
    tags.append(tag)
  return sents


def mentions(words, tags):
  out, cur = [], None
  for w, t in zip(words, tags):
    if t.startswith("B-"):
      cur = [t[2:], [w]]
      out.append(cur)
    elif t.startswith("I-"):
      assert cur is not None and cur[0] == t[2:], f"dangling {t} in {list(zip(words, tags))}"
      cur[1].append(w)
    else:
      cur = None
  return [(typ, tuple(ws)) for typ, ws in out]


@pytest.mark.parametrize("policy", ["weak", "eda"])
def test_ner_safe_ops_keep_labels_aligned_on_conll(shared_data, policy):
  sents = conll_sentences(shared_data / "conll2003" / "eng.train", 60)
  changed = 0
  for i, (words, tags) in enumerate(sents):
    for epoch in range(3):
      w2, t2 = A.augment_tagged(words, tags, policy, seed=0, epoch=epoch, index=i, synonyms=SYN)
      assert len(w2) == len(t2) and w2
      m1, m2 = mentions(words, tags), mentions(w2, t2)  # BIO stays valid
      if policy == "weak":
        assert m2 == m1  # deletion/swap never touch entity words
      else:
        assert [t for t, _ in m2] == [t for t, _ in m1]  # same entities, maybe synonym-replaced
      changed += (w2, t2) != (words, tags)
      assert (w2, t2) == A.augment_tagged(words, tags, policy, seed=0, epoch=epoch, index=i,
                                          synonyms=SYN)
  assert changed > 30


def test_multiword_synonym_of_an_entity_extends_its_span():
  words, tags = ["visit", "Germany", "now"], ["O", "B-LOC", "O"]
  w2, t2 = A.synonym_replacement(words, np.random.default_rng(0), 3, SYN, tags)
  assert w2 == ["visit", "Federal", "Republic", "of", "Germany", "now"]
  assert t2 == ["O", "B-LOC", "I-LOC", "I-LOC", "I-LOC", "O"]
  # insertions never land inside a span
  w3, t3 = A.random_insertion(["the", "movie", "New", "York", "Times"], np.random.default_rng(1), 20,
                              SYN, ["O", "O", "B-ORG", "I-ORG", "I-ORG"])
  assert mentions(w3, t3) == [("ORG", ("New", "York", "Times"))]


# ------------------------------------------------------------------------------- token ids


def test_token_ops_keep_special_tokens_and_report_sources():
  ids = np.array([101, 7, 8, 9, 10, 102, 11, 12, 102])
  special = [0, 101, 102]
  rng = np.random.default_rng(0)
  out, src = A.token_dropout(ids, rng, 1.0, special)
  assert out.tolist() == [101, 102, 102] and np.array_equal(ids[src], out)
  out, src = A.token_dropout(ids, rng, 1.0, special, replace_id=103)
  assert out.tolist() == [101, 103, 103, 103, 103, 102, 103, 103, 102] and len(src) == len(ids)
  for seed in range(20):
    out, src = A.span_cutoff(ids, np.random.default_rng(seed), 0.5, special)
    assert len(out) == len(ids) - 3  # round(0.5 * 6) content tokens
    assert np.array_equal(ids[src], out) and out.tolist().count(102) == 2 and out[0] == 101
    cut = np.setdiff1d(np.flatnonzero(~np.isin(ids, special)), src)
    content = np.flatnonzero(~np.isin(ids, special)).tolist()
    assert content.index(cut[-1]) - content.index(cut[0]) == 2  # contiguous among content tokens


def test_token_batch_is_deterministic_padded_and_carries_token_types():
  ids = np.array([[101, 5, 6, 7, 102, 8, 9, 102, 0, 0], [101, 4, 102, 0, 0, 0, 0, 0, 0, 0]])
  mask = (ids != 0).astype(np.int32)
  types = np.array([[0, 0, 0, 0, 0, 1, 1, 1, 0, 0], [0] * 10])
  kw = dict(seed=1, epoch=0, special_ids=[0, 101, 102], token_type_ids=types)
  a = A.augment_token_batch(ids, mask, "token_strong", indices=[4, 5], **kw)
  b = A.augment_token_batch(ids, mask, "token_strong", indices=[4, 5], **kw)
  assert all(np.array_equal(a[k], b[k]) for k in a)
  one = A.augment_token_batch(ids[:1], mask[:1], "token_strong", indices=[4], **kw)
  assert np.array_equal(one["input_ids"][0], a["input_ids"][0])
  for r in range(2):
    n = a["attention_mask"][r].sum()
    assert a["attention_mask"][r, :n].all() and not a["input_ids"][r, n:].any()
  row = a["input_ids"][0][:a["attention_mask"][0].sum()]
  t = a["token_type_ids"][0][:len(row)]
  second_sep = np.flatnonzero(row == 102)[0]
  assert (t[:second_sep + 1] == 0).all() and (t[second_sep + 1:] == 1).all() and row[-1] == 102
  assert a["input_ids"].shape == ids.shape and a["input_ids"].dtype == np.int32
  batch = A.add_strong_view({"unlabeled/input_ids": ids, "unlabeled/attention_mask": mask},
                            seed=1, epoch=0, indices=[4, 5], special_ids=[0, 101, 102])
  assert sorted(k for k in batch if "strong" in k) == [
      f"unlabeled/strong/{k}" for k in ("attention_mask", "input_ids", "token_type_ids")]
  with pytest.raises(ValueError, match="right-padded"):
    A.augment_token_batch(ids, mask[:, ::-1], "token_weak", indices=[0, 1], seed=0, epoch=0,
                          special_ids=[0])


# ------------------------------------------------------------------------------- WordNet


def write_mini_wordnet(root):
  """Two synsets in the real WordNet database format (offsets are byte positions)."""
  header = "  1 license line\n"
  off_a = len(header)
  syn_a = f"{off_a:08d} 00 a 03 happy 0 felicitous 0 glad(p) 1 000 | enjoying pleasure\n"
  off_b = off_a + len(syn_a)
  syn_b = f"{off_b:08d} 00 a 02 glad 0 beaming 0 000 | cheerful\n"
  data = header + syn_a + syn_b
  (root / "data.adj").write_text(data)
  (root / "index.adj").write_text(header + f"glad a 2 0 2 0 {off_a:08d} {off_b:08d}  \n"
                                  f"happy a 1 0 1 0 {off_a:08d}  \n")
  for pos in ("noun", "verb", "adv"):
    (root / f"data.{pos}").write_text(header)
    (root / f"index.{pos}").write_text(header)
  (root / "adj.exc").write_text("happier happy\n")


def test_wordnet_reader_on_database_format(tmp_path):
  write_mini_wordnet(tmp_path)
  wn = A.WordNetSynonyms(str(tmp_path))
  assert wn("happy") == ["felicitous", "glad"]
  assert wn("Glad") == ["happy", "felicitous", "beaming"]
  assert wn("happier") == ["felicitous", "glad"]  # exception list -> base form
  assert wn("zebra") == []


def test_real_wordnet_when_installed():
  try:
    wn = A.WordNetSynonyms()
  except FileNotFoundError as e:
    assert "apt-get install -y wordnet-base" in str(e)
    pytest.skip(str(e))
  assert {"glad", "felicitous"} <= set(wn("happy"))
  assert "domestic dog" in wn("dogs")  # morphy: dogs -> dog
  assert "run" in wn("running")


def test_missing_wordnet_names_the_install(tmp_path, monkeypatch):
  monkeypatch.setenv("WNSEARCHDIR", str(tmp_path))
  with pytest.raises(FileNotFoundError, match="wordnet-base"):
    A.WordNetSynonyms()


# ------------------------------------------------------------------------------- images


def test_image_policies_deterministic_and_range_preserving():
  r = np.random.default_rng(0)
  imgs = r.uniform(-1, 1, (3, 12, 12, 3)).astype(np.float32)
  kw = dict(seed=0, epoch=1, indices=[7, 8, 9], value_range=(-1.0, 1.0))
  a = A.augment_images(imgs, "strong", **kw)
  assert np.array_equal(a, A.augment_images(imgs, "strong", **kw))
  assert np.array_equal(a[1:], A.augment_images(imgs[1:], "strong", **{**kw, "indices": [8, 9]}))
  assert a.shape == imgs.shape and a.dtype == np.float32 and a.min() >= -1 and a.max() <= 1
  assert not np.allclose(a, imgs)
  np.testing.assert_allclose(A.augment_images(imgs, "identity", **kw), imgs, atol=1e-6)
  img = imgs[0] * 0.5 + 0.5
  assert np.array_equal(A.random_flip(img, r, p=1.0), img[:, ::-1])
  assert np.array_equal(A.random_crop(img, r, padding=0), img)
  out = A.cutout(np.zeros((10, 10, 1)), np.random.default_rng(0), ratio=0.4, fill=1.0)
  assert 0 < out.sum() <= 16  # a 4 x 4 square, clipped at the border
  for name, op in sorted(A._RA_OPS.items()):
    y = np.clip(op(img, 0.7, -1.0), 0, 1)
    assert y.shape == img.shape and np.isfinite(y).all(), name
  np.testing.assert_allclose(A._RA_OPS["solarize"](img, 1.0, 1.0), 1.0 - img)  # threshold 0
  assert np.array_equal(A._RA_OPS["identity"](img, 1.0, 1.0), img)
