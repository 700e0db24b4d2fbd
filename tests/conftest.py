"""What the tests share: the simulated devices, one small model's settings, the expensive
set-ups built once per test run (a tokenizer, a trained tiny run), and a way to run a command's
`main(argv)` in-process and read its one-line error."""
import os
import pathlib
import shutil
import tempfile

import pytest

# Simulated devices for the multi-device tests; must be set before JAX is imported. And LLVM's
# optimisation level 0: the suite is mostly XLA compiling small programs, which this makes
# about a third faster; the programs run about 2x slower, so a test that runs one many times
# compiles it at XLA's default level (`OPTIMISED`). Inherited by the subprocesses.
FAST_COMPILE = "--xla_backend_optimization_level=0"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}")
# The CPU backend only, also where libtpu is installed (for evo_jax.aot): otherwise JAX probes
# for a TPU at start-up and writes warnings to stderr. (test_cli checks that the commands are
# quiet without this too.)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tests compile the same small programs many times (every Trainer, every subprocess): one
# compilation cache for the whole run, inherited by the workers and subprocesses, new for each
# run and removed at its end by the process that made it.
OWN_COMPILATION_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  OWN_COMPILATION_CACHE = tempfile.mkdtemp(prefix="evo_jax_tests_xla_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = OWN_COMPILATION_CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# A model that compiles and steps in well under a second.
SMALL_MODEL = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                   time_dim=32, fourier_dim=16, time_rank=8)


# `jax.jit(f, compiler_options=OPTIMISED)`: XLA's default optimisation level (3), not the
# suite's 0, for a program a test runs many times.
OPTIMISED = {"xla_backend_optimization_level": 3}


def one_device():
  """For runs whose test is not about meshes: a step on 8 simulated devices costs about 1.5x
  the step on one (compiling, stepping and checkpointing)."""
  import jax
  return jax.devices()[:1]


def small_config(**model_changes):
  """The default config with SMALL_MODEL (and any model field changed)."""
  from evo_jax import config
  cfg = config.default_config()
  cfg.model.update({**SMALL_MODEL, **model_changes})
  return cfg


def small_model(**model_changes):
  from evo_jax import model as model_lib
  return model_lib.EvoTransformer(model_lib.from_config(small_config(**model_changes).model))


def small_run_config(tokenizer, seq_len=32, steps=6):
  """A small but complete run on the standard library: trains in seconds."""
  cfg = small_config(vocab_size=512)
  cfg.data.update(tokenizer=tokenizer, seq_len=seq_len, batch_size=8)
  cfg.optim.update(warmup_steps=2, lr=3e-3)
  cfg.train.update(steps=steps, log_every=2, eval_every=steps, ckpt_every=3, eval_batches=2,
                   samples=0)
  cfg.bound.windows = (1,)      # one bound, not two: a smaller measurement to compile
  return cfg


def one_line_error(capsys, main, argv, *fragments):
  """Runs main(argv) in-process; asserts exit status 2 with one `error: ` line on stderr that
  contains every fragment, and returns that line."""
  with pytest.raises(SystemExit) as exit_info:
    main(argv)
  err = capsys.readouterr().err
  assert exit_info.value.code == 2, err[-2000:]
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
  for fragment in fragments:
    assert fragment in lines[0], lines[0]
  return lines[0]


def as_bucket(monkeypatch, root):
  """Files under `root` are handled as on a bucket (evo_jax/paths.py): no appends, no
  temporary files renamed, no exclusive creation; they stay on the local disk."""
  from evo_jax import paths
  local = paths.is_remote
  monkeypatch.setattr(paths, "is_remote", lambda p: local(p) or os.fspath(p).startswith(
      str(root)))


@pytest.fixture
def small_cfg():
  return small_config()


@pytest.fixture(scope="session")
def model_params():
  """(the small model, random parameters) made sharper than at init, so that confidence spans
  (0, 1), and with the time conditioning moved off zero, so that t and the latents matter."""
  import jax
  from evo_jax import state as state_lib
  model = small_model()

  @jax.jit
  def init(rng):
    params = state_lib.init_params(model, rng)
    return jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.key(9), p.shape), params)

  return model, init(jax.random.key(1))


@pytest.fixture(scope="session")
def stdlib_tokenizer(tmp_path_factory):
  """A small SentencePiece model on the default corpus, trained once for the whole session."""
  from evo_jax import data
  path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
  data.train_tokenizer(str(path), "", 512, 0.05, max_training_chars=1_000_000)
  return str(path)


@pytest.fixture
def run_cfg(stdlib_tokenizer):
  return small_run_config(stdlib_tokenizer)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, stdlib_tokenizer):
  """A trained 4-step run of the small model with a 64-token context, trained once and shared
  by the decoding, evaluation and harness tests (which only read it)."""
  from evo_jax import train
  path = str(tmp_path_factory.mktemp("tiny_run"))
  cfg = small_run_config(stdlib_tokenizer, seq_len=64, steps=4)
  cfg.train.update(log_every=4, ckpt_every=4, eval_batches=1)
  train.Trainer(cfg, path, devices=one_device()).run(log=lambda *_: None)
  return path


def pytest_unconfigure(config):
  if OWN_COMPILATION_CACHE:
    shutil.rmtree(OWN_COMPILATION_CACHE, ignore_errors=True)
