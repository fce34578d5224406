"""LoRA options: target presets resolved per family, PiSSA initialisation (starts at the pretrained
function, merges and exports back), on the tiny random models of tests/models/hf_tiny.py and a
tiny BERT saved as a Hugging Face directory (float32 throughout)."""

import dataclasses
import pathlib
import re
import sys

import jax
import numpy as np
import pytest

from peft_toy import peft_cfg
from jaxft import peft
from jaxft.config import base_config
from jaxft.core.state import flatten, unflatten
from jaxft.models import from_pretrained, init_random
from jaxft.models.pretrained import _init_params

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "models"))
import hf_tiny as tiny  # noqa: E402

# Per family, the Dense modules (relative to layer_0) each preset must give LoRA, exactly.
Q_V = {"bert": ("attention/self/query", "attention/self/value"),
       "roberta": ("attention/self/query", "attention/self/value"),
       "electra": ("attention/self/query", "attention/self/value"),
       "vit": ("attention/attention/query", "attention/attention/value"),
       "distilbert": ("attention/q_lin", "attention/v_lin"),
       "mpnet": ("attention/attn/q", "attention/attn/v")}
K_O = {"bert": ("attention/self/key", "attention/output/dense"),
       "roberta": ("attention/self/key", "attention/output/dense"),
       "electra": ("attention/self/key", "attention/output/dense"),
       "vit": ("attention/attention/key", "attention/output/dense"),
       "distilbert": ("attention/k_lin", "attention/out_lin"),
       "mpnet": ("attention/attn/k", "attention/attn/o")}
FFN = {f: ("intermediate/dense", "output/dense") for f in ("bert", "roberta", "electra", "vit",
                                                            "mpnet")}
FFN["distilbert"] = ("ffn/lin1", "ffn/lin2")
EXPECTED = {"qv": Q_V, "attention": {f: Q_V[f] + K_O[f] for f in Q_V},
            "all-linear": {f: Q_V[f] + K_O[f] + FFN[f] for f in Q_V}}




@pytest.fixture(scope="module")
def family_models():
  return {f: init_random(tiny.hf_config(f), head="sequence_classification", num_labels=2)
          for f in tiny.FAMILIES}


@pytest.mark.parametrize("preset", list(EXPECTED))
def test_lora_target_presets_resolve_to_the_right_leaves_per_family(family_models, preset):
  c = peft_cfg("lora", lora_rank=2, lora_targets=preset)
  spec = peft.spec_from_config(c)
  assert spec.lora_targets == peft.LORA_TARGETS[preset]
  for family, base in family_models.items():
    module = base.module.clone(cfg=dataclasses.replace(base.module.cfg, peft=spec))
    flat = flatten(_init_params(module, base.family, 0, shapes_only=True))
    got = {re.sub(r"/lora_a$", "", k) for k in flat if k.endswith("/lora_a")}
    layer0 = {re.sub(r"^.*?/layer_0/", "", p) for p in got if "/layer_0/" in p}
    assert layer0 == set(EXPECTED[preset][family]), family
    n_layers = base.config.to_dict().get("num_hidden_layers") or base.config.n_layers
    assert len(got) == n_layers * len(EXPECTED[preset][family]), family  # every layer, nothing else
    labels = peft.partition(c, flat, n_layers)
    trainable = {k for k, v in labels.items() if v == "trainable"}
    assert trainable == {f"{p}/lora_{x}" for p in got for x in "ab"} | {
        k for k in flat if k.startswith("head/")}, family


def test_regex_targets_still_accepted_and_preset_names_are_case_insensitive():
  assert peft.spec_from_config(peft_cfg("lora", lora_targets="intermediate")).lora_targets == \
      "intermediate"
  assert peft.lora_targets("All-Linear") == peft.LORA_TARGETS["all-linear"]
  assert base_config().peft.lora_targets == "qv"


# ---- PiSSA ---------------------------------------------------------------------------------------

C = 3


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
  m = init_random(tiny.hf_config("bert"), head="sequence_classification", num_labels=C, seed=7)
  return m.save_pretrained(tmp_path_factory.mktemp("pissa") / "base")


def batch(seed=0, b=6, s=10):
  rs = np.random.RandomState(seed)
  ids = rs.randint(3, 61, (b, s)).astype(np.int32)
  mask = (np.arange(s)[None] < rs.randint(4, s + 1, (b, 1))).astype(np.int32)
  return {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def logits(model, params=None):
  params = model.params if params is None else params
  return np.asarray(jax.jit(lambda p, b: model.apply(p, b).logits)(params, batch()))


def hidden(model, params=None):
  """Last hidden state [B, S, H]: O(1) values (the random head's logits are O(1e-2))."""
  params = model.params if params is None else params
  return np.asarray(jax.jit(lambda p, b: model.apply(p, b).last_hidden_state)(params, batch()))


def load(base_dir, c):
  return from_pretrained(base_dir, head="sequence_classification", num_labels=C,
                         peft=peft.spec_from_config(c) if c is not None else None)


PISSA = dict(lora_rank=3, lora_init="pissa", lora_targets="all-linear")


@pytest.mark.parametrize("method,extra", [("lora", {}), ("lora", {"rslora": True}),
                                          ("dora", {})])
def test_pissa_starts_at_the_pretrained_function(base_dir, method, extra):
  c = peft_cfg(method, **PISSA, **extra)
  plain, adapted = load(base_dir, None), load(base_dir, c)
  np.testing.assert_allclose(logits(adapted), logits(plain), atol=1e-5, rtol=0)
  spec, flat, flat0 = peft.spec_from_config(c), flatten(adapted.params), flatten(plain.params)
  a_paths = [k for k in flat if k.endswith("/lora_a")]
  assert len(a_paths) == 2 * 6
  for a_path in a_paths:
    node = a_path[: -len("/lora_a")]
    w0 = np.asarray(flat0[f"{node}/kernel"], np.float64)
    a, b = np.asarray(flat[a_path]), np.asarray(flat[f"{node}/lora_b"])
    delta = spec.lora_scale * (a.astype(np.float64) @ b)
    u, s, vt = np.linalg.svd(w0, full_matrices=False)
    top = (u[:, :3] * s[:3]) @ vt[:3]
    np.testing.assert_allclose(delta, top, atol=1e-5)  # s A B = the best rank-r part of W
    np.testing.assert_allclose(np.asarray(flat[f"{node}/kernel"]), w0 - top, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(a, axis=0), np.sqrt(s[:3] / spec.lora_scale),
                               rtol=1e-4)  # A = U_r sqrt(S_r / s), B = sqrt(S_r / s) V_r^T
  # deterministic: loading again gives bitwise the same residuals (what unmerged reloads rely on)
  again = flatten(load(base_dir, c).params)
  for k, v in flat.items():
    np.testing.assert_array_equal(np.asarray(again[k]), np.asarray(v), err_msg=k)


def trained(model, seed=3):
  """The model with its LoRA / DoRA leaves moved as training would (so merge is not vacuous)."""
  flat = flatten(model.params)
  for i, k in enumerate(sorted(flat)):
    if re.search(r"/(lora_a|lora_b|dora_m)$", k):
      noise = jax.random.normal(jax.random.fold_in(jax.random.key(seed), i), flat[k].shape)
      flat[k] = flat[k] * (1.0 + 0.2 * noise) + 0.05 * noise
  return model.with_params(unflatten(flat))


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_pissa_merges_and_exports_back(base_dir, tmp_path, method):
  c = peft_cfg(method, **PISSA)
  model = trained(load(base_dir, c))
  plain = load(base_dir, None)
  adapted_logits = logits(model)
  assert np.abs(hidden(model) - hidden(plain)).max() > 0.1  # training changed the function
  merged = peft.merge(model.params, peft.spec_from_config(c))
  assert not peft.peft_leaf_paths(flatten(merged))
  np.testing.assert_allclose(logits(plain, merged), adapted_logits, atol=1e-5, rtol=0)
  np.testing.assert_allclose(hidden(plain, merged), hidden(model), atol=1e-4, rtol=0)
  # merged export: an ordinary HF directory with the same function
  out = peft.export(model, model.params, tmp_path / "merged", merged=True)
  np.testing.assert_allclose(logits(load(out, None)), adapted_logits, atol=1e-5, rtol=0)
  # unmerged export: A, B (and the head) only; rebuilt from the base with the saved spec
  small = peft.export(model, model.params, tmp_path / "small", merged=False,
                      base_model=str(base_dir))
  saved = peft.load_trainable(small)
  assert saved.spec.lora_init == "pissa"
  rebuilt = from_pretrained(saved.base_model, head="sequence_classification", num_labels=C,
                            peft=saved.spec)
  params = peft.apply_trainable(rebuilt.params, saved.trainable)
  np.testing.assert_allclose(logits(rebuilt, params), adapted_logits, atol=1e-5, rtol=0)


def test_pissa_rank_larger_than_the_kernel_fails_clearly(base_dir):
  with pytest.raises(ValueError, match="PiSSA rank 40 exceeds"):
    load(base_dir, peft_cfg("lora", lora_rank=40, lora_init="pissa"))
  with pytest.raises(ValueError, match="peft.lora_init='svd'"):
    peft.spec_from_config(peft_cfg("lora", lora_init="svd"))
