"""Tests of evo_jax.data: corpora and their split, the tokenizer's exact round trip, packing
invariants, process shards, checkpointable iterators (plain and through Orbax) and the one-line
DataErrors for bad input. Small corpora in tmp dirs keep it fast; one test uses the stdlib."""
import hashlib
import itertools
import json
import os
import sysconfig

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from evo_jax import data

STDLIB = sysconfig.get_paths()["stdlib"]
VOCAB = 400  # the 256 byte pieces + 4 specials + the corpus's characters must fit
SEQ_LEN = 64


def _stdlib_text(rel):
  with open(os.path.join(STDLIB, rel), encoding="utf-8") as f:
    return f.read()


# Awkward but real: tabs, blank lines, CRLF, trailing spaces, non-ASCII, SentencePiece's own
# whitespace symbol U+2581, a NUL and astral-plane characters.
EDGE_TEXTS = [
    "def f(x):\n\tif x:\n\t\treturn 1\n\n\n    return 2   \n",
    "a\r\nb\r\n\r\n",
    "  leading and trailing  ",
    "\u2581 literal \u2581\u2581 marks",
    "caf\u00e9 na\u00efve e\u0301 \u4e2d\u6587 \U0001f600 \x00 \u00a0 \u3000 \u2028",
    "\n",
    " ",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """A user corpus: 12 .txt files (slices of real stdlib code) and a JSONL file with 60
  documents; every document text is unique so documents can be matched by text."""
  root = tmp_path_factory.mktemp("corpus")
  sources = [_stdlib_text(rel) for rel in ("textwrap.py", "json/decoder.py", "csv.py")]
  texts = []
  (root / "docs").mkdir()
  for i in range(12):
    src = sources[i % 3]
    text = f"# doc {i}\n" + src[i * 300:i * 300 + 200 + 150 * i]
    (root / "docs" / f"doc{i:02d}.txt").write_bytes(text.encode("utf-8"))
    texts.append(text)
  jsonl_texts = [f"line {i}: " + EDGE_TEXTS[i % len(EDGE_TEXTS)] * (1 + i % 4) for i in range(60)]
  with open(root / "data.jsonl", "w", encoding="utf-8") as f:
    for t in jsonl_texts:
      f.write(json.dumps({"id": 1, "text": t}) + "\n")
    f.write("\n")  # a trailing blank line is not a document
  texts += jsonl_texts
  return f"{root}/docs/*.txt,{root}/data.jsonl", texts


@pytest.fixture(scope="module")
def tokenizer(corpus, tmp_path_factory):
  return data.load_or_train_tokenizer("", str(tmp_path_factory.mktemp("work")), corpus[0],
                                      VOCAB, heldout_fraction=0.2)


def _all_texts(corpus_str, split, frac=0.2):
  return [data.read_document(r) for r in data.corpus_documents(corpus_str, split, frac)]


def _stream(tok, texts):
  """The concatenated [bos] + ids + [eos] token stream of `texts`."""
  return np.asarray([t for x in texts for t in [tok.bos_id, *tok.encode(x), tok.eos_id]])


def _rows(batches):
  return [(b["tokens"][i], b["segment_ids"][i], b["positions"][i])
          for b in batches for i in range(len(b["tokens"]))]


def _documents_from_rows(tok, batches):
  """Decodes the documents back out of packed rows: non-pad tokens in order, split at eos."""
  flat = np.concatenate([tokens[seg > 0] for tokens, seg, _ in _rows(batches)])
  ends = np.flatnonzero(flat == tok.eos_id)
  docs = np.split(flat, ends + 1)[:-1]
  assert all(d[0] == tok.bos_id for d in docs)
  return [tok.decode(d) for d in docs]


def _same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_special_ids_and_cache(corpus, tokenizer, tmp_path):
  assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 2, 3)
  assert tokenizer.vocab_size == VOCAB
  assert os.path.basename(tokenizer.path) == "tokenizer.model"
  # The cached model is reused as is: same file, same ids.
  workdir = os.path.dirname(tokenizer.path)
  mtime = os.path.getmtime(tokenizer.path)
  again = data.load_or_train_tokenizer("", workdir, corpus[0], VOCAB, 0.2)
  assert again.path == tokenizer.path and os.path.getmtime(again.path) == mtime
  sample = corpus[1][0]
  assert again.encode(sample) == tokenizer.encode(sample)
  # An explicit model_path wins over training.
  explicit = data.load_or_train_tokenizer(tokenizer.path, str(tmp_path), "", VOCAB, 0.2)
  assert explicit.encode(sample) == tokenizer.encode(sample)
  assert not os.path.exists(tmp_path / "tokenizer.model")
  # Training is deterministic: a second workdir gets a byte-identical model.
  other = data.load_or_train_tokenizer("", str(tmp_path), corpus[0], VOCAB, 0.2)
  with open(other.path, "rb") as f1, open(tokenizer.path, "rb") as f2:
    assert f1.read() == f2.read()


def test_tokenizer_round_trips_edge_cases_and_jsonl(corpus, tokenizer):
  for text in EDGE_TEXTS + [""]:
    ids = tokenizer.encode(text)
    assert tokenizer.bos_id not in ids and tokenizer.eos_id not in ids
    assert tokenizer.decode(ids) == text
  # JSONL documents come back from the file exactly as written, and round-trip.
  jsonl_texts = [t for t in _all_texts(corpus[0], "train") + _all_texts(corpus[0], "heldout")
                 if t.startswith("line ")]
  assert sorted(jsonl_texts) == sorted(t for t in corpus[1] if t.startswith("line "))
  for text in jsonl_texts:
    assert tokenizer.decode(tokenizer.encode(text)) == text
  # decode skips pad/bos/eos and accepts numpy arrays.
  ids = np.asarray([0, 2, *tokenizer.encode("x = 1\n"), 3, 0, 0], np.int32)
  assert tokenizer.decode(ids) == "x = 1\n"


def test_tokenizer_round_trips_real_stdlib_files(tokenizer):
  """Real files with deep indentation, blank lines and non-ASCII text, even with this tiny
  vocab. CPython's own files contain no tabs, CRs or trailing spaces, so a tabified CRLF copy of
  one with trailing spaces covers those."""
  wanted = {"unicode": lambda t: any(ord(c) > 127 for c in t),
            "blank lines": lambda t: "\n\n\n" in t,
            "deep indentation": lambda t: "\n" + " " * 16 in t}
  found = {}
  for ref in data.corpus_documents("", "heldout", 0.05) + data.corpus_documents("", "train", 0.05):
    text = data.read_document(ref)
    if len(text) > 60_000:
      continue
    for name, has in wanted.items():
      if name not in found and has(text):
        found[name] = text
    if len(found) == len(wanted):
      break
  assert found.keys() == wanted.keys()
  tabified = found["deep indentation"].replace("    ", "\t").replace("\n", "  \r\n")
  for text in [*found.values(), tabified]:
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_stdlib_tokenizer_trains_fast_compresses_and_round_trips(tmp_path):
  tok = data.load_or_train_tokenizer("", str(tmp_path), "", 2048, 0.05,
                                     max_training_chars=2_000_000)
  assert tok.vocab_size == 2048
  texts = [data.read_document(r) for r in data.corpus_documents("", "heldout", 0.05)]
  ids = [tok.encode(t) for t in texts]
  assert [tok.decode(i) for i in ids] == texts
  chars_per_token = sum(map(len, texts)) / sum(map(len, ids))
  assert chars_per_token > 2.7, chars_per_token  # ~2.9 measured


# ----------------------------------------------------------------------------- corpora


def _fraction(key):
  return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def test_stdlib_split_is_disjoint_stable_and_sized():
  train = data.corpus_documents("", "train", 0.05)
  heldout = data.corpus_documents("", "heldout", 0.05)
  assert not set(train) & set(heldout)
  assert len(train) + len(heldout) > 1000
  assert 0.03 < len(heldout) / (len(train) + len(heldout)) < 0.08
  assert data.corpus_documents("", "heldout", 0.05) == heldout  # stable across calls
  # The split hashes the path relative to the stdlib root, so it is the same on any machine.
  for ref in heldout[:10] + train[:10]:
    assert (_fraction(os.path.relpath(ref.path, STDLIB)) < 0.05) == (ref in heldout)
  paths = [r.path for r in train]
  assert paths == sorted(paths) and all(p.endswith(".py") for p in paths)
  assert not any("site-packages" in p for p in paths)


def test_user_split_is_disjoint_stable_and_sized(tmp_path):
  path = tmp_path / "many.jsonl"
  path.write_text("".join(json.dumps({"body": f"document {i}"}) + "\n" for i in range(1000)))
  train = data.corpus_documents(str(path), "train", 0.2, text_field="body")
  heldout = data.corpus_documents(str(path), "heldout", 0.2, text_field="body")
  assert not set(train) & set(heldout) and len(train) + len(heldout) == 1000
  assert 0.15 < len(heldout) / 1000 < 0.25
  assert heldout == data.corpus_documents(str(path), "heldout", 0.2, text_field="body")
  assert all(_fraction(f"{path}:{r.line}") < 0.2 for r in heldout)
  assert [data.read_document(r) for r in heldout[:3]] == [f"document {r.line - 1}"
                                                          for r in heldout[:3]]
  assert data.corpus_documents(str(path), "heldout", 0.0, text_field="body") == []


# ----------------------------------------------------------------------------- packing


def _check_packing(tok, batches, stream, batch_size):
  """Every row is the next contiguous slice of `stream`; segment ids and positions mark the
  document pieces; padding only after the stream ends."""
  offset = 0
  for b in batches:
    assert all(b[k].shape == (batch_size, SEQ_LEN) and b[k].dtype == np.int32 for k in b)
  for tokens, seg, pos in _rows(batches):
    n = int(np.sum(seg > 0))
    assert np.all(seg[:n] > 0) and np.all(seg[n:] == 0)
    assert np.all(tokens[n:] == tok.pad_id) and np.all(pos[n:] == 0)
    np.testing.assert_array_equal(tokens[:n], stream[offset:offset + n])
    offset += n
    if n < SEQ_LEN:
      assert offset == len(stream)  # only the end of the data is padded
    if n == 0:
      continue  # a pad row filling the last batch
    starts = [0] + [i for i in range(1, n) if seg[i] != seg[i - 1]]
    assert list(seg[starts]) == list(range(1, len(starts) + 1))
    assert set(np.flatnonzero(tokens[:n] == tok.bos_id)) <= set(starts)
    for j, start in enumerate(starts):
      end = starts[j + 1] if j + 1 < len(starts) else n
      np.testing.assert_array_equal(pos[start:end], np.arange(end - start))
      if start > 0:  # a new piece mid-row is always a new document
        assert tokens[start] == tok.bos_id and tokens[start - 1] == tok.eos_id
  assert offset == len(stream)


def test_heldout_packing_reconstructs_documents_in_order(corpus, tokenizer):
  texts = _all_texts(corpus[0], "heldout")
  assert len(texts) >= 5
  ds = data.make_dataset(corpus[0], "heldout", tokenizer, SEQ_LEN, 4, seed=0,
                         heldout_fraction=0.2, num_epochs=1)
  batches = list(ds)
  _check_packing(tokenizer, batches, _stream(tokenizer, texts), 4)
  assert _documents_from_rows(tokenizer, batches) == texts
  _same_batches(batches, list(ds))  # deterministic


def test_train_is_shuffled_per_epoch_and_repeats(corpus, tokenizer):
  texts = _all_texts(corpus[0], "train")
  make = lambda seed, epochs: data.make_dataset(corpus[0], "train", tokenizer, SEQ_LEN, 4,
                                                seed=seed, heldout_fraction=0.2,
                                                num_epochs=epochs)
  one_epoch = list(make(7, 1))
  epoch1 = _documents_from_rows(tokenizer, one_epoch)
  assert sorted(epoch1) == sorted(texts) and epoch1 != texts
  _check_packing(tokenizer, one_epoch, _stream(tokenizer, epoch1), 4)
  both = _documents_from_rows(tokenizer, list(make(7, 2)))
  assert both[:len(texts)] == epoch1
  assert sorted(both[len(texts):]) == sorted(texts) and both[len(texts):] != epoch1
  assert _documents_from_rows(tokenizer, list(make(8, 1))) != epoch1  # the seed matters
  # num_epochs=None never ends: far more batches than two epochs hold.
  forever = list(itertools.islice(make(7, None), 3 * len(one_epoch)))
  assert len(forever) == 3 * len(one_epoch)
  assert all(np.all(b["segment_ids"] > 0) for b in forever)  # an endless stream needs no pad


def test_process_shards_are_disjoint_and_cover_the_documents(corpus, tokenizer):
  texts = _all_texts(corpus[0], "train")
  per_process = []
  for p in range(3):
    ds = data.make_dataset(corpus[0], "train", tokenizer, SEQ_LEN, 6, seed=0,
                           heldout_fraction=0.2, process_index=p, process_count=3, num_epochs=1)
    batches = list(ds)
    assert all(b["tokens"].shape == (2, SEQ_LEN) for b in batches)
    per_process.append(_documents_from_rows(tokenizer, batches))
  for a, b in itertools.combinations(per_process, 2):
    assert not set(a) & set(b)
  assert sorted(sum(per_process, [])) == sorted(texts)


def test_eval_batches(corpus, tokenizer):
  all_batches = list(data.make_dataset(corpus[0], "heldout", tokenizer, SEQ_LEN, 2, seed=0,
                                       heldout_fraction=0.2, num_epochs=1))
  assert len(all_batches) > 3
  _same_batches(data.make_eval_batches(corpus[0], tokenizer, SEQ_LEN, 2, 3, 0.2),
                all_batches[:3])
  _same_batches(data.make_eval_batches(corpus[0], tokenizer, SEQ_LEN, 2, 10_000, 0.2),
                all_batches)
  with pytest.raises(data.DataError, match="no heldout documents"):
    data.make_eval_batches(corpus[0], tokenizer, SEQ_LEN, 2, 3, 0.0)
  # Two processes: each evaluates its own shard (one row of each global batch of 2), and both
  # get the same number of batches, the shorter shard filled up with padding.
  n = 2 * len(all_batches) + 2
  shards = [data.make_eval_batches(corpus[0], tokenizer, SEQ_LEN, 2, n, 0.2, process_index=p,
                                   process_count=2) for p in range(2)]
  assert [len(b) for b in shards] == [n, n]
  assert all(b["tokens"].shape == (1, SEQ_LEN) for shard in shards for b in shard)
  real = lambda shard: sum(int((b["segment_ids"] > 0).sum()) for b in shard)
  assert real(shards[0]) + real(shards[1]) == sum(int((b["segment_ids"] > 0).sum())
                                                  for b in all_batches)
  assert int(shards[0][-1]["segment_ids"].sum()) == int(shards[1][-1]["segment_ids"].sum()) == 0


# ----------------------------------------------------------------------------- checkpointing


def _train_dataset(corpus, tokenizer, shuffle_rows=0):
  return data.make_dataset(corpus[0], "train", tokenizer, SEQ_LEN, 2, seed=3,
                           heldout_fraction=0.2, shuffle_rows=shuffle_rows)


@pytest.mark.parametrize("shuffle_rows", [0, 5])
def test_get_state_set_state_resumes_exactly(corpus, tokenizer, shuffle_rows):
  """Restores at every position of the first 12 batches (mid-document or not), after a JSON
  round trip of the state, into an iterator of a freshly built dataset."""
  reference = list(itertools.islice(_train_dataset(corpus, tokenizer, shuffle_rows), 15))
  it = iter(_train_dataset(corpus, tokenizer, shuffle_rows))
  for k in range(12):
    state = json.loads(json.dumps(it.get_state()))
    resumed = iter(_train_dataset(corpus, tokenizer, shuffle_rows))
    resumed.set_state(state)
    _same_batches([next(resumed) for _ in range(3)], reference[k:k + 3])
    _same_batches([next(it)], reference[k:k + 1])


def test_orbax_checkpoint_manager_round_trip(corpus, tokenizer, tmp_path):
  it = iter(_train_dataset(corpus, tokenizer))
  for _ in range(5):
    next(it)
  manager = ocp.CheckpointManager(
      tmp_path / "ckpt", item_handlers={"data": grain.checkpoint.CheckpointHandler()},
      options=ocp.CheckpointManagerOptions(create=True))
  manager.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  manager.wait_until_finished()
  expected = [next(it) for _ in range(3)]

  fresh = iter(_train_dataset(corpus, tokenizer))
  manager.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  _same_batches([next(fresh) for _ in range(3)], expected)
  manager.close()


# ----------------------------------------------------------------------------- bad input


def _raises(message, fn, *args, **kwargs):
  with pytest.raises(data.DataError) as info:
    fn(*args, **kwargs)
  assert str(info.value) == message
  assert isinstance(info.value, ValueError)


def test_bad_inputs_raise_one_line_data_errors(tmp_path):
  docs = lambda corpus, **kw: data.corpus_documents(corpus, "train", 0.1, **kw)
  good = tmp_path / "good.txt"
  good.write_text("print('hi')\n")

  missing = str(tmp_path / "nope.txt")
  _raises(f"corpus path not found: {missing}", docs, f"{good},{missing}")
  _raises(f"corpus path not found: {tmp_path}/*.md", docs, f"{tmp_path}/*.md")

  empty = tmp_path / "empty.txt"
  empty.write_bytes(b"")
  _raises(f"corpus is empty: {empty}", docs, str(empty))
  blank = tmp_path / "blank.jsonl"
  blank.write_text('{"text": ""}\n\n{"text": ""}\n')
  _raises(f"corpus is empty: {blank}", docs, str(blank))

  bad_txt = tmp_path / "bad.txt"
  bad_txt.write_bytes(b"abc\xff\xfe def")
  _raises(f"invalid UTF-8 in {bad_txt} at byte 3", docs, f"{tmp_path}/*.txt")
  bad_jsonl = tmp_path / "bad_utf8.jsonl"
  line1 = b'{"text": "ok"}\n'
  bad_jsonl.write_bytes(line1 + b'{"text": "\xff"}\n')
  _raises(f"invalid UTF-8 in {bad_jsonl} at byte {len(line1) + 10}", docs, str(bad_jsonl))

  malformed = tmp_path / "malformed.jsonl"
  malformed.write_text('{"text": "ok"}\n{"text": "unterminated\n')
  _raises(f"{malformed} line 2: not valid JSON", docs, str(malformed))
  no_field = tmp_path / "no_field.jsonl"
  no_field.write_text('{"content": "x"}\n')
  _raises(f"{no_field} line 1: no string field 'text'", docs, str(no_field))
  _raises(f"{no_field} line 1: no string field 'body'", docs, str(no_field), text_field="body")
  refs = data.corpus_documents(str(no_field), "train", 0.0, text_field="content")
  assert [data.read_document(r) for r in refs] == ["x"]
  not_string = tmp_path / "not_string.jsonl"
  not_string.write_text('{"text": "ok"}\n{"text": 3}\n')
  _raises(f"{not_string} line 2: no string field 'text'", docs, str(not_string))
  not_object = tmp_path / "not_object.jsonl"
  not_object.write_text('["text"]\n')
  _raises(f"{not_object} line 1: no string field 'text'", docs, str(not_object))

  _raises("heldout_fraction=1.5 must be in [0, 1)", data.corpus_documents, "", "train", 1.5)
  _raises("unknown split 'test' (expected one of train, heldout)",
          data.corpus_documents, "", "test", 0.1)


def test_bad_tokenizer_inputs(tmp_path, tokenizer):
  model = str(tmp_path / "missing.model")
  _raises(f"tokenizer model not found: {model}",
          data.load_or_train_tokenizer, model, str(tmp_path), "", 2048, 0.1)
  # A cached tokenizer of another size is an error, not a silent reuse.
  workdir = os.path.dirname(tokenizer.path)
  _raises(f"cached tokenizer {tokenizer.path} has vocab_size {VOCAB}, not 512 (use another "
          "workdir or the same vocab_size)",
          data.load_or_train_tokenizer, "", workdir, "", 512, 0.1)
  # A vocab too small for the byte pieces and the corpus's characters fails with a DataError.
  small = tmp_path / "small.txt"
  small.write_text("abcdefghijklmnopqrstuvwxyz " * 20)
  with pytest.raises(data.DataError, match=r"^tokenizer training failed \(vocab_size=100\): "):
    data.load_or_train_tokenizer("", str(tmp_path / "w"), str(small), 100, 0.0)
