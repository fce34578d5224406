"""Does a fine-tuned model survive unstructured masking it was not trained for? Zeroes a fraction
of the encoder's prunable weights of a finished workdir at random and by magnitude, and scores
the validation split each time.

    python benchmarks/diag/random_masks.py workdirs/cpu/baseline [0.13,0.26,0.5]

The README's pruning paragraph quotes it (MiniLM-L6 on MR, 2-core CPU VM): the reason movement
pruning, whose scores are near random early on, collapses on a one-epoch schedule.
"""

import sys

import jax.numpy as jnp
import numpy as np

from jaxft.objectives import prune
from jaxft.train.evaluate import Evaluator
from jaxft.train.restore import load_workdir


def main(workdir, fractions="0.13,0.26,0.5"):
  setup, state = load_workdir(workdir)
  flat = {**state.frozen, **state.trainable}
  paths = prune.prunable_paths(flat)
  rng = np.random.default_rng(0)
  ev = Evaluator(setup)
  for s in (float(x) for x in fractions.split(",")):
    random_scores = {p: jnp.asarray(rng.normal(size=flat[p].shape), jnp.float32) for p in paths}
    for name, masks in (("random", prune.topk_masks(random_scores, s)),
                        ("magnitude", prune.magnitude_masks({p: flat[p] for p in paths}, s))):
      masked = state.replace(trainable=prune.apply_masks(state.trainable, masks))
      print(f"{s:.0%} of encoder weights zeroed by {name}: "
            f"accuracy {100 * ev.evaluate(masked)['accuracy']:.1f}")


if __name__ == "__main__":
  main(*sys.argv[1:])
