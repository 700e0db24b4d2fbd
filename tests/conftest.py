import os
import pathlib

import pytest

# Simulated devices for the multi-device tests; must be set before JAX is imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# The CPU backend only, also where libtpu is installed (for evo_jax.aot): otherwise JAX probes
# for a TPU at start-up and writes warnings to stderr.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture
def small_cfg():
  """The default config shrunk to a model that compiles and steps in well under a second."""
  from evo_jax import config
  cfg = config.default_config()
  cfg.model.update(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                   time_dim=32, fourier_dim=16, time_rank=8)
  return cfg


@pytest.fixture(scope="session")
def stdlib_tokenizer(tmp_path_factory):
  """A small SentencePiece model on the default corpus, trained once for the whole session."""
  from evo_jax import data
  path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
  data.train_tokenizer(str(path), "", 512, 0.05, max_training_chars=1_000_000)
  return str(path)


@pytest.fixture
def run_cfg(small_cfg, stdlib_tokenizer):
  """A small but complete run on the standard library: trains in seconds."""
  cfg = small_cfg
  cfg.model.vocab_size = 512
  cfg.data.update(tokenizer=stdlib_tokenizer, seq_len=32, batch_size=8)
  cfg.optim.update(warmup_steps=2, lr=3e-3)
  cfg.train.update(steps=6, log_every=2, eval_every=6, ckpt_every=3, eval_batches=2,
                   samples=0)
  return cfg



def train_tiny_run(path, tokenizer, seq_len):
  """Trains a 4-step run of a small model with a seq_len-token context into path."""
  from evo_jax import config, train
  cfg = config.default_config()
  cfg.model.update(vocab_size=512, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                   time_dim=32, fourier_dim=16)
  cfg.data.update(tokenizer=tokenizer, seq_len=seq_len, batch_size=8)
  cfg.optim.update(warmup_steps=2, lr=3e-3)
  cfg.train.update(steps=4, log_every=4, eval_every=4, ckpt_every=4, eval_batches=1, samples=0)
  cfg.bound.windows = (1,)
  train.check_workdir_config(cfg, path)
  train.Trainer(cfg, path).run(log=lambda *_: None)
  return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, stdlib_tokenizer):
  """The small run with a 64-token context that the evaluation tests share."""
  return train_tiny_run(str(tmp_path_factory.mktemp("tiny_run")), stdlib_tokenizer, 64)
