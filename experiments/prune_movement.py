"""Movement pruning (Sanh et al. 2020) vs magnitude pruning while fine-tuning, GLUE small tasks.

    jaxft train --config experiments/prune_movement.py:movement,0.9,sst2 --workdir workdirs/mvp-sst2
    jaxft train --config experiments/prune_movement.py:soft_movement,0.9,sst2 --workdir workdirs/smvp
    jaxft train --config experiments/prune_movement.py:magnitude,0.97,sst2 --workdir workdirs/mag
    jaxft table experiments/prune_movement.py

Arg: "<method>[,<sparsity>[,<task>]]": method in magnitude, movement, soft_movement; sparsity the
final fraction of encoder weights removed (default 0.9, i.e. 10% left); task in sst2, mrpc, cola,
rte, stsb (default sst2). The model is MiniLM-L6 (the checkpoint available offline); the paper
prunes BERT-base on MNLI / QQP / SQuAD, which are not available here, so compare the *ordering*
of methods at high sparsity, not the absolute numbers.

Recipe of the paper (its masked_run_glue settings): 10 epochs, lr 3e-5 for the weights (1e-4 here
for the small MiniLM) and 1e-2 for the scores (no weight decay on scores), cubic sparsity schedule
starting after one epoch of warmup (begin_fraction 0.1) and reaching the target two epochs before
the end (end_fraction 0.8), masks updated every step, global scope over
the encoder's q/k/v/attention-output/FFN kernels. Soft movement raises the threshold tau from 0 to
0.1 with the same cubic schedule and lambda in proportion (final lambda 400), so its sparsity is
what tau and lambda produce rather than a set target; the `sparsity/total` metric reports it.

Published numbers (movement pruning paper, BERT-base + distillation, dev; ../shared/REFERENCES.md),
at 10% / 3% of encoder weights remaining:
| task      | dense | magnitude   | movement    | soft movement |
| MNLI acc  | 84.5  | 78.3 / 69.4 | 80.1 / 76.5 | 81.2 / 79.5 |
| QQP acc   | 91.4  | 79.8 / 72.4 | 89.7 / 86.1 | 90.2 / 89.1 |
| SQuAD F1  | 88.1  | 80.1 / 59.6 | 84.3 / 78.0 | 84.9 / 82.3 |
Magnitude pruning wins at low sparsity; movement pruning overtakes it at high sparsity (< 15% left).
"""

from jaxft.config import base_config, movie_reviews_cpu

METHODS = ("magnitude", "movement", "soft_movement")
TASKS = ("sst2", "mrpc", "cola", "rte", "stsb", "mr")

GRID = {f"{m},{s}": f"{m},{s},sst2" for m in METHODS for s in ("0.9", "0.97")}
PAPER = {  # MNLI accuracy of the paper at 10% / 3% remaining (a reference for the ordering only)
    ("magnitude,0.9", "mnli_accuracy"): 78.3, ("magnitude,0.97", "mnli_accuracy"): 69.4,
    ("movement,0.9", "mnli_accuracy"): 80.1, ("movement,0.97", "mnli_accuracy"): 76.5,
    ("soft_movement,0.9", "mnli_accuracy"): 81.2, ("soft_movement,0.97", "mnli_accuracy"): 79.5,
}


def get_config(arg=None):
  parts = (arg or "movement").split(",")
  method = parts[0]
  sparsity = float(parts[1]) if len(parts) > 1 and parts[1] else 0.9
  task = parts[2] if len(parts) > 2 and parts[2] else "sst2"
  if method not in METHODS:
    raise ValueError(f"prune_movement: unknown method {method!r}; choose one of {', '.join(METHODS)}")
  if task not in TASKS:
    raise ValueError(f"prune_movement: unknown task {task!r}; choose one of {', '.join(TASKS)}")
  if not 0.0 < sparsity < 1.0:
    raise ValueError(f"prune_movement: sparsity must be in (0, 1), got {sparsity}")
  c = base_config()
  c.model.name = "minilm-l6"
  c.data.name = task
  c.data.data_dir = "../shared/data/glue"
  c.data.max_length = 128
  c.train.batch_size = 32
  c.train.num_epochs = 10.0
  c.train.learning_rate = 1e-4
  c.train.warmup_ratio = 0.1
  if task == "mr":  # the CPU-sized row: MR, one epoch (jaxft.config.movie_reviews_cpu)
    movie_reviews_cpu(c)
  c.prune.method = method
  c.prune.final_sparsity = sparsity
  c.prune.initial_sparsity = 0.0
  c.prune.begin_fraction = 0.1
  c.prune.end_fraction = 0.8
  c.prune.frequency = 1
  c.prune.scope = "global"
  c.prune.score_init = 0.0
  c.prune.score_learning_rate = 1e-2
  c.prune.soft_threshold = 0.1
  c.prune.l1_weight = 400.0
  return c
