"""Markdown tables from the runs of experiments/cpu_tables.sh (MiniLM-L6 on MR, one epoch, seed 0,
unless a row says otherwise).

    python experiments/cpu_report.py [workdirs/cpu]

Reads each run's results.json (validation accuracy, trainable parameters, training examples/s,
sparsity) and, for the adversarial rows, eval_validation_best.json (`jaxft eval --pgd-eps ...
--synonym-attack ...`). Rows whose run is missing are left out. Step cost is training examples/s
of the baseline over the row's (same machine; wall-clock, so other load on the machine shows).
"""

from __future__ import annotations

import json
import pathlib
import sys


def _load(root: pathlib.Path, name: str):
  path = root / name / "results.json"
  return json.loads(path.read_text()) if path.is_file() else None


def _acc(r) -> str:
  return f"{100 * r['eval']['accuracy']:.2f}"


def _table(root, header, rows, cells):
  """Markdown lines: the header row, its rule, and "| label | cells(results, run name) |" for each
  (label, run name) whose run finished."""
  out = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
  for label, name in rows:
    r = _load(root, name)
    if r:
      out.append("| " + " | ".join([label, *cells(r, name)]) + " |")
  return out


def peft_table(root):
  rows = [("full fine-tuning", "baseline"), ("BitFit", "peft-bitfit"), ("Houlsby adapter, 8", "peft-adapter_h8"),
          ("LoRA r=8 (q, v)", "peft-lora"), ("DoRA r=8 (q, v)", "peft-dora"), ("(IA)^3", "peft-ia3"),
          ("prefix, 16", "peft-prefix")]
  return _table(root, ("method", "trainable", "%", "accuracy", "train examples/s"), rows,
                lambda r, _: (f"{r['trainable_params']:,}",
                              f"{100 * r['trainable_params'] / r['total_params']:.3f}", _acc(r),
                              f"{r['train_examples_per_s']:.1f}"))


def adversarial_table(root):
  rows = [("baseline", "baseline"), ("FGM", "adv-fgm"), ("PGD-3", "adv-pgd"), ("FreeLB-3", "adv-freelb"),
          ("SMART", "adv-smart"), ("VAT", "adv-vat")]
  base = _load(root, "baseline")
  eps = None
  out = []
  for label, name in rows:
    r = _load(root, name)
    e = root / name / "eval_validation_best.json"
    if not r or not e.is_file():
      continue
    rob = json.loads(e.read_text()).get("robustness")
    if not rob:
      continue
    pgd, syn = rob["pgd"], rob["synonyms"]
    if eps is None:
      eps = sorted((k.split("/")[1] for k in pgd if k.startswith("pgd_l2/")), key=float)
      out += [f"| method | clean (all {_n_validation(root, 'baseline')}) | clean ({pgd['examples']}) | "
              + " | ".join(f"PGD eps {x}" for x in eps)
              + f" | synonyms: clean / under attack ({syn['examples']}) | attack success | step cost |",
              "| --- | ---: | ---: | " + " | ".join("---:" for _ in eps) + " | ---: | ---: | ---: |"]
    cost = base["train_examples_per_s"] / r["train_examples_per_s"]
    out.append(f"| {label} | {_acc(r)} | {100 * pgd['clean_accuracy']:.2f} | "
               + " | ".join(f"{100 * pgd[f'pgd_l2/{x}/accuracy']:.2f}" for x in eps)
               + f" | {100 * syn['clean_accuracy']:.0f} / {100 * syn['accuracy_under_attack']:.0f} | "
               f"{100 * syn['attack_success_rate']:.1f}% | {cost:.2f}x |")
  return out


def _records(root, name):
  return [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]


def _n_validation(root, name) -> str:
  """Validation examples of a run, from the info record its metrics.jsonl starts with."""
  found = [r["data/validation/n_examples"] for r in _records(root, name)
           if "data/validation/n_examples" in r]
  return str(found[0]) if found else "?"


def _sparsity(root, name) -> str:
  """The last logged sparsity/total of a pruning run."""
  found = [r["sparsity/total"] for r in _records(root, name)
           if r["kind"] == "train" and "sparsity/total" in r]
  return f"{max(100 * found[-1], 0.0):.1f}%" if found else "0"


def prune_table(root):
  rows = [("dense", "baseline"), ("magnitude -> 90%", "prune-magnitude-0.9"),
          ("magnitude -> 97%", "prune-magnitude-0.97"), ("movement -> 90%", "prune-movement-0.9"),
          ("movement -> 90%, scores warm up for 34% of steps", "prune-movement-0.9-late"),
          ("movement -> 97%", "prune-movement-0.97"),
          ("magnitude -> 90%, 3 epochs", "prune-magnitude-0.9-3ep"),
          ("movement -> 90%, 3 epochs, scores alone for the first", "prune-movement-0.9-3ep"),
          ("magnitude -> 90%, distilled from MPNet-base", "prune-magnitude-0.9-kd"),
          ("magnitude -> 97%, distilled from MPNet-base", "prune-magnitude-0.97-kd"),
          ("soft movement (tau 0.1, lambda 400)", "prune-soft_movement-0.9"),
          ("MPNet-base: dense (the distillation teacher)", "mpnet-teacher"),
          ("MPNet-base: magnitude -> 90%", "prune-magnitude-0.9-mpnet"),
          ("SST-2, one epoch: dense", "sst2-dense"),
          ("SST-2, one epoch: magnitude -> 90%", "prune-magnitude-0.9-sst2"),
          ("SST-2, one epoch: soft movement (tau 0.1, lambda 400)", "prune-soft_movement-0.9-sst2"),
          ("SST-2, one epoch: magnitude -> 80.8% (soft movement's sparsity)",
           "prune-magnitude-0.81-sst2")]
  dense = {"baseline", "mpnet-teacher", "sst2-dense"}
  return _table(root, ("method", "encoder sparsity reached", "accuracy", "train examples/s"), rows,
                lambda r, name: ("0" if name in dense else _sparsity(root, name), _acc(r),
                                 f"{r['train_examples_per_s']:.1f}"))


def distill_table(root):
  rows = [("teacher: MiniLM-L6 fine-tuned", "baseline"),
          ("student: teacher layers 0, 2, 4, labels only (alpha 1)", "kd-half_alone"),
          ("student: same, distilled (alpha 0.5, T 2)", "kd-half"),
          ("student: same, distilled + hidden-state and attention-map MSE (TinyBERT)",
           "kd-half_tinybert"),
          ("teacher: MPNet-base fine-tuned", "mpnet-teacher"),
          ("student: MiniLM-L6, labels only (= the MiniLM teacher above)", "baseline"),
          ("student: MiniLM-L6, distilled from MPNet-base (alpha 0.5, T 2)", "kd-mpnet-l6"),
          ("student: MiniLM-L6 layers 0, 2, 4, labels only", "l3-alone"),
          ("student: MiniLM-L6 layers 0, 2, 4, distilled from MPNet-base", "kd-mpnet-l3")]
  return _table(root, ("model", "params", "accuracy"), rows,
                lambda r, _: (f"{r['total_params'] / 1e6:.1f}M", _acc(r)))


def semisup_table(root):
  """MR with 50 labels per class (experiments/semisup_usb.py:mr_100/<algorithm>)."""
  rows = [("labeled only", "usb-mr100-supervised"), ("FixMatch", "usb-mr100-fixmatch"),
          ("UDA", "usb-mr100-uda"), ("Mean Teacher", "usb-mr100-mean_teacher"),
          ("PseudoLabel", "usb-mr100-pseudo_label"),
          ("Noisy Student (2 rounds of 1000 pseudo-labels per class)", "usb-mr100-self_training"),
          ("control: round 1's 2000 rows with their true labels", "usb-mr100-true-same-rows"),
          ("control: 2000 random pool rows with their true labels", "usb-mr100-true-random-rows"),
          ("MR-20: labeled only", "usb-mr20-supervised"),
          ("MR-20: Noisy Student (2 rounds)", "usb-mr20-self_training")]
  return _table(root, ("algorithm", "accuracy", "error %"), rows,
                lambda r, _: (_acc(r), f"{100 - 100 * r['eval']['accuracy']:.2f}"))


def self_training_table(root):
  """One row per round of each self-training run (results.json "self_training")."""
  out = ["| run | round | train rows | pseudo-labeled | pseudo-label accuracy | accuracy |",
         "| --- | ---: | ---: | ---: | ---: | ---: |"]
  for name in ("usb-mr100-self_training", "usb-mr20-self_training"):
    r = _load(root, name)
    for rnd in (r or {}).get("self_training", []):
      acc = rnd.get("pseudo_label_accuracy")
      out.append(f"| {name} | {rnd['round']} | {rnd['train_examples']} | "
                 f"{rnd.get('pseudo_labeled', '-')} | "
                 f"{'-' if acc is None else f'{100 * acc:.1f}'} | {_acc(rnd)} |")
  return out


def pseudo_label_trace(root, name="usb-mr100-fixmatch-diag", every=250):
  """FixMatch's mask rate and pseudo-label accuracy (data.unlabeled_label_metrics) along a run,
  each the mean over the logged steps of its window, beside the evaluations."""
  if not _load(root, name):
    return []
  records = _records(root, name)
  evals = {r["step"]: r["eval/accuracy"] for r in records if "eval/accuracy" in r}
  out = ["| steps | mask rate | pseudo-label accuracy (masked rows) | eval accuracy at end |",
         "| --- | ---: | ---: | ---: |"]
  train = [r for r in records if r["kind"] == "train" and "unsup/pseudo_label_accuracy" in r]
  for start in range(0, max(r["step"] for r in train), every):
    window = [r for r in train if start < r["step"] <= start + every]
    if not window:
      continue
    mean = lambda k: sum(r[k] for r in window) / len(window)
    end = start + every
    out.append(f"| {start + 1}-{end} | {mean('unsup/mask_rate'):.2f} | "
               f"{100 * mean('unsup/pseudo_label_accuracy'):.1f} | "
               f"{f'{100 * evals[end]:.2f}' if end in evals else '-'} |")
  return out


def main(argv=None):
  root = pathlib.Path((argv or sys.argv[1:] or ["workdirs/cpu"])[0])
  for title, fn in (("PEFT", peft_table), ("Adversarial", adversarial_table),
                    ("Pruning", prune_table), ("Distillation", distill_table),
                    ("Semi-supervised, MR-100", semisup_table),
                    ("Self-training rounds", self_training_table),
                    ("FixMatch pseudo-labels along training, MR-100", pseudo_label_trace)):
    print(f"{title}\n")
    print("\n".join(fn(root)))
    print()


if __name__ == "__main__":
  main()
