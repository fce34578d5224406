"""Movement pruning (Sanh et al. 2020) vs magnitude pruning while fine-tuning, GLUE small tasks.

    jaxft train --config experiments/prune_movement.py:movement,0.9,sst2 --workdir workdirs/mvp-sst2
    jaxft train --config experiments/prune_movement.py:soft_movement,0.9,sst2 --workdir workdirs/smvp
    jaxft train --config experiments/prune_movement.py:magnitude,0.97,sst2 --workdir workdirs/mag
    jaxft table experiments/prune_movement.py --seeds 3                 # "paper": SST-2, 10 epochs
    jaxft table experiments/prune_movement.py --grid cpu --seeds 1      # MR, one epoch (+ variants)
    jaxft table experiments/prune_movement.py --grid cpu_sst2 --seeds 1 # SST-2, one epoch

Arg: "<method>[,<sparsity>[,<task>]]": method in dense (no pruning; sparsity ignored), magnitude,
movement, soft_movement; sparsity the final fraction of encoder weights removed (default 0.9, i.e.
10% left); task in sst2, mrpc, cola, rte, stsb, mr (default sst2). The model is MiniLM-L6 (the
checkpoint available offline); the paper prunes BERT-base on MNLI / QQP / SQuAD, which are not
available here, so compare the *ordering* of methods at high sparsity, not the absolute numbers.

Recipe of the paper (its masked_run_glue settings): 10 epochs, lr 3e-5 for the weights (1e-4 here
for the small MiniLM) and 1e-2 for the scores (no weight decay on scores), cubic sparsity schedule
starting after one epoch of warmup (begin_fraction 0.1) and reaching the target two epochs before
the end (end_fraction 0.8), masks updated every step, global scope over
the encoder's q/k/v/attention-output/FFN kernels. Soft movement raises the threshold tau from 0 to
0.1 with the same cubic schedule and lambda in proportion (final lambda 400), so its sparsity is
what tau and lambda produce rather than a set target; the `sparsity/total` metric reports it.

Grid "cpu": MR for one epoch (the quickstart's data and schedule, jaxft.config.movie_reviews_cpu),
plus a three-epoch schedule, magnitude pruning distilled from a fine-tuned MPNet-base (alpha 0.5,
T 2, the teacher's own tokenizer), and MPNet-base pruned itself. Grid "cpu_sst2": SST-2 for one
epoch (2,104 steps). Expected (2-core CPU VM, seed 0, 2026-12-01, one run at a time; accuracy %):
| row | encoder sparsity | accuracy |
| dense | 0 | 84.25 |
| magnitude-0.9 / -0.97 | 90% / 97% | 74.43 / 60.09 |
| movement-0.9 / -0.9-late / -0.97 | 90% / 90% / 97% | 49.91 / 50.09 / 72.83 (*) |
| magnitude-0.9-3ep / movement-0.9-3ep | 90% | 77.92 / 50.09 |
| mpnet-dense (MPNet-base, the teacher) | 0 | 91.32 |
| magnitude-0.9-kd / -0.97-kd | 90% / 97% | 75.28 / 61.60 |
| soft_movement-0.9 | 0% | 84.06 |
| mpnet-magnitude-0.9 | 90% | 57.26 |
| sst2-dense (grid cpu_sst2, 2026-12-01) | 0 | 89.33 |
| sst2-magnitude-0.9 | 90% | 82.22 |
| sst2-soft_movement-0.9 | 80.8% | 88.99 |
| sst2-magnitude-0.808 | 80.8% | 85.32 |
(*) the loss leaves ln 2 only after the masks freeze, by chance: 49.91 on 2026-11-27.

Published numbers (movement pruning paper, BERT-base + distillation, dev; ../shared/REFERENCES.md),
at 10% / 3% of encoder weights remaining:
| task      | dense | magnitude   | movement    | soft movement |
| MNLI acc  | 84.5  | 78.3 / 69.4 | 80.1 / 76.5 | 81.2 / 79.5 |
| QQP acc   | 91.4  | 79.8 / 72.4 | 89.7 / 86.1 | 90.2 / 89.1 |
| SQuAD F1  | 88.1  | 80.1 / 59.6 | 84.3 / 78.0 | 84.9 / 82.3 |
Magnitude pruning wins at low sparsity; movement pruning overtakes it at high sparsity (< 15% left).
None of these tasks runs offline, so PAPER is empty: the table above is the reference for the
ordering only.
"""

from jaxft.config import base_config, movie_reviews_cpu
from jaxft.harness.grid import From, Row

METHODS = ("dense", "magnitude", "movement", "soft_movement")
TASKS = ("sst2", "mrpc", "cola", "rte", "stsb", "mr")

THREE_EPOCHS = {"train.num_epochs": 3.0, "prune.begin_fraction": 0.34, "prune.end_fraction": 0.8}
MPNET = {"model.name": "mpnet-base", "train.learning_rate": 5e-5}
KD = {"distill.teacher": From("mpnet-dense", "export"), "distill.own_tokenizer": True}
SST2_ONE_EPOCH = {"train.num_epochs": 1.0}

# For `jaxft table`: the grids (row -> get_config arg or Row).
GRIDS = {
    "paper": {"dense": "dense,0,sst2",
              **{f"{m}-{s}": f"{m},{s},sst2" for m in METHODS[1:] for s in ("0.9", "0.97")}},
    "cpu": {
        "dense": "dense,0,mr",
        "magnitude-0.9": "magnitude,0.9,mr",
        "magnitude-0.97": "magnitude,0.97,mr",
        "movement-0.9": "movement,0.9,mr",
        # the scores get the first third of the run before any weight is masked
        "movement-0.9-late": Row("movement,0.9,mr",
                                 {"prune.begin_fraction": 0.34, "prune.end_fraction": 0.9}),
        "movement-0.97": "movement,0.97,mr",
        "magnitude-0.9-3ep": Row("magnitude,0.9,mr", THREE_EPOCHS),
        "movement-0.9-3ep": Row("movement,0.9,mr", THREE_EPOCHS),
        "mpnet-dense": Row("dense,0,mr", MPNET),  # the distillation teacher
        "magnitude-0.9-kd": Row("magnitude,0.9,mr", KD),
        "magnitude-0.97-kd": Row("magnitude,0.97,mr", KD),
        "soft_movement-0.9": "soft_movement,0.9,mr",
        "mpnet-magnitude-0.9": Row("magnitude,0.9,mr", MPNET),
    },
    "cpu_sst2": {
        "sst2-dense": Row("dense,0,sst2", {**SST2_ONE_EPOCH, "train.eval_every": 1000,
                                           "train.log_every": 200}),
        "sst2-magnitude-0.9": Row("magnitude,0.9,sst2", SST2_ONE_EPOCH),
        "sst2-soft_movement-0.9": Row("soft_movement,0.9,sst2", SST2_ONE_EPOCH),
        # magnitude at the sparsity soft movement reached, for a like-for-like row
        "sst2-magnitude-0.808": Row("magnitude,0.808,sst2", SST2_ONE_EPOCH),
    },
}
PAPER = {}
METRICS = {grid: {"encoder sparsity": "last_train/sparsity/total",
                  "train examples/s": "train_examples_per_s"} for grid in GRIDS}


def get_config(arg=None):
  parts = (arg or "movement").split(",")
  method = parts[0]
  sparsity = float(parts[1]) if len(parts) > 1 and parts[1] else 0.9
  task = parts[2] if len(parts) > 2 and parts[2] else "sst2"
  if method not in METHODS:
    raise ValueError(f"prune_movement: unknown method {method!r}; choose one of {', '.join(METHODS)}")
  if task not in TASKS:
    raise ValueError(f"prune_movement: unknown task {task!r}; choose one of {', '.join(TASKS)}")
  if method != "dense" and not 0.0 < sparsity < 1.0:
    raise ValueError(f"prune_movement: sparsity must be in (0, 1), got {sparsity}")
  c = base_config()
  c.model.name = "minilm-l6"
  c.data.name = task
  c.data.max_length = 128
  c.train.batch_size = 32
  c.train.num_epochs = 10.0
  c.train.learning_rate = 1e-4
  c.train.warmup_ratio = 0.1
  if task == "mr":  # the CPU-sized row: MR, one epoch (jaxft.config.movie_reviews_cpu)
    movie_reviews_cpu(c)
  if method == "dense":
    return c
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
