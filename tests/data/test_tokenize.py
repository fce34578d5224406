"""Tokenization with the real MiniLM tokenizer on real rows: pairs, truncation counts, NER
first-sub-token alignment, the disk cache."""

import numpy as np
import pytest
import transformers

from jaxft.data import readers, tokenize
from jaxft.data.tasks import IGNORE, Examples


@pytest.fixture(scope="module")
def tok(minilm_dir):
  return transformers.AutoTokenizer.from_pretrained(str(minilm_dir))


@pytest.fixture(scope="module")
def mrpc(shared_data):
  _, rows = readers.read_delimited(shared_data / "glue" / "MRPC" / "dev.tsv", delimiter="\t",
                                   header=True, quoting=False)
  rows = rows[:80]
  return Examples(texts=([r[3] for r in rows], [r[4] for r in rows]),
                  labels=[int(r[0]) for r in rows], source="mrpc dev")


def test_pairs_match_the_tokenizer(tok, mrpc):
  enc = tokenize.encode(mrpc, tok, kind="classification", max_length=128)
  assert len(enc) == 80 and enc.labels.dtype == np.int32
  for i in (0, 17, 79):
    ref = tok(mrpc.texts[0][i], mrpc.texts[1][i])
    np.testing.assert_array_equal(enc.input_ids[enc.row(i)], ref["input_ids"])
    np.testing.assert_array_equal(enc.token_type_ids[enc.row(i)], ref["token_type_ids"])
  first = enc.input_ids[enc.row(0)]
  assert first[0] == tok.cls_token_id and first[-1] == tok.sep_token_id
  assert (first == tok.sep_token_id).sum() == 2
  assert not enc.truncated.any()
  np.testing.assert_array_equal(enc.labels, mrpc.labels)


def test_truncation_is_counted_exactly(tok, mrpc):
  full = [len(tok(a, b)["input_ids"]) for a, b in zip(*mrpc.texts)]
  enc = tokenize.encode(mrpc, tok, kind="classification", max_length=48)
  expected = np.array(full) > 48
  assert 0 < expected.sum() < 80
  np.testing.assert_array_equal(enc.truncated, expected)
  np.testing.assert_array_equal(enc.lengths, np.minimum(full, 48))
  stats = enc.stats()
  assert stats["n_truncated"] == int(expected.sum()) and stats["n_examples"] == 80
  assert stats["mean_length"] == pytest.approx(np.minimum(full, 48).mean())
  i = int(np.flatnonzero(expected)[0])  # a truncated pair still ends [SEP] b [SEP]
  ids = enc.input_ids[enc.row(i)]
  assert ids[-1] == tok.sep_token_id and (ids == tok.sep_token_id).sum() == 2


def test_ner_labels_on_first_subtoken(tok, shared_data):
  sents = readers.read_conll(shared_data / "conll2003" / "eng.testa")[:150]
  names = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC")
  ex = Examples(words=[w for w, _ in sents], labels=[[names.index(t) for t in tags]
                                                     for _, tags in sents], source="testa")
  enc = tokenize.encode(ex, tok, kind="token_classification", max_length=128)
  multi = 0
  for i, (words, tags) in enumerate(zip(ex.words, ex.labels)):
    sl = enc.row(i)
    labels, first = enc.labels[sl], enc.word_index[sl]
    pos = np.flatnonzero(labels != IGNORE)
    # exactly one labeled position per word, in word order, carrying the word's tag
    np.testing.assert_array_equal(first[pos], np.arange(len(words)))
    np.testing.assert_array_equal(labels[pos], tags)
    toks = tok.convert_ids_to_tokens(enc.input_ids[sl].tolist())
    for p, w in zip(pos, words):
      assert w.lower().startswith(toks[p]) or toks[p] == tok.unk_token
    multi += len(toks) - 2 - len(words)
    assert labels[0] == IGNORE and labels[-1] == IGNORE  # [CLS] / [SEP]
  assert multi > 50  # the sample really has words split into several sub-tokens
  assert enc.n_words.tolist() == [len(w) for w in ex.words]


def test_ner_truncation_drops_words(tok, shared_data):
  sents = readers.read_conll(shared_data / "conll2003" / "eng.testa")[:40]
  ex = Examples(words=[w for w, _ in sents], labels=[[0] * len(w) for w, _ in sents])
  enc = tokenize.encode(ex, tok, kind="token_classification", max_length=12)
  assert enc.lengths.max() == 12
  for i in np.flatnonzero(enc.truncated):
    labeled = (enc.labels[enc.row(i)] != IGNORE).sum()
    assert labeled < len(ex.words[i])
  full = [len(tok(w, is_split_into_words=True)["input_ids"]) for w in ex.words]
  np.testing.assert_array_equal(enc.truncated, np.array(full) > 12)


def test_cache_roundtrip_and_key(tok, mrpc, tmp_path):
  a = tokenize.encode(mrpc, tok, kind="classification", max_length=64, cache_dir=tmp_path)
  files = list(tmp_path.glob("*.npz"))
  assert len(files) == 1
  b = tokenize.encode(mrpc, tok, kind="classification", max_length=64, cache_dir=tmp_path)
  for f in ("input_ids", "token_type_ids", "offsets", "truncated", "labels"):
    np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
  assert b.pad_id == tok.pad_token_id
  k = lambda ex, n: tokenize.cache_key(tok, ex, kind="classification", max_length=n)
  assert k(mrpc, 64) == files[0].stem
  tok("a b c d e f g", truncation=True, max_length=4)  # call-time state must not change the key
  assert k(mrpc, 64) == files[0].stem
  assert k(mrpc, 32) != k(mrpc, 64)
  assert k(mrpc.select(range(79)), 64) != k(mrpc, 64)
  # the cache really is read: a tampered file comes back as is
  np.savez(files[0], **{**dict(np.load(files[0])), "labels": np.zeros(80, np.int32)})
  c = tokenize.encode(mrpc, tok, kind="classification", max_length=64, cache_dir=tmp_path)
  assert c.labels.sum() == 0 and a.labels.sum() > 0
