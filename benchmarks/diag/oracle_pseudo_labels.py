"""Controls for a self-training round: the same pool rows with their *true* labels (what the
teacher's choice of rows gives, without its label noise), or as many random pool rows with their
true labels (what that much clean data gives). Writes a data.pseudo_labels file for the config's
pool; train on it with `--config.data.pseudo_labels=OUT`.

    python benchmarks/diag/oracle_pseudo_labels.py experiments/semisup_usb.py:mr_100/supervised \
        workdirs/semisup_usb/cpu/mr_100-self_training/seed0/pseudo_labels/round-1.json OUT.json [random]

`jaxft table experiments/semisup_usb.py --grid cpu` builds the same controls as its rows
mr_100-true-{same,random}-rows (experiments/semisup_usb.py:true_label_file).
"""

import json
import pathlib
import sys

from jaxft.config import load, load_module

EXPERIMENT = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "semisup_usb.py"


def control_file(c, round_file, out, mode="same") -> dict:
  """Writes the control for config `c`'s pool to `out`; returns what it printed."""
  return load_module(EXPERIMENT).true_label_file(c, round_file, out, mode)


def main(spec, round_file, out, mode="same"):
  print(json.dumps(control_file(load(spec), round_file, out, mode)))


if __name__ == "__main__":
  main(*sys.argv[1:])
