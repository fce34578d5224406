"""Adversarial / smoothness-regularised fine-tuning on GLUE small tasks vs the supervised baseline.

    jaxft train --config experiments/adversarial_glue.py:rte,baseline --workdir workdirs/rte-base
    jaxft train --config experiments/adversarial_glue.py:rte,smart --workdir workdirs/rte-smart
    jaxft train --config experiments/adversarial_glue.py:sst2,freelb --workdir workdirs/sst2-freelb \
        --config.objective.freelb.steps=2
    jaxft table experiments/adversarial_glue.py --seeds 5

Arg: "<task>[,<objective>]", task in cola, sst2, mrpc, rte, stsb; objective in baseline
(supervised), fgm, pgd, freelb, smart, vat, r3f (default baseline). Model: MiniLM-L6 (the largest
model shipped offline besides MPNet-base; `--config.model.name=mpnet-base` for that one), with the
glue_small.py training settings so the baseline row equals that experiment. The perturbation
hyper-parameters are each objective's registry defaults (jaxft/objectives/adversarial.py), which
follow the papers: SMART eps = sigma = 1e-5, eta = 1e-3, lambda_s = mu = 1, beta = 0.99; FreeLB K = 3.
Robustness of the trained model: `jaxft.eval.robustness.pgd_robustness` (embedding PGD) and
`word_substitution_attack` (WordNet synonyms).

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

TASKS = ("cola", "sst2", "mrpc", "rte", "stsb", "mr")
OBJECTIVES = ("baseline", "fgm", "pgd", "freelb", "smart", "vat", "r3f")

# For `jaxft table`: the grid (name -> get_config arg) and the paper numbers beside ours.
GRID = {f"{t}-{o}": f"{t},{o}" for t in ("rte", "cola", "sst2", "mrpc")
        for o in ("baseline", "freelb", "smart")}
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
  c.data.data_dir = "../shared/data/glue"
  c.data.max_length = 128
  c.train.batch_size = 32
  c.train.num_epochs = 5.0 if task == "mrpc" else 3.0
  c.train.learning_rate = 1e-4
  c.train.warmup_ratio = 0.1
  if task == "mr":  # the CPU-sized row: MR, one epoch (jaxft.config.movie_reviews_cpu)
    movie_reviews_cpu(c)
  c.objective.name = "supervised" if objective == "baseline" else objective
  return c
