"""The files that flags name (evo_jax/files.py): one line for each bad case, nothing left
behind."""
import pytest

from conftest import as_bucket
from evo_jax import files
from evo_jax import paths
from evo_jax.errors import UserError


def one_line(fn, *fragments):
  with pytest.raises(UserError) as e:
    fn()
  message = str(e.value)
  assert "\n" not in message and all(f in message for f in fragments), message


def test_read_text(tmp_path):
  good = tmp_path / "good.txt"
  good.write_text("caf\u00e9\nline two\n", encoding="utf-8")
  assert files.read_text(str(good)) == "caf\u00e9\nline two\n"
  bad = tmp_path / "bad.txt"
  bad.write_bytes(b"fine\nalso fine\ncaf\xe9\n")
  one_line(lambda: files.read_text(str(bad), "prompts file"),
           f"prompts file {bad} is not valid UTF-8 (line 3, byte 18)")
  one_line(lambda: files.read_text(str(tmp_path), "task file"), "is a directory, not a file")
  one_line(lambda: files.read_text(str(tmp_path / "none"), "task file"), "task file not found")


def test_write_text_whole_or_not_at_all(tmp_path):
  out = tmp_path / "sub" / "out.json"
  files.write_text(str(out), "{}")
  assert out.read_text() == "{}"
  files.write_text(str(out), "[1]")                       # replaces the old file whole
  assert out.read_text() == "[1]"
  one_line(lambda: files.write_text(str(tmp_path), "x", "--output"),
           "--output", "is a directory: give a file name")
  blocker = tmp_path / "a_file"
  blocker.write_text("not a folder")
  one_line(lambda: files.write_text(str(blocker / "out.json"), "x", "--output"),
           "cannot write --output", "a_file/out.json")
  assert sorted(p.name for p in tmp_path.rglob("*")) == ["a_file", "out.json", "sub"]


@pytest.mark.parametrize("where", ["disk", "bucket"])
def test_workdir_files_on_a_disk_and_on_a_bucket(tmp_path, monkeypatch, where):
  """What a workdir's writers need (evo_jax/paths.py), with a disk's means and a bucket's."""
  if where == "bucket":
    as_bucket(monkeypatch, tmp_path)
  assert paths.is_remote(tmp_path / "x") == (where == "bucket")
  assert not paths.is_remote("runs/tiny") and paths.is_remote("gs://bucket/runs/tiny")
  assert str(paths.path("gs://bucket/runs/tiny")) == "gs://bucket/runs/tiny"
  out = tmp_path / "sub" / "state.json"
  paths.write_text(out, "one")
  paths.write_text(out, "two")
  assert out.read_text() == "two"
  log = paths.LineLog(tmp_path / "logs" / "metrics.jsonl")
  log.append("1")
  log.append("2")
  log.close()
  log = paths.LineLog(tmp_path / "logs" / "metrics.jsonl")   # a resumed run's: keeps the lines
  log.append("3")
  log.close()
  assert (tmp_path / "logs" / "metrics.jsonl").read_text() == "1\n2\n3\n"
  assert paths.create_exclusive(tmp_path / "lock", "me")
  assert not paths.create_exclusive(tmp_path / "lock", "another")
  assert (tmp_path / "lock").read_text() == "me"
  assert sorted(p.name for p in tmp_path.rglob("*")) == [
      "lock", "logs", "metrics.jsonl", "state.json", "sub"]     # no temporary file left
