import pytest

from jaxft import config as config_lib


def test_override_types_and_lock(tmp_path):
  c = config_lib.load("experiments/quickstart.py",
                      [("train.batch_size", "16"), ("train.learning_rate", "3e-4"),
                       ("model.remat", "true"), ("data.text_columns", "a,b")])
  assert c.train.batch_size == 16 and isinstance(c.train.batch_size, int)
  assert c.train.learning_rate == pytest.approx(3e-4)
  assert c.model.remat is True
  assert c.data.text_columns == "a,b"
  assert c.experiment == "experiments/quickstart.py"
  with pytest.raises(AttributeError):
    c.train.new_key = 1  # locked: no new keys after load


def test_typo_suggests_closest_key():
  with pytest.raises(KeyError, match=r"Did you mean 'batch_size'"):
    config_lib.load("experiments/quickstart.py", [("train.batchsize", "16")])
  with pytest.raises(KeyError, match=r"Did you mean 'train'"):
    config_lib.load("experiments/quickstart.py", [("trian.batch_size", "16")])


def test_wrong_type_is_refused():
  with pytest.raises(ValueError, match="expected an integer"):
    config_lib.load("experiments/quickstart.py", [("train.batch_size", "sixteen")])
  with pytest.raises(ValueError, match="expected a boolean"):
    config_lib.load("experiments/quickstart.py", [("model.remat", "maybe")])


def test_group_is_not_a_value():
  with pytest.raises(KeyError, match="names a group"):
    config_lib.load("experiments/quickstart.py", [("train", "1")])


def test_parse_overrides_forms():
  assert config_lib.parse_overrides(["--config.a.b=1", "--config.c", "2"]) == [("a.b", "1"),
                                                                             ("c", "2")]
  with pytest.raises(ValueError, match="overrides look like"):
    config_lib.parse_overrides(["--batch_size=3"])


def test_json_round_trip():
  c = config_lib.load("experiments/glue_small.py:rte", [("seed", "3")])
  back = config_lib.from_json(config_lib.to_json(c))
  assert back.to_dict() == c.to_dict()


def test_experiment_arg_is_checked():
  with pytest.raises(ValueError, match="unknown task 'sst3'"):
    config_lib.load("experiments/glue_small.py:sst3")
  with pytest.raises(FileNotFoundError, match="experiments live in"):
    config_lib.load("experiments/nope.py")


@pytest.mark.parametrize("spec", [
    "experiments/quickstart.py", "experiments/adversarial_glue.py:mr,fgm",
    "experiments/peft_table.py:lora:mr", "experiments/prune_movement.py:movement,0.9,mr",
    "experiments/distill_mpnet_minilm.py:mr,half", "experiments/distill_mpnet_minilm.py:mr,half_alone"])
def test_cpu_sized_rows_use_the_quickstart_data(spec):
  """The "mr" rows of the GLUE-sized experiments (their "cpu" grids) share the quickstart's
  data and schedule, so their numbers sit beside its dense baseline."""
  c = config_lib.load(spec)
  assert (c.data.name, c.data.max_length, c.train.batch_size, c.train.num_epochs) == ("mr", 64, 32, 1.0)
  assert c.data.data_dir == "" and c.train.num_steps == 0
  if spec.endswith("half_alone"):
    assert c.distill.alpha == 1.0 and c.distill.student_layers == "0,2,4"
