"""Runs made of runs: a sequence or a mixture of ordinary training runs.

`run(config, workdir)` is what `jaxft train` and `jaxft table` call: it picks the recipe the config
asks for (self_training.rounds > 0: Noisy Student rounds, jaxft.recipes.self_training) and
otherwise trains one run (jaxft.train.loop.train_and_evaluate). Every recipe's runs go through the
same loop and step builder, so they share the NaN guard, checkpoints and exact resume.
"""

from __future__ import annotations


def run(config, workdir, *, overwrite: bool = False, devices=None) -> dict:
  """Runs (or resumes) the experiment in `config` in `workdir`; returns its results dict."""
  if config.multitask.tasks:
    from jaxft.recipes import multitask
    return multitask.run(config, workdir, overwrite=overwrite, devices=devices)
  if config.continual.tasks:
    from jaxft.recipes import continual
    return continual.run(config, workdir, overwrite=overwrite, devices=devices)
  if config.self_training.rounds > 0:
    from jaxft.recipes import self_training
    return self_training.run(config, workdir, overwrite=overwrite, devices=devices)
  from jaxft.train.loop import train_and_evaluate
  return train_and_evaluate(config, workdir, overwrite=overwrite, devices=devices)
