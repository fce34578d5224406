"""PEFT on a real (tiny, random) BERT from jaxft.models: closed-form parameter counts, training
with the real step (frozen leaves bitwise unchanged, no moments for them, loss falls), identity at
init, merged == unmerged logits, export and reload.

Tiny BERT: hidden H = 36, 2 layers, 3 heads (head_dim 12), intermediate I = 50, vocab 61,
40 positions, 2 token types, 3 labels. (Hidden 32 does not split over 3 heads.)
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peft_toy import peft_cfg
from jaxft import peft
from jaxft.config import base_config
from jaxft.models import from_pretrained, init_random
from jaxft.objectives.base import Weighted, make_step
from jaxft.objectives.supervised import classification_term
from jaxft.train.optim import make_optimizer
from jaxft.core.state import TrainState, flatten, unflatten

H, L, NH, I, V, POS, TYPES, C = 36, 2, 3, 50, 61, 40, 2, 3
HF = dict(model_type="bert", vocab_size=V, hidden_size=H, num_hidden_layers=L,
          num_attention_heads=NH, intermediate_size=I, max_position_embeddings=POS,
          type_vocab_size=TYPES)
HEAD = H * C + C  # classifier kernel + bias




@pytest.fixture(scope="module")
def base():
  """The plain model (no PEFT hooks); every PEFT model below shares its module config and weights."""
  # seed 7: from_pretrained initialises with seed 0, so fresh init values never equal the loaded ones
  return init_random(HF, head="sequence_classification", num_labels=C, seed=7)


@pytest.fixture(scope="module")
def base_dir(base, tmp_path_factory):
  return base.save_pretrained(tmp_path_factory.mktemp("peft") / "base")


def _module(base, spec):
  return base.module.clone(cfg=dataclasses.replace(base.module.cfg, peft=spec))


def _init_fn(module):
  dummy = {"input_ids": jnp.zeros((1, 4), jnp.int32),
           "attention_mask": jnp.ones((1, 4), jnp.int32), "token_type_ids": None}
  return lambda key: module.init(key, dummy)["params"]


def shapes(base, c):
  """Flat {path: ShapeDtypeStruct} of the model built with config.peft `c` (no compute)."""
  return flatten(jax.eval_shape(_init_fn(_module(base, peft.spec_from_config(c))),
                                jax.random.key(0)))


def build(base, c, seed=0):
  """Like from_pretrained(..., peft=spec): the base weights plus freshly initialised PEFT leaves."""
  spec = peft.spec_from_config(c)
  module = _module(base, spec)
  fresh = flatten(jax.jit(_init_fn(module))(jax.random.key(seed)))
  base_flat = flatten(base.params)
  params = peft.init_dora(unflatten({k: base_flat.get(k, v) for k, v in fresh.items()}), spec)
  return dataclasses.replace(base, module=module, params=params)


def random_peft(base, c, seed=1):
  """The base weights plus random (non-identity) PEFT leaves: B != 0, l != 1, m != ||W||_c."""
  spec = peft.spec_from_config(c)
  base_flat = flatten(base.params)
  flat = {}
  for i, (k, s) in enumerate(shapes(base, c).items()):
    if k in base_flat:
      flat[k] = base_flat[k]
      continue
    r = jax.random.normal(jax.random.fold_in(jax.random.key(seed), i), s.shape, s.dtype)
    flat[k] = 1.0 + 0.3 * r if k.endswith(("ia3", "dora_m")) else 0.3 * r
  return dataclasses.replace(base, module=_module(base, spec), params=unflatten(flat))


def batch(seed=0, b=8, s=12):
  rs = np.random.RandomState(seed)
  ids = rs.randint(3, V, (b, s)).astype(np.int32)
  mask = (np.arange(s)[None] < rs.randint(4, s + 1, (b, 1))).astype(np.int32)
  return {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": np.zeros_like(ids),
          "labels": (np.arange(b) % C).astype(np.int32), "example_mask": np.ones(b, np.float32)}


def logits(model, params):
  return jax.jit(lambda p, b: model.apply(p, b).logits)(params, batch())


def outputs(model, params):
  """(logits [B, C], last_hidden_state [B, S, H]) of the test batch."""
  out = jax.jit(lambda p, b: model.apply(p, b))(params, batch())
  return out.logits, out.last_hidden_state


# ---- parameter counts: closed-form formulas per method -----------------------------------------

BIASES = H + L * (3 * H + H + H + I + H + H) + H  # emb LN; q,k,v, attn out, attn LN, I, out, LN; pooler
LAYER = 4 * (H * H + H) + 2 * 2 * H + (H * I + I) + (I * H + H)
TOTAL = (V + POS + TYPES) * H + 2 * H + L * LAYER + (H * H + H) + HEAD

R, M, P = 4, 5, 6
CASES = {
    "full": (dict(), TOTAL),
    "linear_probe": (dict(), HEAD),
    "freeze_bottom": (dict(freeze_layers=1), HEAD + LAYER + H * H + H),  # layer_1 + pooler
    "bitfit": (dict(), HEAD + BIASES),
    # LoRA on query and value: r * (in + out) per targeted Dense.
    "lora": (dict(lora_rank=R), HEAD + L * 2 * R * (H + H)),
    "lora_intermediate": (dict(lora_rank=R, lora_targets="intermediate"), HEAD + L * R * (H + I)),
    # DoRA adds the magnitude vector, out per target.
    "dora": (dict(lora_rank=R), HEAD + L * 2 * (R * (H + H) + H)),
    # (IA)^3 on key, value, attention-output and FFN-output projections: out per target.
    "ia3": (dict(), HEAD + L * 4 * H),
    # Houlsby: 2 adapters per layer x (2 H m + m + H); Pfeiffer: 1 per layer.
    "adapter_houlsby": (dict(adapter_size=M), HEAD + L * 2 * (2 * H * M + M + H)),
    "adapter_pfeiffer": (dict(adapter_size=M), HEAD + L * (2 * H * M + M + H)),
    "prefix": (dict(prefix_length=P), HEAD + 2 * L * P * H),
    "prompt": (dict(prompt_length=P), HEAD + P * H),
    "lora+bitfit": (dict(lora_rank=R), HEAD + L * 2 * R * (H + H) + BIASES),
}


@pytest.mark.parametrize("name", list(CASES))
def test_trainable_counts_match_closed_form(base, name):
  kw, expected = CASES[name]
  method = "lora" if name == "lora_intermediate" else name
  c = peft_cfg(method, **kw)
  flat = shapes(base, c)
  counts = peft.count(flat, peft.partition(c, flat, L))
  base_flat = flatten(base.params)
  assert peft.count(base_flat, {k: "frozen" for k in base_flat})["total_params"] == TOTAL
  added = sum(int(np.prod(v.shape)) for k, v in flat.items() if k not in base_flat)
  assert counts["trainable_params"] == expected
  assert counts["total_params"] == TOTAL + added
  assert counts["trainable_percent"] == pytest.approx(100 * expected / (TOTAL + added))


# ---- training with the real step ----------------------------------------------------------------

def train(m, c, steps, lr=1e-2):
  """`steps` real optimizer steps (make_step + supervised CE + make_optimizer) on one batch."""
  flat = flatten(m.params)
  labels = peft.partition(c, flat, L)
  trainable, frozen = peft.split(flat, labels)
  tc = base_config().train
  tc.learning_rate, tc.warmup_ratio, tc.schedule = lr, 0.0, "constant"
  tx, schedule = make_optimizer(tc, trainable, L, steps)
  state = TrainState.create(trainable, frozen, tx)
  step = jax.jit(make_step(m.apply, {"sup": Weighted(classification_term())}, tx,
                           lr_schedule=schedule))
  b = jax.tree_util.tree_map(jnp.asarray, batch())
  frozen0, trainable0 = jax.device_get(state.frozen), jax.device_get(state.trainable)
  losses = []
  for _ in range(steps):
    state, metrics = step(state, b, jax.random.key(0))
    losses.append(float(metrics["loss"]))
  return labels, state, frozen0, trainable0, losses


def check_frozen_and_moments(labels, state, frozen0, trainable0):
  assert set(state.frozen) == {k for k, v in labels.items() if v == "frozen"}
  for k, v in frozen0.items():
    np.testing.assert_array_equal(np.asarray(state.frozen[k]), v, err_msg=k)
  adam = state.opt_state[1][0]  # chain(clip, adamw); adamw = chain(scale_by_adam, ...)
  assert set(adam.mu) == set(adam.nu) == set(state.trainable) == set(trainable0)
  assert peft.optimizer_guard(state.opt_state, labels) == 2 * len(state.trainable)


@pytest.mark.slow
def test_lora_step_reduces_loss_and_leaves_frozen_bitwise(base):
  c = peft_cfg("lora", lora_rank=4)
  labels, state, frozen0, trainable0, losses = train(build(base, c), c, steps=12, lr=3e-2)
  check_frozen_and_moments(labels, state, frozen0, trainable0)
  assert losses[-1] < 0.8 * losses[0], losses  # 1.10 -> 0.76 measured (dropout on)
  b_leaves = [k for k in state.trainable if k.endswith("lora_b")]
  assert len(b_leaves) == 2 * L and all(np.abs(np.asarray(state.trainable[k])).max() > 0
                                        for k in b_leaves)
  assert sum(v.size for v in state.trainable.values()) == HEAD + L * 2 * 4 * 2 * H


@pytest.mark.slow
def test_every_peft_leaf_kind_trains_and_frozen_stay_bitwise(base):
  c = peft_cfg("dora+bitfit+adapter_houlsby+ia3+prefix+prompt", lora_rank=2, adapter_size=3,
          prefix_length=2, prompt_length=2)
  labels, state, frozen0, trainable0, losses = train(build(base, c), c, steps=2)
  check_frozen_and_moments(labels, state, frozen0, trainable0)
  moved = [k for k, v in trainable0.items() if not np.array_equal(np.asarray(state.trainable[k]), v)]
  assert sorted(moved) == sorted(trainable0)  # every trainable leaf got a gradient and moved
  assert all(np.isfinite(losses))


# ---- merge: same logits as the unmerged model ---------------------------------------------------

@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_merged_and_unmerged_logits_agree(base, method):
  c = peft_cfg(method, lora_rank=3, rslora=method == "dora")
  m = random_peft(base, c)
  merged = peft.merge(m.params, peft.spec_from_config(c))
  assert not peft.peft_leaf_paths(flatten(merged))
  assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(base.params)
  (unmerged_logits, unmerged_h), (merged_logits, merged_h) = outputs(m, m.params), outputs(base, merged)
  np.testing.assert_allclose(merged_logits, unmerged_logits, atol=1e-5, rtol=0)
  np.testing.assert_allclose(merged_h, unmerged_h, atol=1e-5, rtol=0)  # O(1) values, stricter
  # The PEFT branch really changed the function, so the agreement is not vacuous.
  _, plain_h = outputs(base, base.params)
  assert np.abs(np.asarray(unmerged_h - plain_h)).max() > 1e-2


def test_merge_refuses_adapters_prefix_prompt(base):
  for method in ("adapter_houlsby", "prefix", "prompt"):
    c = peft_cfg(method, adapter_size=3, prefix_length=2, prompt_length=2)
    with pytest.raises(ValueError, match=r"cannot merge .*merged=False"):
      peft.merge(random_peft(base, c).params, peft.spec_from_config(c))


def test_hooks_start_at_the_pretrained_function(base, base_dir):
  """DoRA (m = ||W0||_c after init_dora, B = 0), (IA)^3 (l = 1) and adapters (W_up = 0) leave a
  loaded checkpoint's logits unchanged."""
  c = peft_cfg("dora+ia3+adapter_houlsby", lora_rank=2, adapter_size=3)
  spec = peft.spec_from_config(c)
  m = from_pretrained(base_dir, head="sequence_classification", num_labels=C, peft=spec)
  params = peft.init_dora(m.params, spec)
  np.testing.assert_allclose(logits(m, params), logits(base, base.params), atol=2e-6)


# ---- checkpoints and export ---------------------------------------------------------------------

def test_export_unmerged_and_reload_from_the_base(base, base_dir, tmp_path):
  c = peft_cfg("lora+bitfit", lora_rank=2)
  spec = peft.spec_from_config(c)
  m = from_pretrained(base_dir, head="sequence_classification", num_labels=C, peft=spec)
  flat = flatten(m.params)
  labels = peft.partition(c, flat, L)
  trained = unflatten({k: v + 0.01 if labels[k] == "trainable" else v for k, v in flat.items()})
  out = peft.export(m, trained, tmp_path / "small", merged=False, labels=labels, method=c.method)
  loaded = peft.load_trainable(out)
  assert loaded.spec == spec and loaded.method == "lora+bitfit"
  assert loaded.base_model == str(base_dir)
  assert set(loaded.trainable) == {k for k, v in labels.items() if v == "trainable"}
  m2 = from_pretrained(loaded.base_model, head="sequence_classification", num_labels=C,
                       peft=loaded.spec)
  restored = peft.apply_trainable(m2.params, loaded.trainable)
  for k, v in flatten(trained).items():
    np.testing.assert_array_equal(np.asarray(flatten(restored)[k]), np.asarray(v), err_msg=k)
  np.testing.assert_array_equal(logits(m, restored), logits(m, trained))
  with pytest.raises(ValueError, match="has shape"):
    peft.apply_trainable(random_peft(base, peft_cfg("lora", lora_rank=3)).params, loaded.trainable)


def test_export_merged_is_a_plain_hf_checkpoint(base, tmp_path):
  c = peft_cfg("dora+ia3", lora_rank=2)
  m = random_peft(base, c)
  with pytest.raises(ValueError, match="PEFT parameters"):
    m.save_pretrained(tmp_path / "refused")
  out = peft.export(m, m.params, tmp_path / "merged", merged=True)
  plain = from_pretrained(out, head="sequence_classification", num_labels=C)
  assert not peft.peft_leaf_paths(flatten(plain.params))
  np.testing.assert_allclose(logits(base, plain.params), logits(m, m.params), atol=1e-5, rtol=0)
