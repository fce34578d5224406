"""End to end through `train_and_evaluate`: a config in, a finished workdir out, for every way a
config can shape the step (supervised, EMA/SWA/plateau, pruning, distillation, FixMatch with its
strong view, post-training int8, NER scored over words). Tiny random BERT with the real MiniLM
tokenizer on real data (movie reviews, CoNLL-2003), a few steps each."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from jaxft import config as config_lib
from jaxft.train.loop import train_and_evaluate

BASE = {
    "data.max_train_examples": 64, "data.max_eval_examples": 32, "data.max_length": 32,
    "data.bucket_boundaries": "32", "train.batch_size": 8, "train.eval_batch_size": 16,
    "train.num_steps": 16, "train.eval_every": 8, "train.progress": False, "train.log_every": 1,
    "train.learning_rate": 1e-3, "train.warmup_ratio": 0.0,
}


def make_config(model_dir, experiment="experiments/quickstart.py:smoke", **extra):
  values = {"model.name": str(model_dir), **BASE, **{k.replace("__", "."): v for k, v in extra.items()}}
  return config_lib.load(experiment, [(k, str(v)) for k, v in values.items()])


def rows(workdir, kind):
  lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
  return [r for r in map(json.loads, lines) if r["kind"] == kind]


def saved_extras(workdir):
  """state.extras of the newest checkpoint in workdir, as numpy."""
  import orbax.checkpoint as ocp
  root = pathlib.Path(workdir) / "checkpoints" / "latest"
  step = max(int(p.name) for p in root.iterdir() if p.name.isdigit())
  return ocp.StandardCheckpointer().restore((root / str(step) / "state").absolute())["extras"]


@pytest.fixture(scope="module")
def supervised_run(tiny_bert_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("supervised") / "run"
  results = train_and_evaluate(make_config(tiny_bert_dir, data__bucket_boundaries="16,32"), workdir)
  return workdir, results


def test_supervised_run_fills_the_workdir(supervised_run):
  workdir, results = supervised_run
  saved = json.loads((workdir / "results.json").read_text())
  assert saved["eval"] == results["eval"]
  assert set(saved["eval"]) >= {"accuracy", "f1", "mcc"} and 0.0 <= saved["eval"]["accuracy"] <= 1
  assert saved["best_step"] in (8, 16) and saved["steps"] == 16
  assert saved["trainable_params"] == saved["total_params"] > 0
  assert saved["wall_time_s"] > 0 and saved["train_examples_per_s"] > 0
  # one compile per bucket shape at most (two buckets: 16 and 32)
  assert 1 <= saved["compilations"] <= 2
  train = rows(workdir, "train")
  assert [r["step"] for r in train] == list(range(1, 17))
  losses = [r["loss"] for r in train]
  assert np.mean(losses[-4:]) < np.mean(losses[:4])  # 64 examples, 2 epochs: it fits them
  assert [r["step"] for r in rows(workdir, "eval")] == [8, 16]
  assert list((workdir / "tensorboard").rglob("events.out.tfevents.*"))
  assert (workdir / "config.json").is_file() and (workdir / "checkpoints" / "best").is_dir()


def test_rbg_dropout_keys_train_the_same_model_with_another_stream(supervised_run, tiny_bert_dir,
                                                                   tmp_path):
  results = train_and_evaluate(make_config(tiny_bert_dir, data__bucket_boundaries="16,32",
                                           train__rng_impl="rbg"), tmp_path / "run")
  losses = [r["loss"] for r in rows(tmp_path / "run", "train")]
  threefry = [r["loss"] for r in rows(supervised_run[0], "train")]
  assert losses[0] != threefry[0]  # dropout draws differ from the first step on
  assert np.mean(losses[-4:]) < np.mean(losses[:4])  # and it fits the 64 examples all the same
  assert 1 <= results["compilations"] <= 2


def test_ema_swa_and_plateau_from_config(tiny_bert_dir, tmp_path):
  cfg = make_config(tiny_bert_dir, train__ema_decay=0.9, train__swa_start=4, train__swa_every=2,
                    train__eval_with="swa", train__schedule="plateau", train__plateau_patience=0)
  results = train_and_evaluate(cfg, tmp_path / "run")
  assert results["eval_with"] == "swa" and "accuracy" in results["eval"]
  extras = saved_extras(tmp_path / "run")
  assert int(extras["swa/count"]) == 7  # steps 4, 6, ..., 16
  assert set(extras["ema"]) == set(extras["swa"]) and len(extras["ema"]) > 10


def test_magnitude_pruning_from_config_reaches_its_sparsity(tiny_bert_dir, tmp_path):
  cfg = make_config(tiny_bert_dir, prune__method="magnitude", prune__final_sparsity=0.5,
                    prune__begin_fraction=0.0, prune__end_fraction=0.5, prune__frequency=2)
  results = train_and_evaluate(cfg, tmp_path / "run")
  assert results["last_train"]["sparsity/total"] == pytest.approx(0.5, abs=0.01)
  assert results["last_train"]["sparsity/target"] == pytest.approx(0.5)
  # The eval at step 8 saw a model still below its final sparsity (the schedule ends with the
  # update at step 8): it may score higher, but the best checkpoint is the pruned model.
  assert results["best_step"] == 16
  from jaxft.train.restore import load_workdir
  _, best = load_workdir(tmp_path / "run")
  masks = best.extras["masks"]
  kept = sum(int(m.sum()) for m in masks.values()) / sum(m.size for m in masks.values())
  assert kept == pytest.approx(0.5, abs=0.01)


def test_movement_pruning_scores_train(tiny_bert_dir, tmp_path):
  cfg = make_config(tiny_bert_dir, prune__method="movement", prune__final_sparsity=0.7,
                    prune__begin_fraction=0.0, prune__end_fraction=0.5, prune__frequency=2)
  results = train_and_evaluate(cfg, tmp_path / "run")
  assert results["last_train"]["sparsity/total"] == pytest.approx(0.7, abs=0.01)


def test_distillation_from_an_exported_teacher(supervised_run, tiny_bert_dir, tmp_path):
  from jaxft.train.restore import export_workdir
  teacher = export_workdir(supervised_run[0], tmp_path / "teacher")
  cfg = make_config(tiny_bert_dir, distill__teacher=str(teacher), distill__alpha=0.5)
  results = train_and_evaluate(cfg, tmp_path / "student")
  last = results["last_train"]
  assert "loss/distill" in last and "loss/sup" not in last  # alpha * CE lives in the distill term
  assert last["loss"] == pytest.approx(last["loss/distill"], rel=1e-5)
  assert last["distill/soft"] >= 0.0 and 0.0 <= last["distill/agreement"] <= 1.0
  # A one-layer student made of teacher layer 1, with hidden-state transfer (teacher online).
  cfg = make_config(tiny_bert_dir, distill__teacher=str(teacher), distill__student_layers="1",
                    distill__hidden_weight=1.0)
  results = train_and_evaluate(cfg, tmp_path / "layers")
  assert results["last_train"]["distill/hidden_mse"] >= 0.0
  assert results["total_params"] < supervised_run[1]["total_params"]


def test_keep_layers_builds_a_shallower_model_from_the_checkpoint(tiny_bert_dir, tmp_path):
  from jaxft.models import from_pretrained
  from jaxft.train.setup import build_setup
  from jaxft.core.state import flatten
  full = flatten(from_pretrained(str(tiny_bert_dir), head="sequence_classification",
                                 num_labels=2).params)
  s = build_setup(make_config(tiny_bert_dir, model__keep_layers="1"))
  assert s.model.config.num_hidden_layers == 1
  params = {**s.state.trainable, **s.state.frozen}
  layer0 = {k: v for k, v in params.items() if "/layer_0/" in k}
  assert layer0 and not any("/layer_1/" in k for k in params)
  for k, v in layer0.items():  # checkpoint layer 1 is the model's only layer
    np.testing.assert_array_equal(v, full[k.replace("/layer_0/", "/layer_1/")])
  with pytest.raises(ValueError, match=r"model.keep_layers='0,5' does not fit"):
    build_setup(make_config(tiny_bert_dir, model__keep_layers="0,5"))


def test_teacher_logits_are_computed_once_and_reused(supervised_run, tiny_bert_dir, tmp_path,
                                                     caplog):
  from jaxft.train.restore import export_workdir
  from jaxft.train.setup import build_setup
  teacher = export_workdir(supervised_run[0], tmp_path / "teacher")
  cache = tmp_path / "cache"
  cfg = make_config(tiny_bert_dir, distill__teacher=str(teacher), data__cache_dir=str(cache))
  with caplog.at_level("INFO", logger="jaxft"):
    first = build_setup(cfg).data.train.logits
    assert "computed teacher logits for 64 train examples" in caplog.text
    caplog.clear()
    again = build_setup(cfg).data.train.logits
    assert "teacher logits for 64 train examples from" in caplog.text
  np.testing.assert_array_equal(first, again)
  assert len(list((cache / "teacher_logits").glob("*.npy"))) == 1
  # other data (another slice of the training set) is another entry, not a stale hit
  build_setup(make_config(tiny_bert_dir, distill__teacher=str(teacher), data__cache_dir=str(cache),
                          data__max_train_examples=48))
  assert len(list((cache / "teacher_logits").glob("*.npy"))) == 2


def test_distillation_refuses_a_teacher_without_a_trained_head(tiny_bert_dir, tmp_path):
  cfg = make_config(tiny_bert_dir, distill__teacher=str(tiny_bert_dir))
  with pytest.raises(ValueError, match="no trained"):
    train_and_evaluate(cfg, tmp_path / "run")


def test_fixmatch_gets_a_strong_view(tiny_bert_dir, tmp_path):
  cfg = make_config(tiny_bert_dir, objective__name="fixmatch", data__labeled_per_class=8,
                    data__unlabeled_ratio=1, data__max_train_examples=128,
                    data__unlabeled_label_metrics=True)
  from jaxft.train.setup import build_setup
  s = build_setup(cfg)
  batch = s.data.train.batch_at(3)
  weak, strong = batch["unlabeled/input_ids"], batch["unlabeled/strong/input_ids"]
  assert weak.shape == strong.shape and (weak != strong).any()
  np.testing.assert_array_equal(batch["unlabeled/strong/input_ids"],
                                s.data.train.batch_at(3)["unlabeled/strong/input_ids"])
  results = train_and_evaluate(cfg, tmp_path / "run")
  last = results["last_train"]
  assert last["loss"] == pytest.approx(last["loss/sup"] + last["loss/unsup"], rel=1e-4, abs=1e-6)
  assert 0.0 <= last["unsup/pseudo_label_accuracy"] <= 1.0  # the pool's true labels, diagnostics


def test_post_training_int8_reports_accuracy_and_size(tiny_bert_dir, tmp_path):
  results = train_and_evaluate(make_config(tiny_bert_dir, quant__method="ptq_int8"), tmp_path / "r")
  q = results["int8"]
  assert set(q["eval"]) == set(results["eval"])
  assert abs(q["eval"]["accuracy"] - results["eval"]["accuracy"]) <= 0.1
  assert q["size"]["ratio"] > 1.0 and q["size"]["quantized_leaves"] > 0


def test_ner_is_scored_over_words(tiny_bert_dir, tmp_path, shared_data):
  cfg = make_config(tiny_bert_dir, "experiments/conll2003.py",
                    data__data_dir=str(shared_data / "conll2003"), train__num_steps=4,
                    train__eval_every=4)
  results = train_and_evaluate(cfg, tmp_path / "run")
  assert {"entity_f1", "entity_precision", "entity_recall"} <= set(results["eval"])


def test_real_minilm_fine_tunes_on_real_data(minilm_dir, tmp_path):
  """The quickstart's model (all-MiniLM-L6-v2, from PyPI) on movie reviews, 12 steps."""
  cfg = make_config(minilm_dir, train__num_steps=12, train__eval_every=12, train__batch_size=16,
                    train__learning_rate=1e-4, data__max_train_examples=192)
  results = train_and_evaluate(cfg, tmp_path / "run")
  losses = [r["loss"] for r in rows(tmp_path / "run", "train")]
  assert len(losses) == 12 and np.mean(losses[-4:]) < np.mean(losses[:4])
  assert results["total_params"] == 22_713_986 and set(results["eval"]) >= {"accuracy", "f1", "mcc"}
  assert json.loads((tmp_path / "run" / "results.json").read_text())["best_step"] == 12


def test_eval_of_a_finished_workdir_with_int8(supervised_run):
  from jaxft.train.restore import evaluate_workdir
  workdir, results = supervised_run
  metrics = evaluate_workdir(workdir, which="best", int8=True)
  assert {k: metrics[k] for k in results["best"]} == pytest.approx(results["best"])
  assert set(metrics["int8"]["eval"]) == set(results["best"])
  assert metrics["int8"]["size"]["int8_bytes"] < metrics["int8"]["size"]["fp32_bytes"]


def test_eval_of_a_finished_workdir_under_attack(supervised_run):
  """jaxft eval --pgd-eps / --synonym-attack: PGD at radius 0 changes nothing, a large radius can
  only lower accuracy, and the WordNet attack reports on the texts it was given."""
  from jaxft.eval import robustness
  from jaxft.train.restore import evaluate_workdir
  if not (robustness.wordnet_dir() / "index.noun").is_file():
    pytest.skip("WordNet not installed (apt-get install wordnet-base)")
  workdir, results = supervised_run
  m = evaluate_workdir(workdir, which="best", pgd_eps=[0.0, 100.0], pgd_steps=3,
                       synonym_examples=6)["robustness"]
  pgd = m["pgd"]
  assert pgd["examples"] == 32 and pgd["clean_accuracy"] == pytest.approx(results["best"]["accuracy"])
  assert pgd["pgd_l2/0/accuracy"] == pytest.approx(pgd["clean_accuracy"])
  assert pgd["pgd_l2/100/accuracy"] <= pgd["clean_accuracy"]
  syn = m["synonyms"]
  assert syn["examples"] == 6 and 0.0 <= syn["accuracy_under_attack"] <= syn["clean_accuracy"]
  assert json.loads((workdir / "eval_validation_best.json").read_text())["robustness"] == m
  first = evaluate_workdir(workdir, which="best", pgd_eps=[0.0], pgd_steps=1, pgd_examples=1)
  assert first["robustness"]["pgd"]["examples"] == 16  # one eval batch (batch size 16)


def test_inference_benchmark_of_a_finished_workdir(supervised_run, capsys):
  """benchmarks/inference.py (the distillation table's examples/s column) on a finished run."""
  import importlib.util
  script = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "inference.py"
  spec = importlib.util.spec_from_file_location("jaxft_bench_inference", script)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  workdir, results = supervised_run
  row = mod.measure(str(workdir), repeats=1)
  assert row["examples"] == 32 and row["examples_per_s"] > 0
  assert row["params"] == results["total_params"]
  assert row["metrics"]["accuracy"] == pytest.approx(results["best"]["accuracy"])
  mod.main([str(workdir), "--repeats", "1"])
  assert f"{100 * results['best']['accuracy']:.2f}" in capsys.readouterr().out
  # the same measurement as a grid row's evaluation (evaluate={"speed_passes": N}) and
  # `jaxft eval --speed-passes N`
  from jaxft import cli
  assert cli.main(["eval", "--workdir", str(workdir), "--speed-passes", "2"]) == 0
  speed = json.loads((workdir / "eval_validation_best.json").read_text())["inference"]
  assert speed["examples"] == 32 and speed["passes"] == 2 and speed["examples_per_s"] > 0
  assert speed["params"] == results["total_params"]
  with pytest.raises(ValueError, match="passes >= 1"):
    from jaxft.train.evaluate import inference_speed
    inference_speed(None, None, passes=0)
