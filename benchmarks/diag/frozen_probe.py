"""How much 20 labels say on their own: a logistic regression (and a nearest class centroid) on
frozen, mean-pooled MiniLM-L6 embeddings of the MR-20 labeled set, scored on MR validation.

    python benchmarks/diag/frozen_probe.py [setting] [seed]   # default mr_20, seed 0
                                                              # (experiments/semisup_usb.py)

docs/results.md quotes its output (2-core CPU VM, 2026-11-30): logistic regression 57.6 / 62.7 /
56.9% and nearest centroid 56.7 / 60.9 / 55.9% for seeds 0 / 1 / 2.
"""

import sys

import jax.numpy as jnp
import numpy as np

from jaxft import assets
from jaxft.config import load
from jaxft.data import pipeline
from jaxft.models import from_pretrained
from jaxft.train.setup import load_tokenizer


def embed(model, tok, texts, max_length):
  out = []
  for i in range(0, len(texts), 128):
    enc = tok(list(texts[i:i + 128]), padding="max_length", truncation=True, max_length=max_length,
              return_tensors="np")
    b = {k: jnp.asarray(enc[k]) for k in ("input_ids", "attention_mask", "token_type_ids")}
    h = model.apply(model.params, b, deterministic=True, output_hidden_states=True).hidden_states[-1]
    m = b["attention_mask"][..., None]
    out.append(np.asarray((h * m).sum(1) / m.sum(1)))
  x = np.concatenate(out)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def main(setting="mr_20", seed="0"):
  c = load(f"experiments/semisup_usb.py:{setting}/supervised")
  c.seed = int(seed)  # the seed draws the labeled rows, as in `jaxft table --seeds`
  tok = load_tokenizer(c.model.name)
  data = pipeline.build(c.data, tok, batch_size=8, eval_batch_size=64, seed=int(c.seed))
  model = from_pretrained(assets.resolve_model(c.model.name), head="sequence_classification",
                          num_labels=data.info.num_labels)
  tr, va = data.examples["train"], data.examples["validation"]
  xtr, xva = (embed(model, tok, e.texts[0], int(c.data.max_length)) for e in (tr, va))
  ytr, yva = np.asarray(tr.labels), np.asarray(va.labels)
  k = data.info.num_labels
  w, b = np.zeros((xtr.shape[1], k)), np.zeros(k)
  for _ in range(2000):  # full-batch gradient descent on softmax cross-entropy, small L2
    z = xtr @ w + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(ytr)), ytr] -= 1
    w -= (xtr.T @ p) / len(ytr) + 1e-3 * w
    b -= p.sum(0) / len(ytr)
  centroids = np.stack([xtr[ytr == i].mean(0) for i in range(k)])
  print(f"{setting} seed {seed}: {len(ytr)} labeled, {len(yva)} validation")
  print(f"logistic regression on frozen embeddings: {100 * np.mean((xva @ w + b).argmax(1) == yva):.1f}%")
  print(f"nearest class centroid: {100 * np.mean((xva @ centroids.T).argmax(1) == yva):.1f}%")


if __name__ == "__main__":
  main(*sys.argv[1:])
