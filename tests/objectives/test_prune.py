"""Pruning: cubic schedule, exact-count masks, straight-through scores, and masked training steps."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft.objectives import prune


def test_cubic_schedule_hand_values():
  sched = prune.CubicSchedule(final=0.9, initial=0.0, begin_step=10, num_updates=4, frequency=5)
  # s_t = s_f + (s_i - s_f)(1 - (t - t0) / (n dt))^3 at t = 10, 15, 20, 25, 30.
  want = {10: 0.0, 15: 0.9 - 0.9 * 0.75 ** 3, 20: 0.9 - 0.9 * 0.5 ** 3, 25: 0.9 - 0.9 * 0.25 ** 3,
          30: 0.9}
  for t, s in want.items():
    np.testing.assert_allclose(sched(t), s, rtol=1e-6)
    assert bool(sched.is_update_step(t))
  # Between updates the sparsity holds; before t0 nothing is pruned; after the end it stays s_f.
  np.testing.assert_allclose(sched(17), want[15], rtol=1e-6)
  for t, s in ((0, 0.0), (9, 0.0), (31, 0.9), (1000, 0.9)):
    np.testing.assert_allclose(sched(t), s, rtol=1e-6)
  assert [t for t in range(40) if sched.is_update_step(t)] == [10, 15, 20, 25, 30]
  one_shot = prune.CubicSchedule(final=0.5, begin_step=3, num_updates=0, frequency=1)
  assert [float(one_shot(t)) for t in (2, 3, 9)] == [0.0, 0.5, 0.5]
  with pytest.raises(ValueError, match="sparsities"):
    prune.CubicSchedule(final=1.0)


def test_magnitude_masks_exact_counts_global_and_layer():
  a = jnp.array([[0.1, -5.0], [0.3, 0.2]])
  b = jnp.array([[-0.05, 4.0, 0.15]])
  # 7 weights -> round(3.5) = 4 pruned: |w| = 0.05, 0.1, 0.15, 0.2.
  m = prune.magnitude_masks({"a": a, "b": b}, 0.5, "global")
  np.testing.assert_array_equal(m["a"], [[False, True], [True, False]])
  np.testing.assert_array_equal(m["b"], [[False, True, False]])
  m = prune.magnitude_masks({"a": a, "b": b}, 0.25, "layer")  # a: 1 pruned, b: round(0.75) = 1
  np.testing.assert_array_equal(m["a"], [[False, True], [True, True]])
  np.testing.assert_array_equal(m["b"], [[False, True, True]])
  m = prune.magnitude_masks({"a": a, "b": b}, 0.5, "layer")  # a: 2 pruned, b: round(1.5) = 2
  np.testing.assert_array_equal(m["b"], [[False, True, False]])
  # Exact counts even with ties, for sparsities whose s * n is not exact in float32.
  w = {"w": jnp.zeros((10, 100))}
  for s in (0.3, 0.7, 0.97):
    kept = int(prune.topk_masks(w, s)["w"].sum())
    assert kept == 1000 - round(s * 1000)
  with pytest.raises(ValueError, match="scope"):
    prune.topk_masks(w, 0.5, "row")


def test_topk_equals_stable_argsort_reference():
  """The sort-free ranking drops exactly the values a stable argsort would: negatives, -0.0 vs
  +0.0, infinities and many ties (broken by lower index first)."""
  rng = np.random.default_rng(0)
  v = rng.normal(size=5000).astype(np.float32)
  v[:800] = 0.0
  v[800:900] = -0.0
  v[900:1500] = rng.choice([-1.5, 0.25, 3.0], size=600)
  v[1500], v[1501] = np.inf, -np.inf
  rng.shuffle(v)
  for s in (0.0, 0.1, 0.16, 0.5, 0.9, 0.97, 0.9999):
    k = round(s * v.size)
    order = np.argsort(v, kind="stable")
    want = np.ones(v.size, bool)
    want[order[:k]] = False
    got = np.asarray(prune.topk_masks({"w": jnp.asarray(v)}, s)["w"])
    np.testing.assert_array_equal(got, want, err_msg=f"sparsity {s}")


def test_sparsity_metrics_per_layer():
  masks = {"backbone/encoder/layer_0/attention/self/query/kernel": jnp.array([[True, False]]),
           "backbone/encoder/layer_0/output/dense/kernel": jnp.array([[True, True]]),
           "backbone/encoder/layer_1/output/dense/kernel": jnp.array([[False, False]])}
  m = prune.sparsity_metrics(masks)
  np.testing.assert_allclose(m["sparsity/total"], 3 / 6)
  np.testing.assert_allclose(m["sparsity/layer_0"], 1 / 4)
  np.testing.assert_allclose(m["sparsity/layer_1"], 1.0)


def test_straight_through_scores_get_w_times_upstream_gradient():
  w = jnp.array([[2.0, -3.0], [0.5, 1.0]])
  s = jnp.array([[0.1, 0.4], [0.3, 0.2]])
  path = "backbone/encoder/layer_0/intermediate/dense/kernel"
  params = {"backbone": {"encoder": {"layer_0": {"intermediate": {"dense": {"kernel": w}}}}},
            prune.SCORES: {"backbone": {"encoder": {"layer_0": {"intermediate": {"dense": {
                "kernel": s}}}}}}}
  masks = prune.topk_masks({path: s}, 0.5)  # keeps scores 0.4 and 0.3
  up = jnp.array([[1.0, 2.0], [3.0, 4.0]])

  def f(p):
    out = prune.pruned_params(p, masks, "movement")
    assert prune.SCORES not in out
    return jnp.sum(out["backbone"]["encoder"]["layer_0"]["intermediate"]["dense"]["kernel"] * up)

  g = jax.grad(f)(params)
  m = np.array([[0.0, 1.0], [1.0, 0.0]])
  gw = g["backbone"]["encoder"]["layer_0"]["intermediate"]["dense"]["kernel"]
  gs = g[prune.SCORES]["backbone"]["encoder"]["layer_0"]["intermediate"]["dense"]["kernel"]
  np.testing.assert_array_equal(gw, up * m)  # pruned weights get no gradient
  np.testing.assert_array_equal(gs, up * w)  # dL/dS = dL/d(W M) * W (straight-through)


# ------------------------------------------------------------------ with a tiny random BERT
import optax  # noqa: E402

from jaxft.models import init_random  # noqa: E402
from jaxft.objectives.base import Weighted  # noqa: E402
from jaxft.objectives.supervised import classification_term  # noqa: E402
from jaxft.core.state import TrainState, flatten  # noqa: E402


@pytest.fixture(scope="module")
def bert():
  cfg = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2,
         "num_attention_heads": 4, "intermediate_size": 64, "vocab_size": 50,
         "max_position_embeddings": 32, "type_vocab_size": 2}
  return init_random(cfg, head="sequence_classification", num_labels=3, seed=0,
                     hidden_dropout=0.0, attention_dropout=0.0)


def text_batch(seed=0, b=4, s=8):
  rng = np.random.default_rng(seed)
  mask = np.ones((b, s), np.int32)
  mask[1, 5:] = 0
  return {"input_ids": jnp.asarray(rng.integers(1, 50, (b, s)) * mask, jnp.int32),
          "attention_mask": jnp.asarray(mask), "token_type_ids": jnp.zeros((b, s), jnp.int32),
          "labels": jnp.asarray(rng.integers(0, 3, b), jnp.int32)}


SUP = {"sup": Weighted(classification_term())}


def test_prunable_paths_are_encoder_kernels_only(bert):
  paths = prune.prunable_paths(flatten(bert.params))
  assert len(paths) == 12  # 2 layers x (q, k, v, attention output, intermediate, output)
  assert all("/encoder/layer_" in p and p.endswith("/kernel") for p in paths)
  with pytest.raises(ValueError, match="no prunable kernel"):
    prune.prunable_paths({"head/classifier/kernel": jnp.ones((2, 2))})


def test_gradual_magnitude_holds_cubic_schedule_and_pruned_weights_stay_zero(bert):
  sched = prune.CubicSchedule(final=0.8, initial=0.1, begin_step=2, num_updates=3, frequency=2)
  tx = optax.adamw(1e-2, weight_decay=0.1)
  trainable, extras = prune.init_pruning(flatten(bert.params), {}, "magnitude")
  state = TrainState.create(trainable, {}, tx, extras=extras)
  step = jax.jit(prune.make_prune_step(bert.apply, SUP, tx, method="magnitude", schedule=sched))
  n = sum(v.size for v in extras["masks"].values())
  batch, prev = text_batch(), None
  for t in range(11):
    state, m = step(state, batch, jax.random.key(t))
    masks = state.extras["masks"]
    pruned = n - sum(int(v.sum()) for v in masks.values())
    s_t = 0.0 if t < 2 else 0.8 + (0.1 - 0.8) * (1 - min(2 * ((t - 2) // 2), 6) / 6) ** 3
    assert pruned == round(s_t * n), (t, pruned, s_t * n)
    np.testing.assert_allclose(m["sparsity/total"], pruned / n, rtol=1e-6)
    np.testing.assert_allclose(m["sparsity/target"], s_t, rtol=1e-6)
    # magnitude masks only shrink here, so what flipped is exactly what this step pruned
    newly = pruned - (0 if prev is None else n - sum(int(v.sum()) for v in prev.values()))
    np.testing.assert_allclose(m["sparsity/changed"], newly / n, rtol=1e-6, atol=1e-9)
    for k, mk in masks.items():  # exact zeros through AdamW moments and weight decay
      assert np.all(np.asarray(state.trainable[k])[~np.asarray(mk)] == 0.0), (t, k)
      if prev is not None and not sched.is_update_step(t):
        np.testing.assert_array_equal(mk, prev[k])  # masks change only at scheduled steps
    prev = jax.device_get(masks)
  assert {"sparsity/layer_0", "sparsity/layer_1"} <= set(m)
  # Once pruned, always pruned: the final masks are a subset of every earlier set of survivors.
  out = prune.export_pruned(state.trainable, state.frozen, masks)
  assert sum(int(jnp.sum(v == 0)) for k, v in flatten(out).items() if k in masks) >= pruned


def test_one_shot_per_layer_sparsity_is_exact(bert):
  trainable, extras = prune.one_shot_magnitude(flatten(bert.params), {}, 0.5, scope="layer")
  for k, mk in extras["masks"].items():
    assert int(mk.sum()) == mk.size - round(0.5 * mk.size), k
    assert int(jnp.sum(trainable[k] == 0)) == round(0.5 * mk.size)
  tx = optax.adamw(1e-2, weight_decay=0.1)
  state = TrainState.create(trainable, {}, tx, extras=extras)
  step = jax.jit(prune.make_prune_step(bert.apply, SUP, tx, method="fixed"))
  for t in range(3):
    state, m = step(state, text_batch(), jax.random.key(t))
  np.testing.assert_allclose(m["sparsity/layer_0"], 0.5)
  for k, mk in extras["masks"].items():
    assert np.all(np.asarray(state.trainable[k])[~np.asarray(mk)] == 0.0)


def test_movement_pruning_learns_scores_and_hits_target(bert):
  sched = prune.CubicSchedule(final=0.6, initial=0.0, begin_step=1, num_updates=2, frequency=2)
  tx = optax.adam(1e-2)
  trainable, extras = prune.init_pruning(flatten(bert.params), {}, "movement", schedule=sched)
  n_scores = sum(k.startswith(prune.SCORES + "/") for k in trainable)
  assert n_scores == 12
  state = TrainState.create(trainable, {}, tx, extras=extras)
  step = jax.jit(prune.make_prune_step(bert.apply, SUP, tx, method="movement", schedule=sched))
  for t in range(6):
    state, m = step(state, text_batch(), jax.random.key(t))
  n = sum(v.size for v in state.extras["masks"].values())
  kept = sum(int(v.sum()) for v in state.extras["masks"].values())
  assert n - kept == round(0.6 * n)
  scores = {k: v for k, v in state.trainable.items() if k.startswith(prune.SCORES)}
  assert all(float(jnp.abs(v).max()) > 0 for v in scores.values())
  # The masks are the top 40% of the learned scores.
  flat_scores = {k[len(prune.SCORES) + 1:]: v for k, v in scores.items()}
  again = prune.topk_masks(flat_scores, sched(int(state.step)))
  for k in again:
    np.testing.assert_array_equal(again[k], state.extras["masks"][k])
  out = flatten(prune.export_pruned(state.trainable, state.frozen, state.extras["masks"]))
  assert prune.SCORES not in {k.split("/")[0] for k in out}
  assert sum(int(jnp.sum(out[k] == 0)) for k in again) == n - kept


def test_soft_movement_l1_drives_sparsity_up(bert):
  tx = optax.adam(5e-2)
  trainable, extras = prune.init_pruning(flatten(bert.params), {}, "soft_movement",
                                         soft_threshold=0.45)
  state = TrainState.create(trainable, {}, tx, extras=extras)
  assert float(prune.sparsity_metrics(extras["masks"])["sparsity/total"]) == 0.0
  step = jax.jit(prune.make_prune_step(bert.apply, SUP, tx, method="soft_movement",
                                       soft_threshold=0.45, l1_weight=10.0))
  sparsities = []
  for t in range(5):
    state, m = step(state, text_batch(), jax.random.key(t))
    sparsities.append(float(m["sparsity/total"]))
  assert "loss/prune_l1" in m and float(m["loss/prune_l1"]) < 0.5
  assert sparsities[-1] > 0.5 and sparsities == sorted(sparsities), sparsities


def test_head_pruned_export_matches_masked_model(bert):
  batches = [text_batch(i) for i in range(3)]
  imp = prune.head_importance(bert.apply, bert.params, batches, classification_term(), 4)
  assert imp.shape == (2, 4) and bool(jnp.all(imp >= 0))
  np.testing.assert_allclose(jnp.linalg.norm(imp, axis=1), [1.0, 1.0], rtol=1e-5)
  keep = prune.heads_to_prune(imp, per_layer=2)
  assert keep.sum(1).tolist() == [2, 2]
  # The two least important heads of each layer are the ones dropped.
  for layer in range(2):
    dropped = set(np.argsort(np.asarray(imp[layer]))[:2].tolist())
    assert dropped == set(np.nonzero(~np.asarray(keep[layer]))[0].tolist())
  flat = flatten(bert.params)
  _, extras = prune.init_pruning(flat, {}, "fixed", masks=prune.head_weight_masks(flat, keep))
  masked = prune.pruned_params(bert.params, extras["masks"], "fixed")
  params, arch = prune.export_head_pruned(bert.params, bert.module.cfg, keep)
  assert arch.num_heads == 2 and arch.head_dim == 8
  small = flatten(params)
  assert small["backbone/encoder/layer_0/attention/self/query/kernel"].shape == (32, 16)
  assert small["backbone/encoder/layer_1/attention/output/dense/kernel"].shape == (16, 32)
  pruned_model = dataclasses.replace(bert, module=bert.module.clone(cfg=arch), params=params)
  batch = text_batch(7)
  want = jax.jit(bert.apply)(masked, batch).logits
  got = jax.jit(pruned_model.apply)(params, batch).logits
  np.testing.assert_allclose(got, want, atol=1e-5)
  # Scaling the output rows by the head mask is the same masked model.
  np.testing.assert_allclose(
      jax.jit(bert.apply)(prune.head_masked_params(bert.params, keep, 4), batch).logits, want,
      atol=1e-6)
  with pytest.raises(ValueError, match="per_layer"):
    prune.export_head_pruned(bert.params, bert.module.cfg,
                             prune.heads_to_prune(imp + jnp.array([[0.0], [9.0]]), fraction=0.5)
                             .at[1].set(True))


def test_head_pruned_export_of_a_fused_qkv_model_matches_the_masked_model():
  """ModernBERT's attn/Wqkv holds [q | k | v]: a pruned head loses its columns in all three."""
  cfg = {"model_type": "modernbert", "hidden_size": 32, "num_hidden_layers": 2,
         "num_attention_heads": 4, "intermediate_size": 48, "vocab_size": 50,
         "max_position_embeddings": 32, "local_attention": 4, "global_attn_every_n_layers": 2,
         "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "cls_token_id": 1,
         "sep_token_id": 2, "attention_bias": True}
  model = init_random(cfg, head="sequence_classification", num_labels=3, seed=0,
                      hidden_dropout=0.0, attention_dropout=0.0)
  flat = flatten(model.params)
  assert [m[0].rsplit("/", 2)[-2:] for m in prune.attention_modules(flat)] == [["attn", "Wqkv"]] * 2
  keep = jnp.array([[True, False, True, False], [False, True, True, False]])
  masks = prune.head_weight_masks(flat, keep)
  wqkv = next(k for k in masks if k.endswith("layer_0/attn/Wqkv/kernel"))
  np.testing.assert_array_equal(masks[wqkv][0], np.tile(np.repeat(keep[0], 8), 3))
  _, extras = prune.init_pruning(flat, {}, "fixed", masks=masks)
  masked = prune.pruned_params(model.params, extras["masks"], "fixed")
  params, arch = prune.export_head_pruned(model.params, model.module.cfg, keep)
  assert arch.num_heads == 2 and arch.head_dim == 8
  small = flatten(params)
  assert small[wqkv].shape == (32, 48) and small[wqkv.replace("kernel", "bias")].shape == (48,)
  assert small[wqkv.replace("Wqkv", "Wo")].shape == (16, 32)
  pruned_model = dataclasses.replace(model, module=model.module.clone(cfg=arch), params=params)
  batch = {k: v for k, v in text_batch(7).items() if k != "token_type_ids"}
  want = jax.jit(model.apply)(masked, batch).logits
  np.testing.assert_allclose(jax.jit(pruned_model.apply)(params, batch).logits, want, atol=1e-5)
  np.testing.assert_allclose(
      jax.jit(model.apply)(prune.head_masked_params(model.params, keep, 4), batch).logits, want,
      atol=1e-6)


def nan_when_poisoned(apply_fn, params, batch, rng, ctx):
  """A loss term that is 0 until batch["poison"] is set, then NaN (through the params)."""
  w = jax.tree_util.tree_leaves(params)[0].reshape(-1)[0]
  return jnp.where(batch["poison"][0] > 0, jnp.nan, 0.0) * w, {}


@pytest.mark.parametrize("method", ["magnitude", "movement", "soft_movement"])
def test_skipped_step_leaves_weights_masks_and_scores_bitwise_unchanged(bert, method):
  # Step 2 is a scheduled mask update: a NaN there must drop the new masks with the update.
  sched = prune.CubicSchedule(final=0.6, initial=0.3, begin_step=2, num_updates=2, frequency=2)
  tx = optax.adamw(1e-2, weight_decay=0.1)
  trainable, extras = prune.init_pruning(flatten(bert.params), {}, method, schedule=sched)
  state = TrainState.create(trainable, {}, tx, extras=extras)
  terms = {**SUP, "poison": Weighted(nan_when_poisoned)}
  step = jax.jit(prune.make_prune_step(bert.apply, terms, tx, method=method, schedule=sched,
                                       soft_threshold=0.5))
  good = dict(text_batch(), poison=jnp.zeros(4))
  for t in range(2):
    state, _ = step(state, good, jax.random.key(t))
  assert sched.is_update_step(int(state.step))
  before = jax.device_get((state.trainable, state.opt_state, state.extras["masks"]))
  state, m = step(state, dict(good, poison=jnp.ones(4)), jax.random.key(2))
  assert float(m["nonfinite"]) == 1.0 and int(state.extras["skipped_steps"]) == 1
  after = jax.device_get((state.trainable, state.opt_state, state.extras["masks"]))
  for x, y in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(after)):
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
  # The next good step prunes on schedule from where it was.
  state, m = step(state, good, jax.random.key(3))
  assert float(m["nonfinite"]) == 0.0
  if method != "soft_movement":
    np.testing.assert_allclose(m["sparsity/target"], sched(3), rtol=1e-6)
