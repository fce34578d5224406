"""What one training method adds to the train step: the `Part` the step builder composes.

A run's step is assembled from parts (jaxft.train.build): the objective's loss terms, and, when the
config asks for them, distillation, pruning, quantization-aware training, the spike guard, EMA /
SWA and reduce-on-plateau. Every field is optional; a part fills the ones its method needs:

  terms          name -> Weighted loss term, summed into the loss (jaxft.objectives.base).
  replaces       names of earlier parts' terms this part takes over (distillation's alpha * CE
                 replaces the plain supervised "sup").
  init           (trainable, frozen) -> (trainable, extras): leaves it adds to what trains
                 (distillation projections, movement scores) and the state extras it keeps.
  init_extras    (trainable, frozen) -> extras: the same when it adds no trainable leaves.
  update_extras  (old_state, new_state, metrics) -> extras, after each applied update (EMA).
  post_update    (trainable, new_state) -> trainable, after each applied update (pruning masks).
  eval_params    (flat params, extras) -> flat params: the weights evaluated and exported (the EMA
                 average, masks applied, training-only leaves dropped). Applied in reverse part
                 order, so the last part added undoes its wrapping first.
  wrap_apply     apply_fn -> apply_fn: the forward training and eval use (fake-quantized weights).
  wrap_step      step_factory -> step_factory, where a step factory is
                 `(apply_fn, terms, tx, **step_options) -> step` (default
                 jaxft.objectives.base.make_step): distillation and pruning bring their own step
                 functions this way, and they nest (pruning inside distillation).
  step_options   keyword arguments for the step factory (e.g. the spike guard).
  after_eval     (state, eval value) -> state, host side after every evaluation (reduce-on-plateau).
  eval_from_step evaluations before this step cannot be the best checkpoint (a pruning run's model
                 is the one asked for only once its schedule reaches the final sparsity).
  unlabeled      batches must carry an unlabeled part (keys prefixed "unlabeled/").
  strong_view    the unlabeled part also carries a strongly augmented copy ("unlabeled/strong/...",
                 data.strong_augment): FixMatch, UDA and the adaptive-threshold objectives.
  note           one line for the run's log (e.g. the pruning schedule).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping


@dataclasses.dataclass
class Part:
  terms: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  init_extras: Callable[[dict, dict], dict] | None = None
  update_extras: Callable[..., dict] | None = None
  unlabeled: bool = False
  strong_view: bool = False
  replaces: tuple[str, ...] = ()
  init: Callable[[dict, dict], tuple[dict, dict]] | None = None
  post_update: Callable[..., dict] | None = None
  eval_params: Callable[[dict, dict], dict] | None = None
  wrap_apply: Callable[[Callable], Callable] | None = None
  wrap_step: Callable[[Callable], Callable] | None = None
  step_options: dict = dataclasses.field(default_factory=dict)
  after_eval: Callable[[Any, float], Any] | None = None
  eval_from_step: int = 0
  name: str = ""
  note: str = ""

  def start(self, trainable: dict, frozen: dict) -> tuple[dict, dict]:
    """-> (trainable, extras entries) of this part at init."""
    extras = {}
    if self.init is not None:
      trainable, extras = self.init(trainable, frozen)
    if self.init_extras is not None:
      extras = {**extras, **self.init_extras(trainable, frozen)}
    return trainable, extras
