"""PEFT learning rates: per-method defaults only when peft.learning_rate is unset, the head and the
schedule following the PEFT rate, LoRA+ giving B its own rate, checked on the optimizer's own
first update (Adam's first step is lr * g / (|g| + eps) = lr * sign(g), to float32 rounding)."""

import jax.numpy as jnp
import pytest

from jaxft import peft
from jaxft.config import base_config, load
from jaxft.train import optim

A = "backbone/encoder/layer_0/attention/self/query/lora_a"
B = "backbone/encoder/layer_0/attention/self/query/lora_b"
BIAS = "backbone/encoder/layer_0/output/dense/bias"
KERNEL = "backbone/encoder/layer_0/output/dense/kernel"
HEAD = "head/classifier/kernel"
LAYERS = 1


def configs(method, *, lr=1e-4, peft_lr=0.0, head_lr=0.0, plus=0.0):
  c = base_config()
  c.train.learning_rate, c.train.head_learning_rate = lr, head_lr
  c.train.warmup_ratio, c.train.schedule, c.train.weight_decay = 0.0, "constant", 0.0
  c.peft.method, c.peft.learning_rate, c.peft.lora_plus_ratio = method, peft_lr, plus
  return c.train, c.peft


def first_update(train_cfg, peft_cfg, paths, guarded):
  """|update| of every leaf after one optimizer step on gradient +1 everywhere."""
  trainable = {p: jnp.ones((3, 2), jnp.float32) for p in paths}
  tx, schedule = optim.make_optimizer(train_cfg, trainable, LAYERS, 10, guarded=guarded,
                                      peft_cfg=peft_cfg)
  state = tx.init(trainable)
  grads = {p: jnp.ones_like(v) for p, v in trainable.items()}
  if guarded:
    updates, _ = tx.update(grads, state, trainable, apply_update=jnp.bool_(True))
  else:
    updates, _ = tx.update(grads, state, trainable)
  return {p: float(jnp.abs(u).max()) for p, u in updates.items()}, float(schedule(0))


@pytest.mark.parametrize("method,paths", [("lora", [A, B, HEAD]), ("bitfit", [BIAS, HEAD]),
                                          ("ia3", ["backbone/x/value/ia3", HEAD])])
def test_method_default_applies_when_peft_learning_rate_is_unset(method, paths):
  default = peft.METHODS[method].learning_rate
  assert default > 1e-4  # the point: larger than the full fine-tuning rate
  t, p = configs(method)
  rates = optim.learning_rates(t, p, paths)
  assert rates == {method: default, "head": default}  # the head follows the PEFT rate
  for guarded in (False, True):
    ups, peak = first_update(t, p, paths, guarded)
    assert peak == pytest.approx(default)  # the logged lr is the PEFT rate
    for path in paths:
      assert ups[path] == pytest.approx(default, rel=1e-5), path


def test_explicit_peft_learning_rate_wins_over_the_default():
  t, p = configs("lora", peft_lr=2e-4)
  assert optim.learning_rates(t, p, [A, B, HEAD]) == {"lora": 2e-4, "head": 2e-4}
  ups, peak = first_update(t, p, [A, B, HEAD], guarded=True)
  assert peak == pytest.approx(2e-4)
  assert ups == pytest.approx({A: 2e-4, B: 2e-4, HEAD: 2e-4}, rel=1e-5)
  assert peft.method_learning_rate(p, "bitfit") == 2e-4  # for every method of the run


def test_head_learning_rate_and_full_fine_tuning_keep_their_own_rates():
  t, p = configs("lora", head_lr=5e-3)
  default = peft.METHODS["lora"].learning_rate
  ups, _ = first_update(t, p, [A, B, HEAD], guarded=False)
  assert ups == pytest.approx({A: default, B: default, HEAD: 5e-3}, rel=1e-5)
  # full fine-tuning: train.learning_rate everywhere, as before peft.learning_rate existed
  t, p = configs("full", peft_lr=3e-2)
  assert optim.learning_rates(t, p, [KERNEL, BIAS, HEAD]) == {"train": 1e-4, "head": 1e-4}
  ups, peak = first_update(t, p, [KERNEL, BIAS, HEAD], guarded=True)
  assert peak == 1e-4 and ups == pytest.approx({KERNEL: 1e-4, BIAS: 1e-4, HEAD: 1e-4}, rel=1e-5)
  # full + lora: pretrained weights at train.learning_rate, LoRA leaves at LoRA's, head at train's
  t, p = configs("full+lora")
  assert optim.learning_rates(t, p, [KERNEL, A, B, HEAD]) == {
      "train": 1e-4, "lora": default, "head": 1e-4}


def test_combined_methods_each_train_at_their_own_default():
  t, p = configs("lora+bitfit")
  lora, bitfit = peft.METHODS["lora"].learning_rate, peft.METHODS["bitfit"].learning_rate
  assert lora != bitfit
  ups, peak = first_update(t, p, [A, B, BIAS, HEAD], guarded=True)
  assert peak == pytest.approx(lora)  # the first method leads
  assert ups == pytest.approx({A: lora, B: lora, BIAS: bitfit, HEAD: lora}, rel=1e-5)


@pytest.mark.parametrize("guarded", [False, True])
def test_lora_plus_gives_b_its_own_rate_in_the_optimizer_updates(guarded):
  t, p = configs("lora", peft_lr=1e-3, plus=16.0)
  assert optim.learning_rates(t, p, [A, B, HEAD]) == {"lora": 1e-3, "lora/lora_b": 1.6e-2,
                                                      "head": 1e-3}
  ups, _ = first_update(t, p, [A, B, HEAD], guarded)
  assert ups[A] == pytest.approx(1e-3, rel=1e-5) and ups[HEAD] == pytest.approx(1e-3, rel=1e-5)
  assert ups[B] == pytest.approx(16 * ups[A], rel=1e-5)
  for off in (0.0, 1.0):  # 0 / 1: off
    t, p = configs("lora", peft_lr=1e-3, plus=off)
    ups, _ = first_update(t, p, [A, B], guarded)
    assert ups[B] == pytest.approx(ups[A], rel=1e-5)


def test_lora_plus_applies_to_dora_b_only():
  t, p = configs("dora", peft_lr=1e-3, plus=4.0)
  m = "backbone/encoder/layer_0/attention/self/query/dora_m"
  ups, _ = first_update(t, p, [A, B, m], guarded=True)
  assert ups == pytest.approx({A: 1e-3, B: 4e-3, m: 1e-3}, rel=1e-5)


def test_layer_decay_still_multiplies_the_peft_rates():
  t, p = configs("lora", peft_lr=1e-3)
  t.layer_decay = 0.5
  deep = "backbone/encoder/layer_0/attention/self/query/lora_a"  # depth 1 of LAYERS + 1 = 2
  ups, _ = first_update(t, p, [deep, HEAD], guarded=False)
  assert ups == pytest.approx({deep: 5e-4, HEAD: 1e-3}, rel=1e-5)


def test_quickstart_with_only_the_method_flag_gets_the_method_default(tmp_path):
  for method in ("lora", "bitfit"):
    c = load("experiments/quickstart.py", [("peft.method", method)])
    assert c.train.learning_rate == 1e-4 and c.peft.learning_rate == 0
    rates = optim.learning_rates(c.train, c.peft, [A, B] if method == "lora" else [BIAS])
    assert rates == {method: peft.METHODS[method].learning_rate}
    assert optim.schedule_peak(c.train, c.peft) == peft.METHODS[method].learning_rate
    line = optim.describe_learning_rates(c.train, c.peft, [HEAD])
    assert line == (f"learning rates (peak): head {peft.METHODS[method].learning_rate:.3g} "
                    "(the PEFT rate)")


def test_every_peft_method_has_a_default_and_full_methods_none():
  for name, m in peft.METHODS.items():
    if name in ("full", "freeze_bottom"):
      assert m.learning_rate is None
    else:
      assert m.learning_rate is not None and 1e-4 < m.learning_rate <= 0.1, name


def test_the_builder_passes_config_peft_to_the_optimizer(tiny_bert_dir):
  """build(): LoRA leaves at the LoRA default while train.learning_rate stays 1e-4 (the step's
  logged lr is the schedule's peak); frozen pretrained weights have no rate at all."""
  from jaxft.models import from_pretrained
  from jaxft.train.build import build
  from jaxft.data.tasks import TaskInfo
  c = load("experiments/quickstart.py", [("peft.method", "lora"), ("train.warmup_ratio", "0")])
  model = from_pretrained(tiny_bert_dir, head="sequence_classification", num_labels=2,
                          peft=peft.spec_from_config(c.peft))
  info = TaskInfo(name="mr", kind="classification", label_names=("neg", "pos"), num_labels=2,
                  metric_names=("accuracy",), main_metric="accuracy")
  built = build(c, model, info, total_steps=10)
  default = peft.METHODS["lora"].learning_rate
  assert float(built.lr_schedule(0)) == pytest.approx(default)
  assert optim.learning_rates(c.train, c.peft, built.state.trainable) == {"head": default,
                                                                          "lora": default}
