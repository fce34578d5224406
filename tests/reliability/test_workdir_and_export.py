"""No trap, no silent loss: a failed start leaves nothing that blocks the fixed command, a finished
run is never touched by a refused one, `jaxft eval --split` scores any split of the task (and
`--file` a local file in its format),
`jaxft export --adapter-only` writes every trained leaf and loads back onto the base model bitwise.

One real tiny run (2-layer, 32-wide BERT, lora+bitfit, 2 steps) through `jaxft.cli.main`; the other
PEFT methods round-trip through jaxft.peft.io on the same model with perturbed trainable leaves.
"""

from __future__ import annotations

import json
import logging

import jax
import numpy as np
import pytest

from jaxft import cli
from jaxft.core.state import flatten

from reliability_runs import assert_trees_bitwise_equal, load_config, overrides, saved_state
from test_bad_input import GOOD_ROWS, error_line, local

TEST_ROWS = "text,label\n" + "".join(f"test review {i} was {w},{w}\n" for i, w in
                                     enumerate(["bad", "good"] * 4))
SHORT = {"train__num_steps": 2, "train__eval_every": 2, "train__checkpoint_every": 2,
         "peft__method": "lora+bitfit"}


def cli_train(capsys, workdir, model, *args, **extra):
  code = cli.main(["train", "--config", "experiments/quickstart.py:smoke", "--workdir",
                   str(workdir), *overrides(model, **extra), *args])
  return code, capsys.readouterr().err


def data(tmp_path, **extra) -> dict:
  test = tmp_path / "test.csv"
  test.write_text(TEST_ROWS)
  return {**local(tmp_path, GOOD_ROWS), "data__test_file": test, **extra}


def test_failed_start_leaves_nothing_and_never_touches_a_finished_run(tmp_path, tiny_model,
                                                                      capsys, caplog):
  workdir = tmp_path / "run"
  good = {**data(tmp_path), **SHORT}
  # Bad input: a label column the file lacks, bucket boundaries past max_length. Refused, and
  # nothing is recorded, so the corrected command needs neither --overwrite nor a new workdir.
  for bad, message in (({"data__label_column": "sentiment"}, "no column 'sentiment'"),
                       ({"data__bucket_boundaries": "64"},
                        "bucket boundary 64 exceeds data.max_length=32")):
    code, err = cli_train(capsys, workdir, tiny_model, **{**good, **bad})
    assert code == 2 and message in error_line(err)
    assert not workdir.exists()
  code, err = cli_train(capsys, workdir, tiny_model, **good)
  assert code == 0, err[-3000:]
  finished = {p.name: p.stat().st_mtime_ns for p in workdir.rglob("*") if p.is_file()}
  assert "results.json" in finished and "config.json" in finished

  # A refused start over the finished run (another experiment, --overwrite, bad data) moves and
  # changes nothing: --overwrite only takes effect once the new inputs validated.
  code, err = cli_train(capsys, workdir, tiny_model, "--overwrite",
                        **{**good, "data__label_column": "sentiment"})
  assert code == 2 and "no column 'sentiment'" in error_line(err)
  assert {p.name: p.stat().st_mtime_ns for p in workdir.rglob("*") if p.is_file()} == finished
  assert not list(tmp_path.glob("run.old-*"))

  # A workdir holding only a config.json (what a failed start left before this fix) does not
  # block another experiment; the stale config is moved aside, not deleted.
  stale = tmp_path / "stale"
  stale.mkdir()
  (stale / "config.json").write_text((workdir / "config.json").read_text())
  from jaxft.train import loop
  other = load_config(tiny_model, **{**good, "train__learning_rate": 0.5})
  assert loop.check_workdir(stale, other, overwrite=False) == "replace"
  loop.prepare_workdir(stale, other, overwrite=False)
  (backup,) = tmp_path.glob("stale.old-*")
  assert json.loads((backup / "config.json").read_text())["train"]["learning_rate"] == 1e-4

  # jaxft eval scores the task's test split (named at training time only as data.test_file),
  # from the same best checkpoint, without warning that the head is "newly initialized".
  caplog.set_level(logging.INFO)
  caplog.clear()  # training itself rightly warned that the base checkpoint has no head
  assert cli.main(["eval", "--workdir", str(workdir), "--split", "test"]) == 0
  scored = json.loads(capsys.readouterr().out)
  assert set(scored) >= {"accuracy", "f1"}
  assert (workdir / "eval_test_best.json").exists()
  assert "newly initialized" not in caplog.text
  # --file scores a local file in the task's format: the same rows give the same metrics.
  assert cli.main(["eval", "--workdir", str(workdir), "--file", str(tmp_path / "test.csv")]) == 0
  assert json.loads(capsys.readouterr().out) == scored
  assert (workdir / "eval_file_test_best.json").exists()
  (tmp_path / "other.csv").write_text("review,label\nfine,good\n")
  assert cli.main(["eval", "--workdir", str(workdir), "--file", str(tmp_path / "other.csv")]) == 2
  err = capsys.readouterr().err
  assert "jaxft eval: error: " in err and "no column 'text'" in err and "Traceback" not in err

  # --adapter-only: every trained leaf (LoRA and BitFit's biases and the head), the method and its
  # options recorded; loading it onto the base model rebuilds the evaluated weights bitwise.
  out = tmp_path / "adapter"
  assert cli.main(["export", "--workdir", str(workdir), "--out", str(out), "--adapter-only"]) == 0
  assert "newly initialized" not in caplog.text
  # (export itself loaded it back onto the base model and compared every leaf bitwise.)
  from jaxft.peft import io as peft_io
  saved = peft_io.load_trainable(out)
  _, checkpoint = saved_state(workdir, which="best")
  assert_trees_bitwise_equal(jax.device_get(saved.trainable), checkpoint["trainable"])
  assert any(k.endswith("/bias") and "lora" not in k for k in saved.trainable)
  assert saved.method == "lora+bitfit" and saved.options["lora_rank"] == 8
  assert saved.model["head"] == "sequence_classification" and saved.model["num_labels"] == 2


# Every kind of PEFT leaf (lora_a/b, dora_m, ia3, adapters, prefix_key/value) in one model; the
# CLI test above covers lora+bitfit.
@pytest.mark.parametrize("method", ["dora+ia3+adapter_houlsby+prefix"])
def test_adapter_round_trips_bitwise(tmp_path, tiny_model, method):
  """export(merged=False) with the run's labels -> load_adapter: the same leaves, the same
  logits. Trainable leaves are perturbed so that none equals its fresh initialisation."""
  from jaxft import peft
  from jaxft.models import from_pretrained
  from jaxft.peft import io as peft_io
  from jaxft.train.build import num_layers
  config = load_config(tiny_model, peft__method=method)
  spec = peft.spec_from_config(config.peft)
  model = from_pretrained(str(tiny_model), head="sequence_classification", num_labels=3,
                          id2label=["neg", "neu", "pos"], peft=spec, load_tokenizer=False)
  flat = flatten(jax.device_get(model.params))
  labels = peft.partition(config.peft, flat, num_layers(model.config))
  rng = np.random.default_rng(0)
  trained = {k: (v + rng.normal(0, 0.05, v.shape).astype(v.dtype)
                 if labels[k] == peft.TRAINABLE else v) for k, v in flat.items()}
  from jaxft.core.state import unflatten
  params = unflatten(trained)
  out = peft.export(model, params, tmp_path / "adapter", merged=False, labels=labels,
                    method=method, base_model=str(tiny_model), options=config.peft.to_dict())
  record = json.loads((out / peft_io.CONFIG_FILE).read_text())
  assert record["method"] == method and record["options"]["method"] == method
  assert len(record["params"]) == sum(v == peft.TRAINABLE for v in labels.values())
  loaded = peft_io.load_adapter(out, load_tokenizer=False)
  assert loaded.head == "sequence_classification" and loaded.config.id2label[2] == "pos"
  assert_trees_bitwise_equal(jax.device_get(loaded.params), params)
  assert loaded.module == model.module  # the recorded head, pooling and dtype: one forward
  logits = jax.jit(lambda p: model.apply(p, {"input_ids": np.array([[101, 2023, 3185, 102]])}
                                         ).logits)
  np.testing.assert_array_equal(np.asarray(logits(loaded.params)), np.asarray(logits(params)))
