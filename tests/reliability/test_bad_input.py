"""Bad input fails with one clear line that names the thing and the fix, before any compile.

Through `jaxft.cli.main` (exit status 2, one `jaxft train: error: ...` line on stderr, no
traceback), with the `no_compile` fixture making sure nothing reached the jit of the train step.
"""

import json

import pytest

from jaxft import cli
from jaxft.train import loop

from reliability_runs import load_config, overrides


def train(capsys, workdir, tiny_model, *extra_args, **extra):
  argv = ["train", "--config", "experiments/quickstart.py:smoke", "--workdir", str(workdir),
          *overrides(tiny_model, **extra), *extra_args]
  code = cli.main(argv)
  err = capsys.readouterr().err
  return code, err


def error_line(err: str) -> str:
  assert "Traceback" not in err
  lines = [line for line in err.splitlines() if line.startswith("jaxft train: error: ")]
  assert len(lines) == 1, err[-3000:]
  return lines[0]


def local(tmp_path, train_text: str | bytes, valid_text: str | bytes | None = None,
          suffix=".csv", **extra) -> dict:
  """Overrides for data.name=local over files holding the given contents."""
  files = {}
  for split, text in (("train", train_text), ("validation", valid_text or train_text)):
    path = tmp_path / f"{split}{suffix}"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    files[split] = path
  return dict(data__name="local", data__train_file=files["train"],
              data__validation_file=files["validation"], data__text_columns="text",
              data__label_column="label", **extra)


GOOD_ROWS = "text,label\n" + "".join(f"review number {i} is {w},{w}\n" for i, w in
                                     enumerate(["good", "bad"] * 8))


def test_misspelt_key_suggests_the_closest(tmp_path, tiny_model, capsys, no_compile):
  code, err = train(capsys, tmp_path / "run", tiny_model, "--config.train.batchsize=8")
  assert code == 2
  line = error_line(err)
  assert "unknown config key 'train.batchsize'" in line and "Did you mean 'batch_size'?" in line
  assert not (tmp_path / "run").exists()  # refused before the workdir was touched


def test_unknown_rng_impl_names_the_choices(tmp_path, tiny_model, capsys, no_compile):
  code, err = train(capsys, tmp_path / "run", tiny_model, "--config.train.rng_impl=philox")
  assert code == 2
  line = error_line(err)
  assert "train.rng_impl='philox'" in line and "threefry2x32, rbg, unsafe_rbg" in line


def test_keep_layers_that_are_not_indices_name_the_key(tmp_path, tiny_model, capsys, no_compile):
  code, err = train(capsys, tmp_path / "run", tiny_model, "--config.model.keep_layers=first")
  assert code == 2
  assert "model.keep_layers='first': expected comma-separated layer indices" in error_line(err)


def test_wrong_type_names_the_key_and_the_expected_type(tmp_path, tiny_model, capsys, no_compile):
  code, err = train(capsys, tmp_path / "run", tiny_model, "--config.train.num_steps=ten")
  assert code == 2
  assert "--config.train.num_steps='ten': expected an integer" in error_line(err)


@pytest.mark.parametrize("contents, extra, message", [
    ("sentence,label\nfine,good\n", {}, "no column 'text'; available columns: sentence, label. "
     "Fix: set data.text_columns / data.label_column"),
    ("text,label\nfine,3\nbad,0\n", {"data__num_labels": 2},
     "row 0 has label 3, outside 0..1 (data.num_labels=2). Fix: correct the label"),
    ("text,label\nfine,good\n ,bad\n", {}, "empty text in row 1: ' '. Fix: drop or fill that row"),
    ("text,label\ncaf\xe9,good\n".encode("cp1252"), {},
     "is not valid UTF-8 (byte 0xe9 at offset 14, line 2). It looks like cp1252. Fix: convert"),
    ("text,label\nfine,good,extra\n", {}, "data row 0 has 3 fields but the header has 2 (text, "
     "label). Fix: quote fields"),
], ids=["missing-column", "label-out-of-range", "empty-text", "not-utf8", "ragged-row"])
def test_bad_data_files(tmp_path, tiny_model, capsys, no_compile, contents, extra, message):
  code, err = train(capsys, tmp_path / "run", tiny_model, **local(tmp_path, contents, **extra))
  assert code == 2
  assert message in error_line(err)


def test_validation_label_outside_the_training_label_set(tmp_path, tiny_model, capsys,
                                                         no_compile):
  valid = "text,label\nfine,good\nso so,neutral\n"
  code, err = train(capsys, tmp_path / "run", tiny_model, **local(tmp_path, GOOD_ROWS, valid))
  assert code == 2
  line = error_line(err)
  assert "validation.csv, row 1: label 'neutral' is not in the label set ['bad', 'good']" in line


@pytest.mark.parametrize("extra, message", [
    ({"train__batch_size": 12}, "train.batch_size=12 does not divide over the 8 devices of the "
     "mesh (data=8 x fsdp=1); use a multiple of 8, e.g. 8"),
    ({"train__eval_batch_size": 4}, "train.eval_batch_size=4 does not divide over the 8 devices"),
    ({"mesh__fsdp": 3}, "mesh.fsdp=3 does not divide the 8 available devices"),
], ids=["train-batch", "eval-batch", "fsdp"])
def test_batch_that_does_not_divide_over_devices(tmp_path, tiny_model, capsys, no_compile, extra,
                                                 message):
  import jax
  assert jax.device_count() == 8  # tests/conftest.py: 8 virtual CPU devices
  code, err = train(capsys, tmp_path / "run", tiny_model, **extra)
  assert code == 2
  assert message in error_line(err)


def test_long_sequences_are_truncated_and_counted(tmp_path, tiny_model):
  from jaxft.data import pipeline
  from jaxft.data.readers import DataError
  from jaxft.train.setup import load_tokenizer
  long = " ".join(["wonderful"] * 40)
  rows = f"text,label\n{long},good\nshort,bad\n{long} again,bad\nfine,good\n"
  config = load_config(tiny_model, data__max_length=16, data__bucket_boundaries="16",
                       data__max_train_examples=0, data__max_eval_examples=0,
                       **local(tmp_path, rows))
  tok = load_tokenizer(str(tiny_model))
  bundle = pipeline.build(config.data, tok, batch_size=2, eval_batch_size=2, seed=0)
  assert bundle.stats["train/n_truncated"] == 2 and bundle.stats["train/max_length"] == 16
  assert "train: 2 of 4 examples truncated to 16 tokens" in bundle.notes
  assert bundle.encoded["train"].lengths.max() == 16
  # Over the tokenizer's (model's) maximum is refused, not silently clipped.
  config = load_config(tiny_model, data__max_length=1024, **local(tmp_path, rows))
  with pytest.raises(DataError, match=r"data.max_length=1024 exceeds the tokenizer's "
                     r"model_max_length 512. Fix: --config.data.max_length=512 or less"):
    pipeline.build(config.data, tok, batch_size=8, eval_batch_size=8, seed=0)


def test_workdir_of_another_experiment_is_refused_unless_overwrite(tmp_path, tiny_model, capsys,
                                                                   no_compile):
  workdir = tmp_path / "run"
  first = load_config(tiny_model)
  loop.prepare_workdir(workdir, first, overwrite=False)
  (workdir / "metrics.jsonl").write_text('{"kind": "info", "step": 0}\n')
  code, err = train(capsys, workdir, tiny_model, train__learning_rate=0.5)
  assert code == 2
  line = error_line(err)
  assert f"workdir {workdir} holds a different experiment (train.learning_rate: 0.0001 -> 0.5)" \
      in line and "pass --overwrite to move the old one aside" in line
  assert (workdir / "metrics.jsonl").exists()  # untouched

  # --overwrite moves it aside (twice within a second: two backups, nothing nested or lost).
  for lr in ("0.5", "0.25"):
    second = load_config(tiny_model, train__learning_rate=lr)
    assert loop.prepare_workdir(workdir, second, overwrite=True) is False
  backups = sorted(p for p in tmp_path.iterdir() if p.name.startswith("run.old-"))
  assert len(backups) == 2
  lrs = sorted(json.loads((b / "config.json").read_text())["train"]["learning_rate"]
               for b in backups)
  assert lrs == [0.0001, 0.5]
  assert sum((b / "metrics.jsonl").exists() for b in backups) == 1
  assert json.loads((workdir / "config.json").read_text())["train"]["learning_rate"] == 0.25
  assert [p.name for p in workdir.iterdir()] == ["config.json"]
  # The same experiment again resumes (no refusal, nothing moved).
  assert loop.prepare_workdir(workdir, second, overwrite=False) is True


def test_an_internal_bug_keeps_its_traceback(tmp_path, tiny_model, capsys, monkeypatch):
  """A TypeError / AttributeError from inside jaxft is a bug, not bad input: it propagates with its
  traceback instead of becoming a one-line "error:" message."""
  def broken(*args, **kwargs):
    raise TypeError("unsupported operand type(s) for +: 'int' and 'NoneType'")

  monkeypatch.setattr(loop, "build_setup", broken)
  with pytest.raises(TypeError, match="unsupported operand"):
    train(capsys, tmp_path / "run", tiny_model)
  assert "jaxft train: error:" not in capsys.readouterr().err


def test_debug_shows_the_traceback_of_bad_input(tmp_path, tiny_model, capsys, no_compile):
  with pytest.raises(ValueError, match="rng_impl"):
    train(capsys, tmp_path / "run", tiny_model, "--debug", "--config.train.rng_impl=philox")


@pytest.mark.parametrize("name", ["{tmp}/no-such-model", "./no-such-model", "../no-such-model",
                                  "tests/no-such-model"], ids=["absolute", "dot", "dotdot",
                                                               "under-a-local-dir"])
def test_missing_model_directory_is_not_tried_on_the_hub(tmp_path, tiny_model, capsys,
                                                         no_compile, name):
  import time
  t0 = time.time()
  code, err = train(capsys, tmp_path / "run", tiny_model, model__name=name.format(tmp=tmp_path))
  assert code == 2
  line = error_line(err)
  assert "no such model directory" in line and "Fix: point model.name at a Hugging Face" in line
  assert time.time() - t0 < 20  # no hub retries (about 50 s of them before)
  assert not (tmp_path / "run").exists()


def test_what_looks_like_a_path_and_what_stays_a_hub_id():
  from jaxft.assets import looks_like_path
  assert not any(map(looks_like_path, ["org/name", "bert-base-uncased", "minilm-l6"]))
  assert all(map(looks_like_path, ["/abs/model", "./m", "../m", "~/m", "a/b/c", "m/", "tests/m"]))


@pytest.mark.parametrize("contents, message", [
    ("text,label\n", "train.csv holds no examples: a header (text, label) but no data rows"),
    ("", "train.csv is empty; expected a header row"),
], ids=["header-only", "empty"])
def test_train_file_without_rows_is_named(tmp_path, tiny_model, capsys, no_compile, contents,
                                          message):
  files = local(tmp_path, GOOD_ROWS)
  (tmp_path / "train.csv").write_text(contents)
  code, err = train(capsys, tmp_path / "run", tiny_model, **files)
  assert code == 2
  line = error_line(err)
  assert message in line and "validation.csv" not in line
