"""Bad input to `python -m evo_jax.train`: one line on stderr naming the problem, exit status 2,
and nothing already written is lost. The errors are checked in-process through `main(argv)`;
one real `python -m evo_jax.train` run checks the command line as a user meets it: it trains,
saves, decodes, and its start-up is quiet even with libtpu installed and no TPU."""
import os
import socket
import subprocess
import sys

import pytest

import conftest
from conftest import REPO
from evo_jax import checkpoint
from evo_jax import config
from evo_jax import train


def train_cli(capsys, workdir, *overrides, expect=()):
  """The one-line error of `python -m evo_jax.train` with these overrides, which contains
  every fragment of `expect`."""
  return conftest.one_line_error(capsys, train.main, [
      "--config", str(REPO / "configs/tiny.py"), "--workdir", str(workdir), *overrides], *expect)


def test_command_one_trains_decodes_and_starts_quietly(tmp_path, stdlib_tokenizer):
  """command 1's module in a subprocess, as a user runs it (no JAX_PLATFORMS, libtpu
  installed by the test extras, no TPU): it trains, saves, prints the report with a sample,
  and nothing on stderr mentions the TPU."""
  import importlib.util
  assert importlib.util.find_spec("libtpu") is not None, "the test extras install libtpu"
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  env["XLA_FLAGS"] = conftest.FAST_COMPILE    # one CPU device, as on a user's machine
  overrides = [f"--config.model.{k}={v}" for k, v in conftest.SMALL_MODEL.items()
               if k != "vocab_size"] + [
      "--config.model.vocab_size=512", f"--config.data.tokenizer={stdlib_tokenizer}",
      "--config.data.seq_len=32", "--config.data.batch_size=4", "--config.train.steps=2",
      "--config.train.log_every=2", "--config.train.eval_every=2", "--config.train.ckpt_every=2",
      "--config.train.eval_batches=1", "--config.train.samples=1",
      "--config.train.sample_tokens=4"]
  result = subprocess.run(
      [sys.executable, "-m", "evo_jax.train", "--config", str(REPO / "configs/tiny.py"),
       "--workdir", str(tmp_path / "w"), *overrides],
      capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "checkpoint at step 2" in result.stdout and "-- sample 1" in result.stdout
  assert (tmp_path / "w" / "checkpoints" / "2").is_dir()
  for word in ("TPU", "libtpu", "tpu"):
    assert word not in result.stderr, result.stderr[-3000:]


def test_missing_corpus(tmp_path, capsys):
  missing = tmp_path / "nowhere" / "*.txt"
  train_cli(capsys, tmp_path / "w", f"--config.data.corpus={missing}",
            expect=("corpus path not found", str(missing)))


def test_empty_corpus(tmp_path, capsys):
  (tmp_path / "empty.txt").write_text("")
  train_cli(capsys, tmp_path / "w", f"--config.data.corpus={tmp_path}/empty.txt",
            expect=("corpus is empty",))


def test_invalid_utf8(tmp_path, capsys):
  bad = tmp_path / "bad.txt"
  bad.write_bytes(b"fine text\n\xff\xfe broken")
  train_cli(capsys, tmp_path / "w", f"--config.data.corpus={bad}",
            expect=("invalid UTF-8", str(bad), "byte 10"))


def test_unknown_config_key(tmp_path, capsys):
  train_cli(capsys, tmp_path / "w", "--config.train.stepz=3",
            expect=("unknown config key: train.stepz",))
  train_cli(capsys, tmp_path / "w", "--config.train.on_nonfinite=ignore",
            expect=("train.on_nonfinite must be one of ('stop', 'skip'), got 'ignore'",))
  train_cli(capsys, tmp_path / "w", "--config.model.self_conditioning=previous",
            expect=("model.self_conditioning must be one of ('none', 'e_hat')",))
  train_cli(capsys, tmp_path / "w", "--config.model.latent_dim=512",
            expect=("model.latent_dim=512 must be 0 (off) or at most model.d_model=128",))
  train_cli(capsys, tmp_path / "w", "--config.loss.self_cond_prob=1.5",
            expect=("loss.self_cond_prob must be in [0, 1], got 1.5",))
  assert not (tmp_path / "w" / "config.json").exists()


def test_workdir_of_another_config_is_refused_and_kept(tmp_path, capsys):
  other = config.default_config()
  other.model.d_model = 256
  workdir = tmp_path / "w"
  workdir.mkdir()
  checkpoint.write_config(str(workdir), other.to_dict())
  (workdir / "metrics.jsonl").write_text('{"step": 1}\n')
  before = {p.name: p.read_bytes() for p in workdir.iterdir()}
  train_cli(capsys, workdir, expect=("model.d_model", "256", "128", str(workdir)))
  assert {p.name: p.read_bytes() for p in workdir.iterdir()} == before


@pytest.mark.parametrize("override,fragment", [
    ("--config.train.steps=many", "cannot parse"),
    ("--config.model.time_cond=film", "model.time_cond"),
    ("--config.data.batch_size=7", "data.batch_size=7"),
    ("--config.mesh.data=3", "needs 3 devices, there are 8"),
    ("--config.model.attention=flash", "model.attention"),
    ("--config.model.attention=chunked --config.model.attention_chunk=100",
     "model.attention_chunk=100 does not divide the attention length 256"),
    ("--config.model.attention=block_sparse --config.model.attention_chunk=48",
     "model.attention_chunk=48 does not divide data.seq_len 128"),
    ("--config.progression.t_base=logit_norml", "progression.t_base"),
    ("--config.progression.window_probs=(0.5,0.5)", "progression.window_probs must be 4 weights"),
    ("--config.loss.weighting=mse", "loss.weighting"),
    ("--config.schedule.kind=sigmoid", "schedule.kind"),
    ("--config.model.remat=yes", "model.remat"),
])
def test_bad_values(tmp_path, capsys, override, fragment, stdlib_tokenizer):
  train_cli(capsys, tmp_path / "w", *override.split(),
            f"--config.data.tokenizer={stdlib_tokenizer}", "--config.model.vocab_size=512",
            expect=(fragment,))
  assert not (tmp_path / "w" / "config.json").exists()   # nothing recorded for a bad command


def test_unreachable_coordinator_times_out(tmp_path, capsys):
  with socket.socket() as s:   # a port nobody listens on
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  train_cli(capsys, tmp_path / "w", f"--coordinator_address=localhost:{port}",
            "--num_processes=2", "--process_id=1", "--distributed_timeout=2",
            expect=(f"could not reach the coordinator localhost:{port} within 2 s",))
  assert not (tmp_path / "w").exists()


def test_incomplete_distributed_flags(tmp_path, capsys):
  train_cli(capsys, tmp_path / "w", "--coordinator_address=localhost:1234",
            expect=("give all three or none",))
