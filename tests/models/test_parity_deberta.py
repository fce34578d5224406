"""DeBERTa-v2/v3 against transformers (PyTorch): every head on right-padded float32 batches longer
than the position buckets, HF export round trips, every objective and PEFT method training on a
tiny DeBERTa, and `jaxft train` + `jaxft export` end to end. XLM-RoBERTa and CamemBERT load
through the RoBERTa family.

Configs (tiny, odd sizes, every parameter randomised as hf_tiny.torch_model does):
V3: relative attention with 4 log buckets up to distance 12 on sequences of 20, c2p + p2c,
  shared attention keys, LayerNorm-ed relative embeddings, no absolute positions (DeBERTa-v3).
V2: absolute positions and 2 token types, factorised embeddings (24 -> 36, embed_proj), separate
  pos_{key,query}_proj, distances clipped at 6 without buckets, the ConvLayer (DeBERTa-v2 xlarge).
"""

import dataclasses
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
from transformers.models.deberta_v2 import modeling_deberta_v2 as hf_deberta

from jaxft import cli, peft
from jaxft.config import base_config
from jaxft.core.state import TrainState, flatten, unflatten
from jaxft.models import deberta, from_pretrained
from jaxft.objectives import registry as objectives
from jaxft.objectives.base import Weighted, make_step
from jaxft.objectives.supervised import classification_term
from jaxft.train.optim import make_optimizer

import hf_tiny as tiny

TOL = 1e-5
SEQ = 20
COMMON = dict(vocab_size=61, hidden_size=36, num_hidden_layers=2, num_attention_heads=3,
              intermediate_size=50, max_position_embeddings=40, relative_attention=True,
              pos_att_type=["p2c", "c2p"])
CONFIGS = {
    "v3": dict(position_buckets=4, max_relative_positions=12, share_att_key=True,
               norm_rel_ebd="layer_norm", position_biased_input=False, type_vocab_size=0),
    "v2": dict(position_buckets=-1, max_relative_positions=6, share_att_key=False,
               norm_rel_ebd="none", position_biased_input=True, type_vocab_size=2,
               embedding_size=24, conv_kernel_size=3, conv_act="gelu"),
    "v3_lm_head": dict(position_buckets=4, max_relative_positions=12, share_att_key=True,
                       norm_rel_ebd="layer_norm", position_biased_input=False, legacy=False),
}
HEADS = [None, "sequence_classification", "regression", "token_classification", "mlm"]
CLASSES = {None: T.DebertaV2Model, "sequence_classification": T.DebertaV2ForSequenceClassification,
           "regression": T.DebertaV2ForSequenceClassification,
           "token_classification": T.DebertaV2ForTokenClassification,
           "mlm": T.DebertaV2ForMaskedLM}
# Compiling dominates this file's time on 2 CPU cores; the unoptimised backend compiles about twice
# as fast and computes the same function.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def fast_jit(f):
  return jax.jit(f, compiler_options=FAST_COMPILE)


def logits_fn(m):
  """One jitted (params, batch) -> logits for every parameter set of m's module."""
  return fast_jit(lambda p, b: m.apply(p, b).logits)


def max_diff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def torch_model(name: str, head, seed: int = 0, **kw):
  """Seeded eager-attention reference with every parameter (LayerNorms, biases) randomised."""
  torch.manual_seed(seed)
  cfg = T.DebertaV2Config(**{**COMMON, **CONFIGS[name], **kw})
  if head in ("sequence_classification", "token_classification"):
    cfg.num_labels = 3
  elif head == "regression":
    cfg.num_labels, cfg.problem_type = 1, "regression"
  cfg._attn_implementation = "eager"
  model = CLASSES[head](cfg)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model.eval()


def batch(types: bool, seed: int = 0, b: int = 3, seq: int = SEQ) -> dict:
  """Right padding of lengths seq, seq - 5, seq - 10; pad id 0 in the padding."""
  rs = np.random.RandomState(seed)
  mask = (np.arange(seq)[None] < seq - 5 * np.arange(b)[:, None]).astype(np.int32)
  out = {"input_ids": (rs.randint(3, 61, (b, seq)) * mask).astype(np.int32),
         "attention_mask": mask}
  if types:
    out["token_type_ids"] = ((np.arange(seq)[None] >= seq // 2) * mask).astype(np.int32)
  return out


def torch_forward(model, b, **kw):
  with torch.no_grad():
    return model(**{k: torch.tensor(v, dtype=torch.long) for k, v in b.items()}, **kw)


def test_log_buckets_match_transformers():
  # Float32 log-bucketing must agree with torch's to the integer (v3: 256 buckets over 512).
  for buckets, max_pos, n in ((256, 512, 1024), (4, 12, 64), (4, 40, 64), (8, 20, 100)):
    rel = torch.arange(n)[:, None] - torch.arange(n)[None, :]
    want = hf_deberta.make_log_bucket_position(rel, buckets, max_pos).long().numpy()
    got = deberta.log_bucket_position(rel.numpy(), buckets, max_pos)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("name,head", [("v3", h) for h in HEADS] + [("v2", None), ("v2", "mlm")])
def test_parity(name, head, tmp_path):
  """Every hidden state, attention map, the last hidden state and the logits within 1e-5."""
  ref = torch_model(name, head)
  ref.save_pretrained(tmp_path)
  m = from_pretrained(tmp_path, head=head)
  info = m.loading_info
  assert (info.missing, info.unexpected, info.mismatched) == ([], [], [])
  b = batch(types=name == "v2")
  assert SEQ > 2 * CONFIGS["v3"]["position_buckets"]
  want = torch_forward(ref, b, output_hidden_states=True, output_attentions=True)
  got = fast_jit(lambda p: m.apply(p, b, output_hidden_states=True, output_attentions=True))(
      m.params)
  assert len(got.hidden_states) == 3 and len(got.attentions) == 2
  for g, w in zip(got.hidden_states, want.hidden_states):
    assert max_diff(g, w.numpy()) <= TOL
  for g, w in zip(got.attentions, want.attentions):
    assert g.shape == tuple(w.shape) and max_diff(g, w.numpy()) <= TOL
  last = want.last_hidden_state if head is None else want.hidden_states[-1]
  assert max_diff(got.last_hidden_state, last.numpy()) <= TOL
  if head is None:
    assert got.logits is None
  else:
    assert got.logits.shape == tuple(want.logits.shape)
    assert max_diff(got.logits, want.logits.numpy()) <= TOL


def _perturbed(params, seed=1):
  """Every parameter moved (so an export cannot pass by echoing the checkpoint)."""
  leaves, tree = jax.tree_util.tree_flatten(params)
  rs = np.random.RandomState(seed)
  return jax.tree_util.tree_unflatten(
      tree, [x + 0.02 * rs.randn(*x.shape).astype(np.float32) for x in leaves])


def check_export(m, cls, b, out_dir):
  """Perturbed parameters -> save_pretrained -> transformers `cls` (nothing missing, unused or
  mismatched) gives jaxft's logits; jaxft reads the export back bitwise."""
  params = _perturbed(m.params)
  out = m.with_params(params).save_pretrained(out_dir)
  want, ref = tiny.hf_logits(cls, out, "text", b)
  assert type(ref) is cls
  assert max_diff(logits_fn(m)(params, b), want) <= TOL
  again = from_pretrained(out, head=m.head)
  jax.tree_util.tree_map(np.testing.assert_array_equal, again.params, jax.device_get(params))


@pytest.mark.parametrize("name,head", [("v3", "sequence_classification"), ("v2", "mlm"),
                                       ("v3_lm_head", "mlm")])
def test_export_round_trips_to_transformers(name, head, tmp_path):
  """v2 covers embed_proj, the Conv1d kernel layout and the legacy tied decoder; v3_lm_head the
  lm_predictions/lm_head layout (legacy=False), which has no cls/predictions."""
  torch_model(name, head).save_pretrained(tmp_path / "ckpt")
  m = from_pretrained(tmp_path / "ckpt", head=head)
  if name == "v3_lm_head":
    assert set(m.params["head"]) == {"lm_predictions"}
  check_export(m, CLASSES[head], batch(types=name == "v2"), tmp_path / "export")


@pytest.mark.parametrize("model_type", ["xlm-roberta", "camembert"])
def test_xlm_roberta_and_camembert_load_as_roberta(model_type, tmp_path):
  cls, cfg_cls = {
      "xlm-roberta": (T.XLMRobertaForSequenceClassification, T.XLMRobertaConfig),
      "camembert": (T.CamembertForSequenceClassification, T.CamembertConfig)}[model_type]
  torch.manual_seed(0)
  cfg = cfg_cls(**tiny.COMMON, type_vocab_size=1, pad_token_id=1, num_labels=3)
  cfg._attn_implementation = "eager"
  ref = cls(cfg)
  with torch.no_grad():
    for p in ref.parameters():
      p.add_(0.05 * torch.randn_like(p))
  ref.eval().save_pretrained(tmp_path / "ckpt")
  m = from_pretrained(tmp_path / "ckpt", head="sequence_classification")
  assert m.family.model_type == model_type and m.family.base_prefix == "roberta"
  assert not (m.loading_info.missing or m.loading_info.unexpected)
  b = tiny.batch("roberta")  # pad id 1: fairseq positions
  want = torch_forward(ref, b, output_hidden_states=True)
  got = fast_jit(m.apply)(m.params, b)
  assert max_diff(got.last_hidden_state, want.hidden_states[-1].numpy()) <= TOL
  assert max_diff(got.logits, want.logits.numpy()) <= TOL
  if model_type == "xlm-roberta":
    check_export(m, cls, b, tmp_path / "export")


@pytest.fixture(scope="module")
def v3_classifier(tmp_path_factory):
  """A saved 3-label DeBERTa-v3 sequence classifier (loading it needs no random init)."""
  d = tmp_path_factory.mktemp("deberta_v3")
  torch_model("v3", "sequence_classification").save_pretrained(d)
  return d


def test_bf16_perturbation_dropout_and_remat(v3_classifier):
  b = batch(types=False)
  head = "sequence_classification"
  plain = from_pretrained(v3_classifier, head=head)
  half = from_pretrained(v3_classifier, head=head, dtype="bfloat16")
  remat = from_pretrained(v3_classifier, head=head, remat=True)
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(half.params))

  @fast_jit
  def run(params, delta, rng):
    f = lambda d: plain.apply(params, b, embedding_perturbation=d)
    out = plain.apply(params, b)
    moved, grad = jax.value_and_grad(lambda d: f(d).logits.sum())(delta)
    return dict(logits=out.logits, hidden=out.last_hidden_state, emb=out.embeddings,
                zero=f(jnp.zeros_like(delta)).logits,
                moved=moved, grad=grad, half=half.apply(params, b),
                dropout=plain.apply(params, b, rng=rng, deterministic=False).logits,
                remat=remat.apply(params, b).logits)

  delta = 0.1 * jax.random.normal(jax.random.key(0), (3, SEQ, COMMON["hidden_size"]))
  r = run(plain.params, delta, jax.random.key(1))
  assert r["half"].last_hidden_state.dtype == jnp.bfloat16 and r["half"].logits.dtype == jnp.float32
  assert max_diff(r["half"].logits, r["logits"]) <= 5e-2
  assert max_diff(r["half"].last_hidden_state, r["hidden"]) <= 0.1  # O(1) values, bf16 rounding
  # Adversarial objectives add a perturbation to the embedding output and differentiate through it.
  assert r["emb"].shape == delta.shape
  assert max_diff(r["zero"], r["logits"]) <= 1e-6
  assert abs(float(r["moved"]) - float(r["logits"].sum())) > 1e-4
  assert float(jnp.abs(r["grad"]).max()) > 0
  assert max_diff(r["dropout"], r["logits"]) > 1e-4
  assert max_diff(r["remat"], r["logits"]) <= 1e-6
  with pytest.raises(ValueError, match="XLA path"):
    from_pretrained(v3_classifier, head=head, attention_impl="cudnn")


# ---- every objective and every PEFT method ---------------------------------------------------


def train_batch(b=4, s=12, seed=0):
  """Labeled rows plus the unlabeled weak / strong views the semi-supervised objectives read."""
  rs = np.random.RandomState(seed)

  def rows():
    mask = (np.arange(s)[None] < rs.randint(5, s + 1, (b, 1))).astype(np.int32)
    return (rs.randint(3, 61, (b, s)) * mask).astype(np.int32), mask

  ids, mask = rows()
  out = {"input_ids": ids, "attention_mask": mask, "labels": np.arange(b, dtype=np.int32) % 3,
         "example_mask": np.ones(b, np.float32), "unlabeled/example_mask": np.ones(b, np.float32)}
  for prefix in ("unlabeled/", "unlabeled/strong/"):
    ids, mask = rows()
    out.update({f"{prefix}input_ids": ids, f"{prefix}attention_mask": mask})
  return jax.tree_util.tree_map(jnp.asarray, out)


def objective(name):
  opts = ml_collections.ConfigDict(objectives.defaults()[name])
  if name in ("pgd", "freelb"):
    opts.steps = 2
  if name == "flexmatch":
    opts.pool_size = 64
  cfg = ml_collections.ConfigDict({"name": name, name: opts})
  return objectives.build(cfg, types.SimpleNamespace(kind="classification", num_labels=3))


# Every PEFT method, in as few models as the exclusive pairs (lora / dora, the two adapter kinds)
# allow; full, linear_probe and freeze_bottom add no parameters and share the plain model.
PEFT_RUNS = ("full", "linear_probe", "freeze_bottom", "lora+adapter_pfeiffer",
             "dora+bitfit+adapter_houlsby+ia3+prefix+prompt")


def peft_cfg(method, freeze_layers=1):
  c = base_config().peft
  c.method = method
  c.lora_rank, c.adapter_size, c.prefix_length, c.prompt_length = 2, 3, 2, 2
  c.freeze_layers = freeze_layers
  return c


def peft_shapes(m, spec):
  """(module built with `spec`, its flat parameter shapes), traced without compiling."""
  module = m.module.clone(cfg=dataclasses.replace(m.module.cfg, peft=spec))
  dummy = {"input_ids": jnp.zeros((1, 4), jnp.int32),
           "attention_mask": jnp.ones((1, 4), jnp.int32), "token_type_ids": None}
  return module, flatten(jax.eval_shape(lambda: module.init(jax.random.key(0), dummy)["params"]))


def with_peft(m, spec, seed=0):
  """m's weights under a model built with `spec`; the added PEFT leaves random (non-identity)."""
  module, shapes = peft_shapes(m, spec)
  base, rs = flatten(m.params), np.random.RandomState(seed)
  flat = {k: base[k] if k in base else
          (float(k.endswith(("ia3", "dora_m"))) + 0.1 * rs.randn(*v.shape)).astype(np.float32)
          for k, v in shapes.items()}
  return dataclasses.replace(m, module=module, params=unflatten(flat))


@pytest.mark.parametrize("name", ["v3", "v2"])
def test_lora_presets_find_debertas_projections(name, tmp_path):
  """qv / attention / all-linear on layer_0; all-linear adds pos_{key,query}_proj when the
  relative-position projections are not shared (v2)."""
  torch_model(name, "sequence_classification").save_pretrained(tmp_path)
  m = from_pretrained(tmp_path, head="sequence_classification")
  qv = ["attention/self/query_proj", "attention/self/value_proj"]
  attention = qv + ["attention/self/key_proj", "attention/output/dense"]
  linear = attention + ["intermediate/dense", "output/dense"]
  if name == "v2":
    linear += ["attention/self/pos_key_proj", "attention/self/pos_query_proj"]
  for preset, want in (("qv", qv), ("attention", attention), ("all-linear", linear)):
    c = peft_cfg("lora")
    c.lora_targets = preset
    _, shapes = peft_shapes(m, peft.spec_from_config(c))
    got = {k[len("backbone/encoder/layer_0/"):-len("/lora_a")] for k in shapes
           if k.startswith("backbone/encoder/layer_0/") and k.endswith("/lora_a")}
    assert got == set(want), preset
    assert sum(k.endswith("/lora_a") for k in shapes) == len(want) * COMMON["num_hidden_layers"]


@pytest.fixture(scope="module")
def one_layer_classifier(tmp_path_factory):
  """A saved 1-layer DeBERTa-v3 classifier: the training sweep costs in proportion to depth."""
  d = tmp_path_factory.mktemp("deberta_v3_1layer")
  torch_model("v3", "sequence_classification", num_hidden_layers=1).save_pretrained(d)
  return d


@pytest.mark.slow
def test_every_objective_and_peft_method_trains(one_layer_classifier):
  """One step of an objective per way objectives read the model (hf_tiny.FAMILY_OBJECTIVES; full
  fine-tuning) and two of each PEFT method (supervised CE): finite losses, no skipped step, frozen
  leaves bitwise unchanged, the trainable ones moved (all of them for a PEFT method), and the
  default LoRA preset finds DeBERTa's query/value projections. Eager (jax.disable_jit): the step
  graphs share their primitives, so this costs about half of compiling each step."""
  layers = 1
  tc = base_config().train
  tc.learning_rate, tc.warmup_ratio, tc.schedule = 1e-2, 0.0, "constant"
  base = from_pretrained(one_layer_classifier, head="sequence_classification")
  b = train_batch()
  runs = {}
  assert set(tiny.FAMILY_OBJECTIVES) <= set(objectives.names())
  for name in tiny.FAMILY_OBJECTIVES:
    obj = objective(name)
    flat = flatten(base.params)
    tx = optax.adam(1e-3)
    extras = obj.init_extras(flat, {}) if obj.init_extras else None
    runs[name] = (TrainState.create(flat, {}, tx, extras=extras),
                  make_step(base.apply, obj.terms, tx, update_extras=obj.update_extras), 1)
  assert set(peft.METHODS) == {m for run in PEFT_RUNS for m in run.split("+")}
  for method in PEFT_RUNS:
    c = peft_cfg(method, freeze_layers=0)  # freeze_bottom: the embeddings only
    m = with_peft(base, peft.spec_from_config(c))
    labels = peft.partition(c, flatten(m.params), layers)
    if "lora" in method.split("+"):
      lora = sorted(k.split("/")[-2] for k in labels if k.endswith("lora_a"))
      assert lora == sorted(["query_proj", "value_proj"] * layers)
    trainable, frozen = peft.split(flatten(m.params), labels)
    tx, schedule = make_optimizer(tc, trainable, layers, 2)
    runs[method] = (TrainState.create(trainable, frozen, tx),
                    make_step(m.apply, {"sup": Weighted(classification_term())}, tx,
                              lr_schedule=schedule), 2)
  with jax.disable_jit():
    for n, (state, step, num_steps) in runs.items():
      old = jax.device_get(state)
      for i in range(num_steps):
        state, metrics = step(state, b, jax.random.key(i))
        assert np.isfinite(float(metrics["loss"])), (n, metrics)
        assert float(metrics["nonfinite"]) == 0.0, n
      new = jax.device_get(state)
      assert set(new.frozen) == set(old.frozen)
      for k, v in old.frozen.items():
        np.testing.assert_array_equal(new.frozen[k], v, err_msg=f"{n}: {k}")
      moved = {k for k, v in old.trainable.items() if not np.array_equal(new.trainable[k], v)}
      if n in PEFT_RUNS:
        assert moved == set(old.trainable), (n, set(old.trainable) - moved)
      else:
        assert "head/classifier/kernel" in moved and len(moved) > len(old.trainable) // 2, n


# ---- jaxft train and jaxft export ---------------------------------------------------------------


def test_cli_trains_and_exports_a_tiny_deberta(tmp_path, minilm_dir, capsys):
  """quickstart with the model swapped for a tiny random DeBERTa-v3 classifier (MiniLM's WordPiece
  tokenizer): three steps, then `jaxft export` loads in transformers with jaxft's logits. (A
  checkpoint with its 2-label head loads without compiling a random init.)"""
  model = tmp_path / "tiny_deberta"
  model.mkdir()
  for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    shutil.copy(minilm_dir / name, model / name)
  vocab = len(T.AutoTokenizer.from_pretrained(model))
  torch.manual_seed(0)
  cfg = T.DebertaV2Config(**{**COMMON, **CONFIGS["v3"], "vocab_size": vocab, "hidden_size": 32,
                             "num_attention_heads": 2, "intermediate_size": 64,
                             "max_position_embeddings": 512, "num_labels": 2})
  T.DebertaV2ForSequenceClassification(cfg).save_pretrained(model)
  overrides = {"model.name": model, "data.max_train_examples": 32, "data.max_eval_examples": 16,
               "data.max_length": 32, "data.bucket_boundaries": "32", "train.batch_size": 8,
               "train.eval_batch_size": 8, "train.num_steps": 3, "train.eval_every": 3,
               "train.checkpoint_every": 3, "train.progress": False}
  workdir = tmp_path / "run"
  code = cli.main(["train", "--config", "experiments/quickstart.py", "--workdir", str(workdir),
                   *(f"--config.{k}={v}" for k, v in overrides.items())])
  assert code == 0, capsys.readouterr().err[-3000:]
  results = json.loads((workdir / "results.json").read_text())
  assert results["steps"] == 3 and results["last_train"]["nonfinite"] == 0.0
  assert np.isfinite(results["last_train"]["loss"]) and 0.0 <= results["eval"]["accuracy"] <= 1.0
  assert cli.main(["export", "--workdir", str(workdir), "--out", str(tmp_path / "hf")]) == 0
  tok = T.AutoTokenizer.from_pretrained(tmp_path / "hf")
  enc = tok(["a tiny film", "the best movie of the year, truly"], padding=True, return_tensors="np")
  b = {k: enc[k].astype(np.int32) for k in ("input_ids", "attention_mask")}
  want, ref = tiny.hf_logits(T.AutoModelForSequenceClassification, tmp_path / "hf", "text", b)
  assert type(ref) is T.DebertaV2ForSequenceClassification
  m = from_pretrained(tmp_path / "hf", head="sequence_classification")
  assert max_diff(logits_fn(m)(m.params, b), want) <= TOL
