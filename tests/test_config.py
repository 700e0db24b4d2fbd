from evo_jax import config


def test_mismatch_names_the_field_and_ignores_resumable_ones():
  saved = config.default_config().to_dict()
  current = config.default_config()
  assert config.mismatch(saved, current) is None
  current.train.steps = 10_000           # extending a run is allowed
  assert config.mismatch(saved, current) is None
  current.model.d_model = 256
  assert config.mismatch(saved, current) == ("model.d_model", 128, 256)


def test_a_field_added_since_the_run_counts_as_its_default():
  saved = config.default_config().to_dict()
  del saved["model"]["remat"]
  current = config.default_config()
  assert config.mismatch(saved, current) is None
  current.model.remat = "full"
  assert config.mismatch(saved, current) == ("model.remat", "none", "full")
