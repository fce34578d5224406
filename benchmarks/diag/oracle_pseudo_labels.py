"""Controls for a self-training round: the same pool rows with their *true* labels (what the
teacher's choice of rows gives, without its label noise), or as many random pool rows with their
true labels (what that much clean data gives). Writes a data.pseudo_labels file for the config's
pool; train on it with `--config.data.pseudo_labels=OUT`.

    python benchmarks/diag/oracle_pseudo_labels.py experiments/semisup_usb.py:mr_100/supervised \
        workdirs/cpu/usb-mr100-self_training/pseudo_labels/round-1.json OUT.json [random]

The README's self-training paragraph quotes the runs (MR-100, 2-core CPU VM).
"""

import json
import sys

import numpy as np

from jaxft.config import load
from jaxft.data import pipeline, pseudo_labels
from jaxft.train.setup import load_tokenizer


def control_file(c, round_file, out, mode="same") -> dict:
  """Writes the control for config `c`'s pool to `out`; returns what it printed."""
  data = pipeline.build(c.data, load_tokenizer(c.model.name), batch_size=int(c.train.batch_size),
                        eval_batch_size=int(c.train.eval_batch_size), seed=int(c.seed))
  rows, labels = pseudo_labels.load(round_file, data.unlabeled, data.info.num_labels)
  truth = np.asarray(data.unlabeled_labels)
  teacher_accuracy = float(np.mean(labels == truth[rows]))
  if mode == "random":
    rows = np.sort(np.random.default_rng(0).choice(len(truth), len(rows), replace=False))
  elif mode != "same":
    raise ValueError(f"mode must be 'same' or 'random', got {mode!r}")
  pseudo_labels.save(out, data.unlabeled, rows, truth[rows], control=f"true labels, {mode} rows",
                     of=str(round_file))
  return {"rows": len(rows), "teacher_label_accuracy": teacher_accuracy,
          "class_counts": np.bincount(truth[rows]).tolist(), "out": str(out)}


def main(spec, round_file, out, mode="same"):
  print(json.dumps(control_file(load(spec), round_file, out, mode)))


if __name__ == "__main__":
  main(*sys.argv[1:])
