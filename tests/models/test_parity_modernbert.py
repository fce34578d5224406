"""ModernBERT: parity with transformers (PyTorch), export round trip, training and the CLI.

Tiny config: 3 layers (layer 0 global, layers 1-2 sliding-window: global_attn_every_n_layers=3),
window local_attention=4 (a token sees +-2) over 16 tokens, hidden 36 = 3 heads of 12, GeGLU
intermediate 50, global / local RoPE bases 1000 / 50, classifier activation silu (the layers use
gelu). Every parameter, norms included, is randomised; batches are right-padded to different
lengths, one row so short that its padding queries see no real key in the local layers.
"""

import functools
import json
import shutil
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import torch
import transformers as T

from jaxft import cli, peft
from jaxft.config import base_config
from jaxft.core.state import TrainState, flatten, unflatten
from jaxft.models import from_pretrained
from jaxft.models import modernbert as MB
from jaxft.models import registry as model_registry
from jaxft.models.pretrained import Model, _build, _init_params
from jaxft.objectives import registry
from jaxft.objectives.base import make_step
from hf_parity import max_diff
from hf_tiny import FAMILY_OBJECTIVES

TOL = 1e-5
VOCAB, SEQ, HALF = 61, 16, 2
CLASSES = {None: T.ModernBertModel,
           "sequence_classification": T.ModernBertForSequenceClassification,
           "regression": T.ModernBertForSequenceClassification,
           "token_classification": T.ModernBertForTokenClassification,
           "mlm": T.ModernBertForMaskedLM}
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def hf_config(biases=False, **kw):
  """biases: the value of every *_bias flag (norms, attention, MLP, prediction head, decoder)."""
  flags = {k: biases for k in ("norm_bias", "attention_bias", "mlp_bias", "classifier_bias",
                               "decoder_bias")}
  return T.ModernBertConfig(**{**dict(
      vocab_size=VOCAB, hidden_size=36, num_hidden_layers=3, num_attention_heads=3,
      intermediate_size=50, max_position_embeddings=64, local_attention=2 * HALF,
      global_attn_every_n_layers=3, global_rope_theta=1000.0, local_rope_theta=50.0,
      classifier_activation="silu", pad_token_id=0, bos_token_id=1, eos_token_id=2,
      cls_token_id=1, sep_token_id=2), **flags, **kw})


def torch_model(head=None, biases=False, pooling="cls", seed=0):
  torch.manual_seed(seed)
  cfg = hf_config(biases, classifier_pooling=pooling)
  cfg.num_labels = 1 if head == "regression" else 3
  if head == "regression":
    cfg.problem_type = "regression"
  cfg._attn_implementation = "eager"  # output_attentions
  model = CLASSES[head](cfg)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model.eval()


LENGTHS = (SEQ, 11, 3)


def batch(seed=0):
  rs = np.random.RandomState(seed)
  mask = (np.arange(SEQ)[None] < np.array(LENGTHS)[:, None]).astype(np.int32)
  ids = np.where(mask == 1, rs.randint(3, VOCAB, mask.shape), 0).astype(np.int32)
  return {"input_ids": ids, "attention_mask": mask}


def torch_forward(model, b, **kw):
  with torch.no_grad():
    return model(**{k: torch.tensor(v, dtype=torch.long) for k, v in b.items()}, **kw)


def test_config_reading():
  arch = MB.arch_from_hf(hf_config(True))
  assert arch["layer_types"] == (MB.GLOBAL, MB.LOCAL, MB.LOCAL)
  assert (arch["global_rope_theta"], arch["local_rope_theta"], arch["local_attention"]) == (
      1000.0, 50.0, 4)
  assert arch["norm_bias"] and arch["decoder_bias"] and arch["classifier_act"] == "silu"
  with pytest.raises(ValueError, match="rope_type"):
    MB.arch_from_hf(hf_config(rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e3},
        "sliding_attention": {"rope_type": "default", "rope_theta": 50.0}}))


# Both bias settings are covered; the MLM decoder bias (decoder_bias=True) in the export test.
CASES = [(None, "cls", False), ("sequence_classification", "cls", False),
         ("sequence_classification", "mean", True), ("regression", "mean", False),
         ("token_classification", "cls", True), ("mlm", "cls", False)]


@pytest.mark.parametrize("head,pooling,biases", CASES)
def test_parity(head, pooling, biases, tmp_path):
  """Every hidden state, attention map and the logits within 1e-5 (float32), on the explicit
  (attention maps) and the fused path; the local layers' maps are zero outside the window."""
  ref = torch_model(head, biases, pooling)
  ref.save_pretrained(tmp_path)
  m = from_pretrained(tmp_path, head=head)
  info = m.loading_info
  assert (info.missing, info.unexpected, info.mismatched) == ([], [], [])
  assert m.pooling == (pooling if head in ("sequence_classification", "regression") else None)
  b = batch()
  want = torch_forward(ref, b, output_hidden_states=True, output_attentions=True)
  got, fused = jax.jit(lambda p: (m.apply(p, b, output_hidden_states=True, output_attentions=True),
                                  m.apply(p, b)), compiler_options=FAST_COMPILE)(m.params)
  assert len(got.hidden_states) == len(want.hidden_states) == 4
  for g, w in zip(got.hidden_states, want.hidden_states):
    assert max_diff(g, w.numpy()) <= TOL
  assert max_diff(got.last_hidden_state, want.hidden_states[-1].numpy()) <= TOL
  assert max_diff(fused.last_hidden_state, want.hidden_states[-1].numpy()) <= TOL
  for g, w in zip(got.attentions, want.attentions):
    assert g.shape == tuple(w.shape) == (3, 3, SEQ, SEQ)
    assert max_diff(g, w.numpy()) <= TOL
  far = np.abs(np.arange(SEQ)[:, None] - np.arange(SEQ)[None, :]) > HALF
  for i, probs in enumerate(got.attentions):
    real = np.asarray(probs)[0]  # row 0 has no padding
    assert (real[:, far].max() == 0.0) == (i > 0)
  if head is None:
    assert got.logits is None
    return
  assert got.logits.shape == tuple(want.logits.shape)
  assert max_diff(got.logits, want.logits.numpy()) <= TOL
  assert max_diff(fused.logits, want.logits.numpy()) <= TOL


def _reference_attention(q, k, v, mask, half, prefix=0):
  """numpy softmax attention with the key mask and |i - j| <= half; prefix keys always visible."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  logits = np.einsum("btnd,bsnd->bnts", q, k) / np.sqrt(q.shape[-1])
  j = np.arange(k.shape[1]) - prefix
  ok = (np.abs(np.arange(q.shape[1])[:, None] - j[None, :]) <= half) | (j[None, :] < 0)
  ok = ok[None, None] & np.asarray(mask)[:, None, None, :]
  logits = np.where(ok, logits, -1e30)  # padding queries may see no key: uniform, not compared
  p = np.exp(logits - logits.max(-1, keepdims=True))
  return np.einsum("bnts,bsnd->btnd", p / p.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("prefix", [0, 3])
def test_window_paths_agree(prefix):
  """The explicit, XLA local_window_size, bias and cuDNN (its mask translation, run on XLA) paths
  compute the same windowed attention as a numpy reference, with and without prefix keys."""
  rs = np.random.RandomState(0)
  q = jnp.asarray(rs.randn(2, 9, 2, 4), jnp.float32)
  k, v = (jnp.asarray(rs.randn(2, 9 + prefix, 2, 4), jnp.float32) for _ in range(2))
  lengths = np.array([9, 5])
  mask = jnp.asarray(np.arange(9 + prefix)[None] < prefix + lengths[:, None])
  want = _reference_attention(q, k, v, mask, HALF, prefix)
  no_dropout = lambda x, deterministic: x
  outs = jax.jit(lambda q, k, v, mask: {
      "explicit": MB.attend(q, k, v, mask, HALF, "xla", no_dropout, True, True)[0],
      "xla": MB.attend(q, k, v, mask, HALF, "xla", None, True, False)[0],
      "cudnn": MB.attend(q, k, v, mask, HALF, "cudnn", None, True, False, backend="xla")[0]},
      compiler_options=FAST_COMPILE)(q, k, v, mask)
  for name, out in outs.items():
    for row, n in enumerate(lengths):  # real queries only
      np.testing.assert_allclose(np.asarray(out)[row, :n], want[row, :n], atol=1e-6, err_msg=name)


def test_export_round_trip(tmp_path):
  """Fine-tuned weights (here: perturbed) exported by save_pretrained load in transformers with
  nothing missing or unused and give the same logits; the pooling chosen in jaxft (mean over a
  cls checkpoint) is written to classifier_pooling. MLM: the tied decoder and its bias."""
  b = batch(1)
  for head, cls, pooling in (("sequence_classification", T.AutoModelForSequenceClassification,
                              "mean"), ("mlm", T.AutoModelForMaskedLM, None)):
    torch_model(head, biases=head == "mlm").save_pretrained(tmp_path / head)
    m = from_pretrained(tmp_path / head, head=head, pooling=pooling)
    rs = np.random.RandomState(0)
    tuned = m.with_params(jax.tree_util.tree_map(
        lambda x: x + jnp.asarray(0.01 * rs.randn(*x.shape), jnp.float32), m.params))
    out = tuned.save_pretrained(tmp_path / f"{head}_export")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "modernbert" and cfg["classifier_pooling"] == (pooling or "cls")
    ref, info = cls.from_pretrained(str(out), output_loading_info=True,
                                    attn_implementation="eager")
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    want = torch_forward(ref.eval(), b).logits.numpy()
    got = jax.jit(lambda p: tuned.apply(p, b).logits, compiler_options=FAST_COMPILE)(tuned.params)
    assert max_diff(got, want) <= TOL
    again = from_pretrained(out, head=head)
    assert again.pooling == pooling
    jax.tree_util.tree_map(np.testing.assert_array_equal, again.params,
                           jax.device_get(tuned.params))


def test_bf16_remat_perturbation_dropout(tmp_path):
  """bf16 compute (with remat) keeps float32 master weights and stays near the float32 logits; a
  zero embedding perturbation changes nothing and the logits have a gradient with respect to it;
  hidden_dropout sets both of ModernBERT's residual-stream dropouts."""
  torch_model("sequence_classification").save_pretrained(tmp_path)
  b = batch()
  plain = from_pretrained(tmp_path, head="sequence_classification")
  half = from_pretrained(tmp_path, head="sequence_classification", dtype="bfloat16", remat=True)
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(half.params))
  zero = jnp.zeros((3, SEQ, 36), jnp.float32)
  perturbed = lambda d: plain.apply(plain.params, b, embedding_perturbation=d).logits

  @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
  def run():
    out = half.apply(half.params, b)
    grad = jax.grad(lambda d: perturbed(d).sum())(zero)
    return (plain.apply(plain.params, b).logits, perturbed(zero), out.logits,
            out.last_hidden_state.dtype == jnp.bfloat16, grad)

  want, at_zero, low, is_bf16, grad = run()
  assert bool(is_bf16) and low.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(low), np.asarray(want), atol=5e-2, rtol=0)
  np.testing.assert_allclose(np.asarray(at_zero), np.asarray(want), atol=1e-6, rtol=0)
  assert float(jnp.abs(grad).max()) > 0
  drop = from_pretrained(tmp_path, head="sequence_classification", hidden_dropout=0.2)
  assert (drop.config.embedding_dropout, drop.config.mlp_dropout) == (0.2, 0.2)
  assert (drop.module.cfg.hidden_dropout, drop.module.cfg.mlp_dropout) == (0.2, 0.2)


# One sliding-window layer: the training tests need the model's apply contract (dropout, the
# perturbation, PEFT hooks), and every layer is one more forward to compile per objective.
TRAIN_HF = dict(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=24, max_position_embeddings=32, local_attention=4,
                layer_types=[MB.LOCAL], pad_token_id=0, bos_token_id=1, eos_token_id=2,
                cls_token_id=1, sep_token_id=2, attention_bias=True, mlp_bias=True,
                norm_bias=True)  # biases: BitFit needs some (ModernBERT checkpoints have none)


def _tiny_model(peft_config=None):
  """A tiny ModernBERT classifier (2 labels, dropout 0.1) with random weights, built from the
  parameter shapes without compiling an init."""
  family = model_registry.get("modernbert")
  spec = None if peft_config is None else peft.spec_from_config(peft_config)
  module, hf, pooling = _build(
      T.AutoConfig.for_model("modernbert", **TRAIN_HF), family, "sequence_classification", 2,
      dtype="float32", pooling=None, peft=spec, remat=False, remat_policy=None,
      attention_impl=None, hidden_dropout=0.1, attention_dropout=0.1, classifier_dropout=None,
      id2label=None)
  rs = np.random.RandomState(0)
  flat = {}
  for k, s in flatten(_init_params(module, family, 0, shapes_only=True)).items():
    r = 0.1 * rs.randn(*s.shape).astype(np.float32)
    flat[k] = jnp.asarray(1.0 + r if k.endswith(("scale", "ia3", "dora_m")) else r)
  return Model(module, unflatten(flat), hf, None, family, "sequence_classification", pooling)


def _train_batch():
  rs = np.random.RandomState(0)
  mask = (np.arange(10)[None] < np.array([10, 8, 6, 4])[:, None]).astype(np.int32)
  part = lambda: {"input_ids": jnp.asarray(rs.randint(3, 40, mask.shape) * mask, jnp.int32),
                  "attention_mask": jnp.asarray(mask), "example_mask": jnp.ones(4, jnp.float32)}
  b = {**part(), "labels": jnp.arange(4, dtype=jnp.int32) % 2}
  b.update({f"unlabeled/{k}": v for k, v in part().items()})
  b.update({f"unlabeled/strong/{k}": v for k, v in part().items() if k != "example_mask"})
  return b


def _peft_cfg(method, **kw):
  c = base_config().peft
  c.method, c.lora_rank, c.adapter_size, c.prefix_length, c.prompt_length = method, 2, 3, 2, 2
  for k, v in kw.items():
    c[k] = v
  return c


def _objective(name, opts):
  return registry.build(ml_collections.ConfigDict({"name": name, name: opts}),
                        types.SimpleNamespace(kind="classification", num_labels=2))


# Every PEFT method, five models: full, linear_probe, freeze_bottom and two combinations.
PEFT_METHODS = ("full", "linear_probe", "freeze_bottom", "lora+bitfit+adapter_pfeiffer",
                "dora+ia3+adapter_houlsby+prefix+prompt")


def _one_step(model, terms, trainable, frozen, extras=None, update_extras=None):
  """One jitted make_step (adam) on the test batch -> (state before, state after, metrics)."""
  tx = optax.adam(1e-2)
  state = TrainState.create(trainable, frozen, tx, extras=extras)
  step = jax.jit(make_step(model.apply, terms, tx, update_extras=update_extras),
                 compiler_options=FAST_COMPILE)
  return state, *step(state, _train_batch(), jax.random.key(0))


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILY_OBJECTIVES)
def test_each_way_of_reading_the_model_takes_a_step(name):
  """One real step (make_step, dropout on), full fine-tuning, of an objective per way objectives
  read the model (hf_tiny.FAMILY_OBJECTIVES): a finite loss and a moved head."""
  assert name in registry.names()
  model = _tiny_model()
  obj = _objective(name, registry.defaults()[name])
  flat = flatten(model.params)
  extras = obj.init_extras(flat, {}) if obj.init_extras else None
  before, after, metrics = _one_step(model, obj.terms, flat, {}, extras, obj.update_extras)
  assert np.isfinite(float(metrics["loss"])), metrics
  head = "head/classifier/kernel"
  assert not np.array_equal(np.asarray(after.trainable[head]), np.asarray(before.trainable[head]))


@pytest.mark.slow
@pytest.mark.parametrize("method", PEFT_METHODS)
def test_every_peft_method_takes_a_step(method):
  """One supervised step per PEFT method (all eleven over five models): finite loss, the head
  moved, frozen leaves bitwise unchanged; freeze_bottom trains the final norm with the top
  layer."""
  assert set(peft.METHODS) == {n for m in PEFT_METHODS for n in m.split("+")}
  c = _peft_cfg(method, freeze_layers=0)
  model = _tiny_model(c)
  flat = flatten(model.params)
  trainable, frozen = peft.split(flat, peft.partition(c, flat, 1))
  assert ("backbone/final_norm/scale" in trainable) == (method in ("full", "freeze_bottom"))
  frozen0 = jax.device_get(frozen)
  sup = _objective("supervised", {"label_smoothing": 0.0})
  before, after, metrics = _one_step(model, sup.terms, trainable, frozen)
  assert np.isfinite(float(metrics["loss"])), metrics
  head = "head/classifier/kernel"
  assert not np.array_equal(np.asarray(after.trainable[head]), np.asarray(before.trainable[head]))
  assert set(after.frozen) == set(frozen0)
  for k, v in frozen0.items():
    np.testing.assert_array_equal(np.asarray(after.frozen[k]), v, err_msg=k)


def test_lora_presets_name_modernbert_projections():
  """qv: the fused Wqkv; attention: Wqkv and Wo; all-linear: those and the GeGLU Wi, Wo."""
  want = {"qv": {"attn/Wqkv"}, "attention": {"attn/Wqkv", "attn/Wo"},
          "all-linear": {"attn/Wqkv", "attn/Wo", "mlp/Wi", "mlp/Wo"}}
  for preset, modules in want.items():
    flat = flatten(_tiny_model(_peft_cfg("lora", lora_targets=preset)).params)
    got = {k.split("/layer_0/")[1].rsplit("/", 1)[0] for k in flat if k.endswith("lora_a")}
    assert got == modules, preset
  ia3 = flatten(_tiny_model(_peft_cfg("ia3")).params)  # the default ia3_targets
  assert {k.split("/layer_0/")[1] for k in ia3 if k.endswith("/ia3")} == {"attn/Wqkv/ia3",
                                                                          "mlp/Wo/ia3"}


@pytest.fixture(scope="module")
def tiny_modernbert_dir(tmp_path_factory, minilm_dir):
  """A random 3-layer ModernBERT (hidden 32, window 8) with MiniLM's tokenizer."""
  out = tmp_path_factory.mktemp("tiny_modernbert")
  for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    shutil.copy(minilm_dir / name, out / name)
  tok = T.AutoTokenizer.from_pretrained(out)
  torch.manual_seed(0)
  cfg = T.ModernBertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=3,
                           num_attention_heads=2, intermediate_size=48, local_attention=8,
                           pad_token_id=tok.pad_token_id, cls_token_id=tok.cls_token_id,
                           sep_token_id=tok.sep_token_id, bos_token_id=tok.cls_token_id,
                           eos_token_id=tok.sep_token_id)
  T.ModernBertModel(cfg).save_pretrained(out)
  return out


def test_cli_quickstart_trains_and_exports(tmp_path, tiny_modernbert_dir, capsys):
  """`jaxft train --config experiments/quickstart.py` on the tiny ModernBERT for 3 steps, then
  `jaxft export`: transformers loads the export and reproduces jaxft's logits."""
  work = tmp_path / "run"
  overrides = {"model.name": tiny_modernbert_dir, "data.max_train_examples": 32,
               "data.max_eval_examples": 16, "data.max_length": 32,
               "data.bucket_boundaries": "32", "train.batch_size": 8,
               "train.eval_batch_size": 8, "train.num_steps": 3, "train.eval_every": 3,
               "train.checkpoint_every": 3, "train.progress": False, "train.log_every": 1}
  code = cli.main(["train", "--config", "experiments/quickstart.py", "--workdir", str(work),
                   *[f"--config.{k}={v}" for k, v in overrides.items()]])
  assert code == 0, capsys.readouterr().err[-3000:]
  results = json.loads((work / "results.json").read_text())
  assert results["steps"] == 3 and np.isfinite(results["last_train"]["loss"])
  assert 0.0 <= results["eval"]["accuracy"] <= 1.0
  assert cli.main(["export", "--workdir", str(work), "--out", str(tmp_path / "hf")]) == 0
  m = from_pretrained(tmp_path / "hf", head="sequence_classification")
  ref = T.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "hf")).eval()
  assert isinstance(ref, T.ModernBertForSequenceClassification)
  b = dict(m.tokenizer(["a fine film", "dull and far too long for what it says"],
                       padding=True, return_tensors="np"))
  b = {k: b[k] for k in ("input_ids", "attention_mask")}
  assert max_diff(m.logits(**b), torch_forward(ref, b).logits.numpy()) <= TOL
