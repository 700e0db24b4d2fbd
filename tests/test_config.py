import json

import pytest

from evo_jax import cli
from evo_jax import config
from evo_jax import errors


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
  # A field whose default changed since: the run predating it ran with the earlier one.
  del saved["model"]["posterior_logits"]
  current = config.default_config()
  assert current.model.posterior_logits
  assert config.mismatch(saved, current) == ("model.posterior_logits", False, True)
  assert not config.from_saved(saved).model.posterior_logits


def test_a_saved_run_config_loads_whole():
  """run.load_run reads config.json through from_saved: a field the run predates takes its
  default, tuples come back as tuples, and every other value is the saved one."""
  saved = config.default_config().to_dict()
  saved["model"]["d_model"] = 256
  del saved["model"]["remat"]
  saved = json.loads(json.dumps(saved))                    # as config.json stores it
  cfg = config.from_saved(saved)
  assert cfg.model.d_model == 256 and cfg.model.remat == "none"
  assert cfg.progression.window_sizes == (1, 4, 16, -1)
  assert cfg.sharding.rules.batch == ("data", "fsdp")
  assert config.mismatch(saved, cfg) is None


def test_booleans_read_the_same_in_config_overrides_and_policy_settings():
  cfg = config.default_config()
  for text, value in (("yes", True), ("0", False), ("True", True), ("no", False)):
    cli.apply_override(cfg, "model.qk_norm", text)
    assert cfg.model.qk_norm is value
    assert cli.parse_policy("evo", [f"--policy.use_time_head={text}"]).use_time_head is value
  with pytest.raises(errors.ConfigError, match="--config.model.qk_norm: expected true or false"):
    cli.apply_override(cfg, "model.qk_norm", "maybe")
  with pytest.raises(errors.ConfigError, match="--policy.use_time_head: expected true or false"):
    cli.parse_policy("evo", ["--policy.use_time_head=maybe"])
