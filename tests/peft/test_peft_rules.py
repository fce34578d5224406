"""Partition rules: exact coverage, overlap and no-match errors, per-method trainable sets, unions,
and optimizer state only for trainable leaves."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from peft_toy import LAYERS, toy_init, peft_cfg
from jaxft import peft
from jaxft.config import base_config
from jaxft.peft.rules import Rule
from jaxft.core.state import TrainState, flatten, unflatten




def flat_for(method, **kw):
  c = peft_cfg(method, **kw)
  _, params = toy_init(peft.spec_from_config(c))
  return c, flatten(params)


def trainable_set(method, **kw):
  c, flat = flat_for(method, **kw)
  labels = peft.partition(c, flat, LAYERS)
  assert set(labels) == set(flat)
  return {k for k, v in labels.items() if v == "trainable"}, flat


# ---- the generic rule checker ------------------------------------------------------------------

FLAT = {"backbone/a/kernel": jnp.zeros((2, 3)), "backbone/a/bias": jnp.zeros(3),
        "head/kernel": jnp.zeros((3, 2))}


def test_label_params_covers_each_param_once():
  rules = [Rule("head", "^head/", "trainable"), Rule("b", "/bias$", "trainable"),
           Rule("rest", "^backbone/", "frozen", exclude=("/bias$",))]
  assert peft.label_params(FLAT, rules) == {"backbone/a/kernel": "frozen",
                                            "backbone/a/bias": "trainable",
                                            "head/kernel": "trainable"}


def test_overlap_of_different_labels_names_both_rules():
  rules = [Rule("head", "^head/", "trainable"), Rule("biases", "/bias$", "trainable"),
           Rule("backbone", "^backbone/", "frozen")]
  with pytest.raises(ValueError) as e:
    peft.label_params(FLAT, rules)
  msg = str(e.value)
  assert "backbone/a/bias is matched by rule 'biases' (trainable" in msg
  assert "rule 'backbone' (frozen" in msg
  assert "backbone/a/kernel" not in msg.split("Rules:")[0]  # only the real overlap is reported


def test_same_label_overlap_is_a_union_not_an_error():
  rules = [Rule("all", ".*", "trainable"), Rule("biases", "/bias$", "trainable")]
  assert set(peft.label_params(FLAT, rules).values()) == {"trainable"}


def test_uncovered_param_and_rule_matching_nothing_are_errors():
  with pytest.raises(ValueError, match=r"1 parameter\(s\) matched by no rule: head/kernel"):
    peft.label_params(FLAT, [Rule("bb", "^backbone/", "frozen")])
  with pytest.raises(ValueError, match=r"rule 'typo' \('lroa_a'\) matches no parameter"):
    peft.label_params(FLAT, [Rule("all", ".*", "frozen"), Rule("typo", "lroa_a", "trainable")])
  # A rule marked optional may match nothing.
  peft.label_params(FLAT, [Rule("all", ".*", "frozen"), Rule("opt", "zzz", "trainable",
                                                             required=False)])


def test_bad_rules_fail_at_construction():
  with pytest.raises(ValueError, match="label must be one of"):
    Rule("x", "a", "train")
  with pytest.raises(ValueError, match=r"rule 'x': invalid regex '\('"):
    Rule("x", "(", "frozen")


# ---- methods -----------------------------------------------------------------------------------

def test_unknown_method_lists_known_and_closest():
  with pytest.raises(ValueError) as e:
    peft.spec_from_config(peft_cfg("lora+bitfti"))
  msg = str(e.value)
  assert "unknown PEFT method 'bitfti'" in msg and "Did you mean 'bitfit'?" in msg
  for name in ("full", "linear_probe", "freeze_bottom", "adapter_houlsby", "ia3", "prompt"):
    assert name in msg
  with pytest.raises(ValueError, match="lora and dora cannot be combined"):
    peft.spec_from_config(peft_cfg("lora+dora"))
  with pytest.raises(ValueError, match="needs peft.lora_rank > 0"):
    peft.spec_from_config(peft_cfg("lora", lora_rank=0))
  with pytest.raises(ValueError, match="not a valid regex"):
    peft.spec_from_config(peft_cfg("lora", lora_targets="query|("))


def test_spec_from_config_sets_exactly_the_method_fields():
  base = peft.PeftSpec()
  assert peft.spec_from_config(peft_cfg("full")) == base
  assert peft.spec_from_config(peft_cfg("bitfit")) == base
  lora = peft.spec_from_config(peft_cfg("lora", lora_rank=4, lora_alpha=8.0, rslora=True))
  assert (lora.lora_rank, lora.lora_alpha, lora.rslora, lora.dora) == (4, 8.0, True, False)
  assert lora.lora_scale == pytest.approx(8.0 / 2.0)  # rsLoRA: alpha / sqrt(r)
  dora = peft.spec_from_config(peft_cfg("dora"))
  assert dora.dora and dora.lora_rank == 8 and dora.lora_scale == 2.0
  combo = peft.spec_from_config(peft_cfg("adapter_pfeiffer+ia3+prefix+prompt", adapter_size=5,
                                    prefix_length=3, prompt_length=2))
  assert (combo.adapter_size, combo.adapter_kind, combo.prefix_length, combo.prompt_length,
          combo.ia3_targets, combo.lora_rank) == (5, "pfeiffer", 3, 2, base_config().peft.ia3_targets, 0)


def _only(flat, pattern):
  return {k for k in flat if re.search(pattern, k)}


@pytest.mark.parametrize("method,pattern", [
    ("full", r"."),
    ("linear_probe", r"^head/"),
    ("bitfit", r"^head/|/bias$"),
    ("lora", r"^head/|/lora_[ab]$"),
    ("dora", r"^head/|/lora_[ab]$|/dora_m$"),
    ("ia3", r"^head/|/ia3$"),
    ("adapter_houlsby", r"^head/|/adapter_(down|up)/"),
    ("adapter_pfeiffer", r"^head/|/adapter_(down|up)/"),
    ("prefix", r"^head/|/prefix_(key|value)$"),
    ("prompt", r"^head/|/prompt$"),
])
def test_each_method_trains_exactly_its_parameters(method, pattern):
  trainable, flat = trainable_set(method, adapter_size=4, prefix_length=2, prompt_length=2,
                                  lora_rank=2)
  assert trainable == _only(flat, pattern)
  assert {k for k in flat if k.startswith("head/")} <= trainable  # the head always trains


def test_freeze_bottom_trains_top_layers_pooler_and_head():
  trainable, flat = trainable_set("freeze_bottom", freeze_layers=1)
  assert trainable == _only(flat, r"^head/|/layer_1/|/pooler/")
  assert not any("embeddings" in k or "layer_0" in k for k in trainable)
  trainable0, _ = trainable_set("freeze_bottom", freeze_layers=0)
  assert trainable0 == _only(flat, r"^head/|/layer_[01]/|/pooler/")
  with pytest.raises(ValueError, match=r"freeze_layers=3 must lie in \[0, num_layers=2\]"):
    trainable_set("freeze_bottom", freeze_layers=3)
  c, flat = flat_for("freeze_bottom", freeze_layers=1)
  with pytest.raises(ValueError, match="num_layers=4 but the parameters have layers 0..1"):
    peft.partition(c, flat, 4)


def test_combination_is_the_union_of_trainable_sets():
  kw = dict(adapter_size=4, lora_rank=2, prefix_length=2, freeze_layers=1)
  combo, flat = trainable_set("lora+bitfit+adapter_houlsby+freeze_bottom", **kw)
  expect = _only(flat, r"^head/|/lora_[ab]$|/adapter_(down|up)/|/layer_1/|/pooler/|/bias$")
  assert combo == expect
  # Bias leaves of adapters are claimed by the adapter rule only; BitFit trains pretrained biases.
  c, flat = flat_for("lora+bitfit", lora_rank=2)
  labels = peft.partition(c, flat, LAYERS)
  lora_only, _ = trainable_set("lora", lora_rank=2)
  bitfit_only, _ = trainable_set("bitfit")
  assert {k for k, v in labels.items() if v == "trainable"} == lora_only | bitfit_only


def test_peft_leaves_the_method_does_not_claim_are_uncovered():
  # Model built with LoRA hooks, config says bitfit: the lora leaves belong to no rule.
  _, params = toy_init(peft.spec_from_config(peft_cfg("lora", lora_rank=2)))
  with pytest.raises(ValueError, match=r"matched by no rule: .*lora_a"):
    peft.partition(peft_cfg("bitfit"), flatten(params), LAYERS)


def test_lora_targets_matching_no_module_is_a_clear_error():
  c = peft_cfg("lora", lora_targets="qeury")
  _, params = toy_init(peft.spec_from_config(c))
  with pytest.raises(ValueError, match=r"rule 'lora' .* matches no parameter. peft.lora_targets="
                                       r"'qeury' is searched in every Dense module path"):
    peft.partition(c, flatten(params), LAYERS)


def test_targets_are_regexes_over_module_paths():
  # "output/dense" hits both BERT output projections (attention output and FFN output).
  trainable, flat = trainable_set("ia3", ia3_targets="output/dense")
  assert _only(flat, "/ia3$") == {
      f"backbone/encoder/layer_{i}/{w}output/dense/ia3" for i in range(2) for w in ("attention/", "")}
  trainable, flat = trainable_set("lora", lora_targets="intermediate", lora_rank=2)
  assert {k.rsplit("/", 1)[0] for k in _only(flat, "lora_a$")} == {
      f"backbone/encoder/layer_{i}/intermediate/dense" for i in range(2)}


def test_count_is_exact():
  c, flat = flat_for("bitfit")
  labels = peft.partition(c, flat, LAYERS)
  counts = peft.count(flat, labels)
  biases = sum(int(np.prod(v.shape)) for k, v in flat.items() if k.endswith("/bias"))
  total = sum(int(np.prod(v.shape)) for v in flat.values())
  assert counts == {"trainable_params": biases + 12 * 3,  # + head kernel (bias already counted)
                    "total_params": total, "trainable_percent": 100.0 * (biases + 36) / total}
  with pytest.raises(ValueError, match="labels do not match"):
    peft.count(flat, {k: v for k, v in list(labels.items())[1:]})


# ---- optimizer state only for trainable leaves ---------------------------------------------------

def test_frozen_leaves_are_not_in_the_optimizer_tree():
  c, flat = flat_for("lora", lora_rank=2)
  labels = peft.partition(c, flat, LAYERS)
  trainable, frozen = peft.split(flat, labels)
  tx = optax.adamw(1e-3)
  state = TrainState.create(trainable, frozen, tx)
  mu = state.opt_state[0].mu
  assert set(mu) == set(trainable) and not set(mu) & set(frozen)
  assert peft.optimizer_guard(state.opt_state, labels) == 2 * len(trainable)  # mu and nu
  # An optimizer built over everything is caught.
  with pytest.raises(ValueError, match=r"holds state for \d+ frozen parameter"):
    peft.optimizer_guard(tx.init(flat), labels)


def test_masked_optimizer_over_one_tree_matches_the_split_state():
  c, flat = flat_for("lora", lora_rank=2)
  labels = peft.partition(c, flat, LAYERS)
  nested = unflatten(flat)
  grads = jax.tree_util.tree_map(lambda x: jnp.ones_like(x), nested)
  tx = optax.adam(0.1)
  masked = peft.masked_optimizer(tx, labels)
  state = masked.init(nested)
  assert peft.optimizer_guard(state, labels) == 2 * sum(v == "trainable" for v in labels.values())
  updates, _ = masked.update(grads, state, nested)
  flat_updates = flatten(updates)
  # Frozen leaves get exactly zero; trainable ones the same update as Adam over the split dict.
  trainable, _ = peft.split(flat, labels)
  ref, _ = tx.update({k: jnp.ones_like(v) for k, v in trainable.items()}, tx.init(trainable))
  for k, lab in labels.items():
    if lab == "frozen":
      assert not np.any(np.asarray(flat_updates[k]))
    else:
      np.testing.assert_array_equal(flat_updates[k], ref[k])
