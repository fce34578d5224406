"""Adversarial / smoothness-regularised fine-tuning on GLUE small tasks vs the supervised baseline.

    jaxft train --config experiments/adversarial_glue.py:rte,baseline --workdir workdirs/rte-base
    jaxft train --config experiments/adversarial_glue.py:rte,smart --workdir workdirs/rte-smart
    jaxft train --config experiments/adversarial_glue.py:sst2,freelb --workdir workdirs/sst2-freelb \
        --config.objective.freelb.steps=2
    jaxft table experiments/adversarial_glue.py --seeds 5              # "paper": GLUE x 3 methods
    jaxft table experiments/adversarial_glue.py --grid cpu --seeds 1   # MR, 6 methods + attacks

Arg: "<task>[,<objective>]", task in cola, sst2, mrpc, rte, stsb; objective in baseline
(supervised), fgm, pgd, freelb, smart, vat, r3f (default baseline). Model: MiniLM-L6 (the largest
model shipped offline besides MPNet-base; `--config.model.name=mpnet-base` for that one), with the
glue_small.py training settings so the baseline row equals that experiment. The perturbation
hyper-parameters are each objective's registry defaults (jaxft/objectives/adversarial.py), which
follow the papers: SMART eps = sigma = 1e-5, eta = 1e-3, lambda_s = mu = 1, beta = 0.99; FreeLB K = 3.
Robustness of the trained model: `jaxft.eval.robustness.pgd_robustness` (embedding PGD) and
`word_substitution_attack` (WordNet synonyms).

Grid "cpu": the "mr" rows (the quickstart's data and schedule, jaxft.config.movie_reviews_cpu: one
epoch of MR), each method at its defaults, then its best checkpoint attacked as
`jaxft eval --pgd-eps 1,2,4 --pgd-steps 5 --pgd-examples 500 --synonym-attack 100` does: L2 PGD on
the embedding output of the first 512 validation examples, and greedy WordNet synonym swaps (at
most 20% of the words) on the first 100. Expected (2-core CPU VM, seed 0, 2026-12-01; accuracy %,
PGD on 512 examples, synonyms on 100; step cost = the baseline's train examples/s, 57.3, over the
row's):
| row | clean | PGD eps 1 | eps 2 | eps 4 | synonyms: clean / under attack | step cost |
| mr-baseline | 84.25 | 53.52 | 19.34 | 3.32 | 82 / 31 | 1.00x |
| mr-fgm | 82.45 | 69.73 | 46.68 | 10.74 | 80 / 39 | 2.06x |
| mr-pgd | 83.77 | 66.99 | 41.99 | 6.84 | 81 / 40 | 3.07x |
| mr-freelb | 84.62 | 58.40 | 27.34 | 1.95 | 80 / 34 | 3.08x |
| mr-smart | 83.58 | 56.05 | 25.59 | 2.15 | 81 / 33 | 3.81x |
| mr-vat | 84.34 | 65.23 | 39.45 | 6.84 | 83 / 38 | 2.27x |

Published numbers (../shared/REFERENCES.md; BERT-base, so compare gains, not absolute values):
| paper | setting | baseline | with the method |
| FreeLB (Zhu et al. 2020) | GLUE test score, BERT-base | 78.3 | 79.4 |
| SMART (Jiang et al. 2020) | RTE acc, dev | 63.5 | 71.2 |
| SMART | CoLA MCC, dev | 54.7 | 59.1 |
| SMART | SST-2 acc, dev | 92.9 | 93.0 |
| SMART | MNLI-m acc, dev (not runnable here) | 84.5 | 85.6 |
The SMART rows are marked "verify before quoting" in REFERENCES.md.
"""

from jaxft.config import base_config, movie_reviews_cpu
from jaxft.harness.grid import Row

TASKS = ("cola", "sst2", "mrpc", "rte", "stsb", "mr")
OBJECTIVES = ("baseline", "fgm", "pgd", "freelb", "smart", "vat", "r3f")

# What `jaxft eval --pgd-eps 1,2,4 --pgd-steps 5 --pgd-examples 500 --synonym-attack 100` runs.
ATTACKS = {"pgd_eps": (1.0, 2.0, 4.0), "pgd_steps": 5, "pgd_examples": 500,
           "synonym_examples": 100}

# For `jaxft table`: the grids (row -> get_config arg or Row) and the paper numbers beside ours.
GRIDS = {
    "paper": {f"{t}-{o}": f"{t},{o}" for t in ("rte", "cola", "sst2", "mrpc")
              for o in ("baseline", "freelb", "smart")},
    "cpu": {f"mr-{o}": Row(f"mr,{o}", evaluate=ATTACKS)
            for o in ("baseline", "fgm", "pgd", "freelb", "smart", "vat")},
}
_ROBUST = "eval_validation_best/robustness"
METRICS = {"cpu": {
    "clean accuracy (PGD subset)": f"{_ROBUST}/pgd/clean_accuracy",
    **{f"PGD eps {e:g} accuracy": f"{_ROBUST}/pgd/pgd_l2/{e:g}/accuracy" for e in ATTACKS["pgd_eps"]},
    "synonyms: clean accuracy": f"{_ROBUST}/synonyms/clean_accuracy",
    "synonyms: accuracy under attack": f"{_ROBUST}/synonyms/accuracy_under_attack",
    "synonyms: attack success rate": f"{_ROBUST}/synonyms/attack_success_rate",
    "train examples/s": "train_examples_per_s",
}}
PAPER = {  # SMART paper, BERT-base dev
    ("rte-baseline", "accuracy"): 63.5, ("rte-smart", "accuracy"): 71.2,
    ("cola-baseline", "mcc"): 54.7, ("cola-smart", "mcc"): 59.1,
    ("sst2-baseline", "accuracy"): 92.9, ("sst2-smart", "accuracy"): 93.0,
}


def get_config(arg=None):
  task, _, objective = (arg or "rte").partition(",")
  objective = objective or "baseline"
  if task not in TASKS:
    raise ValueError(f"adversarial_glue: unknown task {task!r}; choose one of {', '.join(TASKS)}")
  if objective not in OBJECTIVES:
    raise ValueError(f"adversarial_glue: unknown objective {objective!r}; choose one of "
                     f"{', '.join(OBJECTIVES)}")
  c = base_config()
  c.model.name = "minilm-l6"
  c.data.name = task
  c.data.max_length = 128
  c.train.batch_size = 32
  c.train.num_epochs = 5.0 if task == "mrpc" else 3.0
  c.train.learning_rate = 1e-4
  c.train.warmup_ratio = 0.1
  if task == "mr":  # the CPU-sized row: MR, one epoch (jaxft.config.movie_reviews_cpu)
    movie_reviews_cpu(c)
  c.objective.name = "supervised" if objective == "baseline" else objective
  return c
