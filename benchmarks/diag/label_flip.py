"""How often each augmentation policy changes what a fine-tuned teacher predicts: the label-flip
rate of every text and token policy of jaxft.data.augment on a run's validation split.

    python benchmarks/diag/label_flip.py WORKDIR [WORKDIR ...]

For each finished workdir (its best checkpoint is the teacher) and each policy, over the validation
rows: accuracy on the original and on the augmented rows, the share of rows whose predicted class
changes (flip), and the share of rows the teacher got right that it gets wrong after augmenting.
A strong view that keeps meaning moves few predictions; one that destroys the text moves many, and
then consistency training teaches the model to ignore what the augmentation removed. Text policies
(weak, eda) run on the words before tokenizing (EDA needs WordNet, `augment.WORDNET_INSTALL`);
token policies (token_weak, token_strong, the FixMatch / UDA default) on the token ids.
"""

import sys

import numpy as np

from jaxft.data import augment, batching, tokenize
from jaxft.data.examples import Examples
from jaxft.train.evaluate import Evaluator
from jaxft.train.restore import load_workdir
from jaxft.train.setup import load_tokenizer

TEXT = ("weak", "eda")
TOKEN = ("token_weak", "token_strong")
SEED = 0


def _logits(evaluator, state, enc, boundaries, batch_size, token_policy=None, special_ids=()):
  out = []
  for start, batch in zip(range(0, len(enc), batch_size),
                          batching.eval_batches(enc, batch_size=batch_size, boundaries=boundaries)):
    if token_policy:
      rows = np.arange(start, start + batch["input_ids"].shape[0])
      aug = augment.augment_token_batch(
          batch["input_ids"], batch["attention_mask"], token_policy, seed=SEED, epoch=0,
          indices=rows, special_ids=special_ids, pad_id=enc.pad_id,
          token_type_ids=batch.get("token_type_ids"))
      batch = {**batch, **aug}
    out.append(evaluator.real_logits(state, batch))
  return np.concatenate(out).argmax(-1)


def flip_rates(workdir) -> list[dict]:
  setup, state = load_workdir(workdir)
  data, config = setup.data, setup.config
  split = str(config.data.eval_split).split(",")[0]
  examples: Examples = data.examples[split]
  truth = np.asarray(examples.labels)
  tok = load_tokenizer(config.model.name)
  bs, max_len = int(config.train.eval_batch_size), int(config.data.max_length)
  evaluator = Evaluator(setup)

  def encode(ex):
    return tokenize.encode(ex, tok, kind="classification", max_length=max_len)

  original = encode(examples)
  base = _logits(evaluator, state, original, data.boundaries, bs)
  rows = [{"policy": "none", "accuracy": float(np.mean(base == truth)), "flip": 0.0,
           "right_to_wrong": 0.0}]
  synonyms = augment.WordNetSynonyms()
  idx = list(range(len(examples)))
  for policy in TEXT + TOKEN:
    if policy in TEXT:
      texts = tuple(augment.augment_texts(t, policy, seed=SEED, epoch=0, indices=idx,
                                          synonyms=synonyms) for t in examples.texts)
      pred = _logits(evaluator, state, encode(Examples(texts=texts, labels=examples.labels)),
                     data.boundaries, bs)
    else:
      pred = _logits(evaluator, state, original, data.boundaries, bs, token_policy=policy,
                     special_ids=tok.all_special_ids)
    right = base == truth
    rows.append({"policy": policy, "accuracy": float(np.mean(pred == truth)),
                 "flip": float(np.mean(pred != base)),
                 "right_to_wrong": float(np.mean(pred[right] != truth[right]))})
  return rows


def main(*workdirs):
  if not workdirs:
    raise SystemExit(__doc__)
  print("| teacher | policy | accuracy | flip rate | right -> wrong |")
  print("| --- | --- | ---: | ---: | ---: |")
  for w in workdirs:
    for r in flip_rates(w):
      print(f"| {w} | {r['policy']} | {100 * r['accuracy']:.2f} | {100 * r['flip']:.1f}% | "
            f"{100 * r['right_to_wrong']:.1f}% |")


if __name__ == "__main__":
  main(*sys.argv[1:])
