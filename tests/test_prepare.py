"""python -m evo_jax.prepare: every input kind decodes back to exactly its documents, split as
raw corpora split; a prepare killed mid-way and rerun gives byte-identical shards; bad input is
one line naming the file, and nothing prepared is lost."""
import json
import os
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest

from conftest import REPO, SHARED, one_line_error
from evo_jax import bench, data, prepare, prepared
from evo_jax.errors import UserError

GSM8K = SHARED / "data" / "gsm8k" / "test.jsonl"
STDLIB = os.path.dirname(os.__file__)


def gsm8k(n, field):
  lines = GSM8K.read_text().splitlines()[:n]
  return [json.loads(line)[field] for line in lines]


def args(inputs, tokenizer, out, **changes):
  argv = ["--input", inputs, "--tokenizer", tokenizer, "--out", str(out)]
  argv += [f"--{k}={v}" for k, v in changes.items()]
  return prepare.parse_args(argv)


def decoded(meta, split, tokenizer):
  texts = []
  for shard in meta["splits"][split]["shards"]:
    from array_record.python import array_record_module
    reader = array_record_module.ArrayRecordReader(os.path.join(meta["path"], shard["file"]))
    records = reader.read(list(range(reader.num_records()))) if reader.num_records() else []
    texts += [tokenizer.decode(np.frombuffer(r, prepared.TOKEN_DTYPE)) for r in records]
  return texts


def test_every_input_kind_decodes_back_to_its_documents(tmp_path, stdlib_tokenizer):
  import datasets
  import pyarrow as pa
  import pyarrow.parquet as pq
  raw = tmp_path / "raw"
  raw.mkdir()
  (raw / "a.txt").write_text("def f():\n\treturn 'caf\u00e9 \u2581'\n")
  (raw / "b.txt").write_text("")                       # empty: not a document
  questions, answers = gsm8k(40, "question"), gsm8k(40, "answer")
  with open(raw / "q.jsonl", "w") as f:
    for q in questions[:20]:
      f.write(json.dumps({"text": q}) + "\n")
  table = pa.table({"text": answers[:20] + [None], "n": list(range(21))})
  pq.write_table(table, raw / "answers.parquet", row_group_size=6)   # several row groups
  saved = tmp_path / "saved"
  datasets.Dataset.from_dict({"text": questions[20:]}).save_to_disk(str(saved), num_shards=2)

  inputs = f"{raw}/*.txt,{raw / 'q.jsonl'},{raw / 'answers.parquet'},{saved}"
  meta = prepare.prepare(args(inputs, stdlib_tokenizer, tmp_path / "out", shards=3, workers=2,
                              heldout_fraction=0.3), log=lambda _: None)

  # What the inputs hold, keyed as raw corpora key their documents ("path:line").
  documents = [(f"{raw / 'a.txt'}:0", (raw / "a.txt").read_text())]
  documents += [(f"{raw / 'q.jsonl'}:{i + 1}", q) for i, q in enumerate(questions[:20])]
  documents += [(f"{raw / 'answers.parquet'}:{i + 1}", a) for i, a in enumerate(answers[:20])]
  arrow = sorted(str(p) for p in saved.glob("*.arrow"))
  documents += [(f"{arrow[i // 10]}:{i % 10 + 1}", q) for i, q in enumerate(questions[20:])]
  tokenizer = data.load_tokenizer(stdlib_tokenizer)
  for split in prepared.SPLITS:
    want = [text for key, text in documents
            if (data.hash_fraction(key) < 0.3) == (split == "heldout")]
    assert decoded(meta, split, tokenizer) == want
    assert meta["splits"][split]["documents"] == len(want) > 0
  # What bench decode and evaluate read of a prepared corpus's held-out split.
  heldout = list(data.heldout_ids(meta["path"], 0.3, "text", tokenizer))
  assert [tokenizer.decode(ids) for _, ids in heldout] == want
  assert heldout[0][0] == f"{meta['path']}:heldout:0"
  # The raw corpus reader splits the same files the same way.
  heldout = data.corpus_documents(f"{raw / 'q.jsonl'}", "heldout", 0.3)
  assert [data.read_document(r) for r in heldout] == [
      t for k, t in documents[1:21] if data.hash_fraction(k) < 0.3]
  assert meta["tokenizer_sha256"] == data.file_sha256(stdlib_tokenizer)
  assert data.file_sha256(prepared.tokenizer_file(meta)) == meta["tokenizer_sha256"]


def test_killed_prepare_resumes_to_identical_shards(tmp_path, stdlib_tokenizer):
  """SIGKILL to the prepare and its worker once the first shard is complete; the rerun redoes
  only the missing shards, and every file equals that of a prepare never interrupted."""
  inputs = f"{STDLIB}/[a-h]*.py"
  out = tmp_path / "killed"
  cmd = [sys.executable, "-m", "evo_jax.prepare", "--input", inputs, "--tokenizer",
         stdlib_tokenizer, "--out", str(out), "--shards", "16", "--workers", "1"]
  proc = subprocess.Popen(cmd, env=dict(os.environ, PYTHONPATH=str(REPO)),
                          stderr=subprocess.PIPE, start_new_session=True)
  deadline = time.monotonic() + 300
  while not list(out.glob("*.array_record")) and time.monotonic() < deadline:
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    time.sleep(0.01)
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  complete = sorted(p.name for p in out.glob("*.array_record"))
  assert complete and len(complete) < 32 and not (out / prepared.METADATA).exists()

  log = []
  prepare.prepare(args(inputs, stdlib_tokenizer, out, shards=16, workers=1), log=log.append)
  assert any(f"{len(complete)} of 32 shards were complete" in line for line in log), log
  clean = tmp_path / "clean"
  prepare.prepare(args(inputs, stdlib_tokenizer, clean, shards=16, workers=1), log=log.append)
  names = sorted(p.name for p in clean.iterdir())
  assert sorted(p.name for p in out.iterdir()) == names
  for name in names:
    assert (out / name).read_bytes() == (clean / name).read_bytes(), name


def test_bad_input_is_one_line_and_loses_nothing(tmp_path, capsys, stdlib_tokenizer):
  import pyarrow as pa
  import pyarrow.parquet as pq
  good = tmp_path / "good.jsonl"
  good.write_text("".join(json.dumps({"text": q}) + "\n" for q in gsm8k(30, "question")))
  out = tmp_path / "out"
  base = ["--tokenizer", stdlib_tokenizer, "--workers", "1", "--shards", "2"]
  prepare.main(["--input", str(good), "--out", str(out)] + base)
  capsys.readouterr()
  files = {p.name: p.read_bytes() for p in out.iterdir()}
  bench.main(["data", "--corpus", str(out), "--workers", "0", "--seconds", "0.2", "--json",
              str(tmp_path / "data.json")])
  figures = json.loads((tmp_path / "data.json").read_text())
  assert figures["hosts"] == 16 and figures["rows_per_host"] == 1024 // 16
  (result,) = figures["results"]
  assert result["rows_per_s"] > 0 and result["times_consumption"] == pytest.approx(
      result["tokens_per_s"] / figures["consumed_tokens_per_s"])

  pq.write_table(pa.table({"body": ["x"]}), tmp_path / "t.parquet")
  bad_utf8 = tmp_path / "bad.txt"
  bad_utf8.write_bytes(b"ok \xff\xfe")
  for inputs, fragments in [
      (str(tmp_path / "t.parquet"), [str(tmp_path / "t.parquet"), "no column 'text'"]),
      (f"{good},{bad_utf8}", [str(bad_utf8), "invalid UTF-8"]),
      (str(tmp_path / "missing*.jsonl"), ["input not found", "missing"]),
      (str(tmp_path), ["not a saved `datasets` dataset"])]:
    one_line_error(capsys, prepare.main, ["--input", inputs, "--out", str(tmp_path / "new")]
                   + base, *fragments)
  # The finished directory, asked to prepare something else, refuses and keeps its files.
  one_line_error(capsys, prepare.main, ["--input", f"{good},{bad_utf8}", "--out", str(out)]
                 + base, str(bad_utf8))
  one_line_error(capsys, prepare.main, ["--input", str(good), "--out", str(out), "--shards",
                                        "3"] + base[:4], str(out), "other shards")
  assert {p.name: p.read_bytes() for p in out.iterdir()} == files

  tokenizer = data.load_tokenizer(stdlib_tokenizer)
  make = lambda corpus, tok=tokenizer, **kw: data.make_dataset(
      corpus, "train", tok, 32, 4, seed=0, heldout_fraction=0.05, **kw)
  make(str(out))
  other = types.SimpleNamespace(path=str(good), bos_id=2, eos_id=3)   # another tokenizer file
  for corpus, tok, kw, fragments in [
      (str(out), other, {}, [str(out), "another tokenizer", str(good)]),
      (str(out), tokenizer, dict(mixture=(-1.0,)), ["data.mixture", ">= 0"]),
      (str(out), tokenizer, dict(mixture=(0.5, 0.5)), ["2 weights for 1 sources"]),
      (f"{out},{good}", tokenizer, {}, ["mixes prepared directories and raw files", str(good)]),
      (str(good), tokenizer, dict(mixture=(1.0,)), ["data.mixture needs prepared corpora"]),
      (str(good), tokenizer, dict(workers=2), ["data.workers needs prepared corpora"])]:
    with pytest.raises(UserError) as e:
      make(corpus, tok, **kw)
    for fragment in fragments:
      assert fragment in str(e.value) and "\n" not in str(e.value), str(e.value)
  with pytest.raises(data.DataError, match="heldout_fraction 0.05: set data.heldout_fraction"):
    data.make_dataset(str(out), "train", tokenizer, 32, 4, seed=0, heldout_fraction=0.1)
  shard = out / prepared.shard_name("train", 1, 2)
  shard.rename(tmp_path / "aside")
  with pytest.raises(UserError, match=f"{out}: shard {shard.name} is missing"):
    make(str(out))
  shard.write_bytes((out / prepared.shard_name("heldout", 0, 2)).read_bytes())   # another's
  with pytest.raises(UserError, match=f"{shard} holds [0-9]+ documents, its metadata says"):
    next(iter(make(str(out))))
