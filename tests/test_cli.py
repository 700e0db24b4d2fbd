"""Bad input to `python -m evo_jax.train`: one line on stderr naming the problem, exit status 2,
and nothing already written is lost."""
import subprocess
import sys

import pytest

from conftest import REPO


def train_cli(workdir, *overrides):
  cmd = [sys.executable, "-m", "evo_jax.train", "--config", str(REPO / "configs/tiny.py"),
         "--workdir", str(workdir), *overrides]
  return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)


def assert_one_line_error(result, *fragments):
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith("error: ")
  for fragment in fragments:
    assert fragment in lines[0], lines[0]


def test_missing_corpus(tmp_path):
  missing = tmp_path / "nowhere" / "*.txt"
  assert_one_line_error(train_cli(tmp_path / "w", f"--config.data.corpus={missing}"),
                        "corpus path not found", str(missing))


def test_empty_corpus(tmp_path):
  (tmp_path / "empty.txt").write_text("")
  assert_one_line_error(train_cli(tmp_path / "w", f"--config.data.corpus={tmp_path}/empty.txt"),
                        "corpus is empty")


def test_invalid_utf8(tmp_path):
  bad = tmp_path / "bad.txt"
  bad.write_bytes(b"fine text\n\xff\xfe broken")
  assert_one_line_error(train_cli(tmp_path / "w", f"--config.data.corpus={bad}"),
                        "invalid UTF-8", str(bad), "byte 10")


def test_unknown_config_key(tmp_path):
  assert_one_line_error(train_cli(tmp_path / "w", "--config.train.stepz=3"),
                        "unknown config key: train.stepz")


def test_workdir_of_another_config_is_refused_and_kept(tmp_path):
  from evo_jax import checkpoint, config
  other = config.default_config()
  other.model.d_model = 256
  workdir = tmp_path / "w"
  workdir.mkdir()
  checkpoint.write_config(str(workdir), other.to_dict())
  (workdir / "metrics.jsonl").write_text('{"step": 1}\n')
  before = {p.name: p.read_bytes() for p in workdir.iterdir()}
  assert_one_line_error(train_cli(workdir), "model.d_model", "256", "128", str(workdir))
  assert {p.name: p.read_bytes() for p in workdir.iterdir()} == before


@pytest.mark.parametrize("override,fragment", [
    ("--config.train.steps=many", "cannot parse"),
    ("--config.model.time_cond=film", "model.time_cond"),
    ("--config.data.batch_size=7", "data.batch_size=7"),
    ("--config.mesh.data=3", "needs 3 devices, there are 8"),
    ("--config.model.attention=flash", "model.attention"),
    ("--config.model.attention=chunked --config.model.attention_chunk=100",
     "model.attention_chunk=100 does not divide the attention length 256"),
])
def test_bad_values(tmp_path, override, fragment, stdlib_tokenizer):
  result = train_cli(tmp_path / "w", *override.split(), f"--config.data.tokenizer={stdlib_tokenizer}",
                     "--config.model.vocab_size=512")
  assert_one_line_error(result, fragment)


def test_unreachable_coordinator_times_out(tmp_path):
  import socket
  with socket.socket() as s:   # a port nobody listens on
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  result = train_cli(tmp_path / "w", f"--coordinator_address=localhost:{port}",
                     "--num_processes=2", "--process_id=1", "--distributed_timeout=2")
  assert_one_line_error(result, f"could not reach the coordinator localhost:{port} within 2 s")
  assert not (tmp_path / "w").exists()


def test_incomplete_distributed_flags(tmp_path):
  assert_one_line_error(train_cli(tmp_path / "w", "--coordinator_address=localhost:1234"),
                        "give all three or none")
