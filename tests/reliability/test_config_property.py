"""Property test over whole configs: any combination of options either trains or is refused by name.

Hypothesis draws a handful of options (objective, PEFT method, pruning, quantization, averaging,
schedule, batch and accumulation sizes, lengths and buckets, semi-supervised splits, mesh shape,
guards) on top of the shared tiny run, and runs `jaxft train` in-process for one step and one eval.
The run must end with exit status 0 and results, or exit status 2 with a one-line message that names
a config key (`section.key`); an internal traceback fails the test.
"""

import json
import os
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxft import cli
from jaxft.objectives import registry
from jaxft.peft.methods import METHODS

from reliability_runs import overrides

OPTIONS = {
    "objective.name": sorted(registry.defaults()),
    "peft.method": sorted(METHODS) + ["lora+bitfit", "ia3+bitfit"],
    "peft.lora_rank": [1, 4],
    "peft.lora_targets": ["qv", "attention", "all-linear"],
    "prune.method": ["", "magnitude", "movement", "soft_movement"],
    "prune.frequency": [1, 2],
    "quant.method": ["", "qat_int8", "ptq_int8"],
    "train.batch_size": [1, 2, 4, 6, 8],
    "train.grad_accum_steps": [1, 2, 3],
    "train.schedule": ["linear", "cosine", "constant", "cosine_restarts", "plateau"],
    "train.layer_decay": [1.0, 0.8],
    "train.head_learning_rate": [0.0, 1e-3],
    "train.grad_clip": [0.0, 1.0],
    "train.ema_decay": [0.0, 0.9],
    "train.swa_start": [-1, 0],
    "train.eval_with": ["params", "ema", "swa"],
    "train.spike_factor": [0.0, 10.0],
    "train.nan_policy": ["skip", "error", "none"],
    "train.rng_impl": ["threefry2x32", "rbg", "unsafe_rbg"],
    "data.max_length": [8, 16, 32],
    "data.bucket_boundaries": ["", "8", "8,16", "64"],
    "data.labeled_per_class": [0, 2],
    "data.unlabeled_ratio": [0, 1, 2],
    "mesh.data": [-1, 1, 2, 3],
    "mesh.fsdp": [1, 2],
}
# A config key such as train.batch_size, not a module path such as jaxft.data.augment.
KEY = re.compile(r"(?<![\w.])(" + "|".join(sorted({k.split(".")[0] for k in OPTIONS} | {
    "model", "distill", "self_training", "multitask", "continual"})) + r")\.[a-z_]+")

choices = st.lists(st.sampled_from(sorted(OPTIONS)), min_size=2, max_size=6, unique=True).flatmap(
    lambda keys: st.fixed_dictionaries({k: st.sampled_from(OPTIONS[k]) for k in keys}))


# CI runs a fixed sample; JAXFT_PROPERTY_EXAMPLES=N draws N fresh configs (a longer local search).
_FRESH = int(os.environ.get("JAXFT_PROPERTY_EXAMPLES", 0))


@settings(max_examples=_FRESH or 8, deadline=None, derandomize=not _FRESH, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(choices)
def test_any_config_trains_a_step_or_is_refused_naming_a_key(tiny_model, tmp_path_factory,
                                                            capsys, options):
  workdir = tmp_path_factory.mktemp("run")
  extra = {"data.max_train_examples": 24, "data.max_eval_examples": 8, "data.max_length": 16,
           "data.bucket_boundaries": "16", "train.num_steps": 1, "train.checkpoint_every": 1,
           "train.eval_every": 1, **options}
  argv = ["train", "--config", "experiments/quickstart.py:smoke", "--workdir", str(workdir),
          *overrides(tiny_model, **{k.replace(".", "__"): v for k, v in extra.items()})]
  status = cli.main(argv)  # an internal bug raises here, with its traceback
  out, err = capsys.readouterr()
  if _FRESH:  # a long local search shows each config and its outcome
    with capsys.disabled():
      print(f"\n{options} -> {status} {err.strip()[-300:] if status else ''}")
  if status == 0:
    results = json.loads((workdir / "results.json").read_text())
    assert results["steps"] == 1 and results["eval"], results
  else:
    assert status == 2, err
    assert KEY.search(err), f"the refusal names no config key: {err!r} for {options}"
