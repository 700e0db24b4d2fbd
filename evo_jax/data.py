"""Text data for training: corpora, the SentencePiece tokenizer, packing and the grain pipeline.

Four concerns, in reading order:

1. Corpora. `corpus_documents` lists cheap *document references* (`DocRef`) and assigns each
   document to "train" or "heldout" by a stable hash; `read_document` loads one text.
   The default corpus ("") is the .py files of the Python standard library, so a run works
   with no data at all. User corpora are validated once, eagerly, so that a bad file fails
   at startup with a one-line `DataError` instead of hours into training.
2. Tokenizer. A byte-fallback BPE SentencePiece model trained on the train split and cached at
   WORKDIR/tokenizer.model. It round-trips any text exactly (code indentation included).
   An imported checkpoint brings its own tokenizer.json instead (`HFTokenizer`, same interface).
3. Packing. `grain.experimental.ConcatThenSplitIterDataset` concatenates the
   [bos] + ids + [eos] documents and cuts the stream into rows of seq_len, with segment ids
   and positions; it is checkpointable (`_PackedRows` renames its outputs and fixes its state
   after a JSON round trip).
4. The grain pipeline. `make_dataset` shards, shuffles, encodes, packs and batches.
   `iter(dataset)` gives an iterator with get_state()/set_state(); an Orbax CheckpointManager
   saves it with `grain.checkpoint.CheckpointHandler` / `CheckpointSave` / `CheckpointRestore`
   (see evo_jax/checkpoint.py).
"""
from __future__ import annotations

import functools
import glob
import hashlib
import io
import itertools
import json
import os
import random
import sys
import sysconfig
import time
from typing import NamedTuple

import grain
import numpy as np
import sentencepiece as spm

from evo_jax import paths
from evo_jax import prepared
from evo_jax.errors import UserError

SPLITS = ("train", "heldout")
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
TOKENIZER_FILE = "tokenizer.model"
HF_TOKENIZER_FILE = "tokenizer.json"          # a Hugging Face checkpoint's own tokenizer
HF_TOKENIZER_CONFIG = "tokenizer_config.json"  # beside it: which tokens are bos, eos, pad


class DataError(UserError):
  """Bad input; its message is one line that names the file/field/value."""


# ---------------------------------------------------------------------------------------------
# 1. Corpora
# ---------------------------------------------------------------------------------------------


class DocRef(NamedTuple):
  """Where one document lives. Small and picklable, so a corpus of millions of documents is
  a cheap list. `line` is 0 for a whole-file document; for a JSONL document it is the 1-based
  line number, `offset` the byte offset of that line and `field` the JSON key of its text."""
  path: str
  line: int = 0
  offset: int = 0
  field: str = ""


def hash_fraction(key: str) -> float:
  """A stable number in [0, 1) for `key`. hashlib, not hash(): the split must not change
  between processes, runs or Python versions."""
  return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0**64


def _decode_utf8(data: bytes, path: str, base_offset: int = 0) -> str:
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(f"invalid UTF-8 in {path} at byte {base_offset + e.start}") from None


def _jsonl_text(line: bytes, path: str, line_no: int, offset: int, field: str) -> str:
  """The `field` string of one JSONL line, or a DataError naming the file and line."""
  text = _decode_utf8(line, path, offset)
  try:
    record = json.loads(text)
  except ValueError:
    raise DataError(f"{path} line {line_no}: not valid JSON") from None
  value = record.get(field) if isinstance(record, dict) else None
  if not isinstance(value, str):
    raise DataError(f"{path} line {line_no}: no string field {field!r}")
  try:
    value.encode("utf-8")  # JSON escapes can smuggle in lone surrogates ("\ud800").
  except UnicodeEncodeError:
    raise DataError(f"{path} line {line_no}: field {field!r} is not valid Unicode") from None
  return value


def scan_file(path: str, text_field: str) -> tuple[DocRef, ...]:
  """Refs to the non-empty documents of a user file, which is read once to validate it.
  Cached by (size, mtime) so the tokenizer, train and eval datasets don't each re-read a large
  corpus, while an edited file is scanned again."""
  stat = os.stat(path)
  return _scan_file_cached(path, text_field, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=1024)
def _scan_file_cached(path: str, text_field: str, size: int, mtime_ns: int) -> tuple[DocRef, ...]:
  del size, mtime_ns  # only part of the cache key
  with open(path, "rb") as f:
    data = f.read()
  if not path.endswith(".jsonl"):
    return (DocRef(path),) if _decode_utf8(data, path) else ()
  refs, offset = [], 0
  for line_no, line in enumerate(data.split(b"\n"), start=1):
    if line.strip():  # blank lines (e.g. a trailing newline) are not documents
      if _jsonl_text(line, path, line_no, offset, text_field):
        refs.append(DocRef(path, line_no, offset, text_field))
    offset += len(line) + 1
  return tuple(refs)


def read_document(ref: DocRef) -> str:
  """The text of one document (raises DataError if the file changed into something bad)."""
  path, line_no, offset, field = ref
  with open(path, "rb") as f:
    if not line_no:
      return _decode_utf8(f.read(), path)
    f.seek(offset)
    return _jsonl_text(f.readline(), path, line_no, offset, field)


@functools.lru_cache(maxsize=1)
def _stdlib_documents() -> tuple[tuple[str, DocRef], ...]:
  """(path relative to the stdlib root, ref) for every decodable, non-empty stdlib .py file,
  sorted. Cached: it reads the ~30 MB once per process. A few stdlib test files are
  deliberately not UTF-8; they are skipped, not errors."""
  root = sysconfig.get_paths()["stdlib"]
  docs = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d != "site-packages"]
    for name in filenames:
      if not name.endswith(".py"):
        continue
      path = os.path.join(dirpath, name)
      try:
        with open(path, "rb") as f:
          if not f.read().decode("utf-8"):
            continue
      except (OSError, UnicodeDecodeError):
        continue
      docs.append((os.path.relpath(path, root), DocRef(path)))
  return tuple(sorted(docs))


def _user_documents(corpus: str, text_field: str) -> list[tuple[str, DocRef]]:
  """(split key "path:line", ref) for every document of a comma-separated list of files/globs."""
  paths = []
  for pattern in (p.strip() for p in corpus.split(",")):
    if not pattern:
      continue
    if prepared.is_prepared(pattern):
      raise DataError(f"{pattern} is prepared data (token ids): this reads raw text; give the "
                      f"files it was prepared from")
    matches = [p for p in sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
               if os.path.isfile(p)]
    if not matches:
      raise DataError(f"corpus path not found: {pattern}")
    paths += [p for p in matches if p not in paths]
  docs = []
  for path in paths:
    docs += [(f"{ref.path}:{ref.line}", ref) for ref in scan_file(path, text_field)]
  return docs


def corpus_documents(corpus: str, split: str, heldout_fraction: float,
                     text_field: str = "text") -> list[DocRef]:
  """References to the documents of one split of `corpus`, in a fixed order.

  corpus "" is the Python standard library (one document per .py file). Otherwise it is a
  comma-separated list of files or globs: *.jsonl files hold one document per line (the
  `text_field` string), any other file is one document. A document is heldout iff the stable
  hash fraction of its key (stdlib: path relative to the stdlib root; user corpus: "path:line",
  the path as written/globbed, line 0 for whole files) is < heldout_fraction. Empty documents
  are dropped. The list may be empty for one split, but not for the whole corpus.
  """
  if split not in SPLITS:
    raise DataError(f"unknown split {split!r} (expected one of {', '.join(SPLITS)})")
  if not 0.0 <= heldout_fraction < 1.0:
    raise DataError(f"heldout_fraction={heldout_fraction} must be in [0, 1)")
  docs = _stdlib_documents() if not corpus else _user_documents(corpus, text_field)
  if not docs:
    raise DataError(f"corpus is empty: {corpus or 'python stdlib'}")
  want_heldout = split == "heldout"
  return [ref for key, ref in docs if (hash_fraction(key) < heldout_fraction) == want_heldout]


# ---------------------------------------------------------------------------------------------
# 2. Tokenizer
# ---------------------------------------------------------------------------------------------

# Why these trainer options (SentencePiece's defaults are for natural-language sentences):
# - BPE: trains ~10x faster than unigram on code at the same size and compresses slightly
#   better (stdlib, vocab 2048: ~2.9-3.0 chars/token).
# - identity normalization, no whitespace collapsing, no dummy prefix: the text is kept
#   byte-exact, so indentation, tabs, '\r\n' and '\n' survive (with identity normalization
#   SentencePiece keeps '\n' as an ordinary character, so no newline placeholder is needed).
# - allow_whitespace_only_pieces: runs of indentation become single pieces.
# - byte_fallback: any character outside the vocabulary becomes UTF-8 byte pieces, so nothing
#   is ever <unk>.
_TRAINER_OPTIONS = dict(
    model_type="bpe",
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    allow_whitespace_only_pieces=True,
    split_digits=True,
    byte_fallback=True,
    pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
    max_sentence_length=1 << 16,  # bytes; our training chunks are at most 4 * _CHUNK_CHARS
    input_sentence_size=0,  # we already sampled and capped the input ourselves
    num_threads=2,
    minloglevel=2,  # quiet
)
_CHUNK_CHARS = 4096
_SPACE_MARK = "\u2581"  # SentencePiece's internal symbol for ' '


class Tokenizer:
  """A SentencePiece model with exact `decode(encode(text)) == text`.

  One wrinkle: SentencePiece decodes its whitespace symbol U+2581 back to ' ', so a literal
  U+2581 in the text would not round-trip. `encode` therefore emits that character as its three
  UTF-8 byte pieces (byte_fallback), which decode to the character itself.
  """

  def __init__(self, path: str):
    if not paths.path(path).is_file():
      raise DataError(f"tokenizer model not found: {path}")
    self.path = path
    self._sp = spm.SentencePieceProcessor(model_proto=paths.path(path).read_bytes())
    self.vocab_size = self._sp.get_piece_size()
    self.pad_id, self.bos_id, self.eos_id = self._sp.pad_id(), self._sp.bos_id(), self._sp.eos_id()
    if self.pad_id != PAD_ID or self.bos_id < 0 or self.eos_id < 0:
      raise DataError(f"tokenizer {path} needs pad_id 0 and bos/eos pieces (has pad "
                      f"{self.pad_id}, bos {self.bos_id}, eos {self.eos_id})")
    self._special_ids = frozenset({self.pad_id, self.bos_id, self.eos_id})
    byte_ids = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in _SPACE_MARK.encode("utf-8")]
    self._space_mark_ids = byte_ids if self._sp.unk_id() not in byte_ids else None

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without bos/eos."""
    if _SPACE_MARK not in text or self._space_mark_ids is None:
      return self._sp.encode(text)
    parts = [self._sp.encode(p) for p in text.split(_SPACE_MARK)]
    return parts[0] + [i for p in parts[1:] for i in self._space_mark_ids + p]

  def decode(self, ids) -> str:
    """The text of `ids` (a list or numpy array); pad/bos/eos are skipped."""
    return self._sp.decode([int(i) for i in ids if int(i) not in self._special_ids])


class HFTokenizer:
  """A Hugging Face tokenizer.json (the `tokenizers` package) with Tokenizer's interface.

  bos/eos/pad are named in the tokenizer_config.json beside it. Without a bos token (Qwen)
  documents are separated by eos alone, as in Qwen's pre-training, so bos_id is eos_id."""

  def __init__(self, path: str):
    if not paths.path(path).is_file():
      raise DataError(f"tokenizer file not found: {path}")
    import tokenizers  # the `convert` extra; SentencePiece runs do not need it
    self.path = path
    try:
      self._tok = tokenizers.Tokenizer.from_str(paths.path(path).read_text())
    except Exception as e:  # the Rust library raises a bare Exception on a malformed file
      raise DataError(f"cannot read tokenizer {path}: {str(e).splitlines()[0]}") from None
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    special = {}
    config_path = paths.path(path).parent / HF_TOKENIZER_CONFIG
    if config_path.is_file():
      special = json.loads(config_path.read_text())
    self.eos_id = self._special_id(special, "eos_token")
    if self.eos_id is None:
      raise DataError(f"tokenizer {path}: no eos_token in {config_path}")
    self.bos_id = self._special_id(special, "bos_token")
    self.bos_id = self.eos_id if self.bos_id is None else self.bos_id
    self.pad_id = self._special_id(special, "pad_token")
    self.pad_id = self.eos_id if self.pad_id is None else self.pad_id
    self._special_ids = frozenset({self.pad_id, self.bos_id, self.eos_id})

  def _special_id(self, special, key):
    token = special.get(key)
    token = token.get("content") if isinstance(token, dict) else token
    if token is None:
      return None
    token_id = self._tok.token_to_id(token)
    if token_id is None:
      raise DataError(f"tokenizer {self.path}: its {key} {token!r} is not in the vocabulary")
    return token_id

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without bos/eos (the post-processor's special tokens are off)."""
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids) -> str:
    """The text of `ids` (a list or numpy array); pad/bos/eos are skipped."""
    return self._tok.decode([int(i) for i in ids if int(i) not in self._special_ids],
                            skip_special_tokens=False)


def load_tokenizer(path: str):
  """A tokenizer.json (Hugging Face) or a SentencePiece .model, by its file name."""
  return HFTokenizer(path) if path.endswith(".json") else Tokenizer(path)


def _training_chunks(texts, max_training_chars: int):
  """Cuts texts into sentences of <= _CHUNK_CHARS chars (SentencePiece skips longer
  sentences) and stops after max_training_chars: training time grows with the input."""
  total = 0
  for text in texts:
    for start in range(0, len(text), _CHUNK_CHARS):
      chunk = text[start:start + _CHUNK_CHARS]
      yield chunk
      total += len(chunk)
      if total >= max_training_chars:
        return


def train_tokenizer(out_path: str, corpus: str, vocab_size: int, heldout_fraction: float,
                    text_field: str = "text", max_training_chars: int = 20_000_000) -> Tokenizer:
  """Trains on (a deterministic sample of) the train split and writes out_path atomically."""
  refs = corpus_documents(corpus, "train", heldout_fraction, text_field)
  if not refs:
    raise DataError(f"corpus has no training documents: {corpus or 'python stdlib'} "
                    f"(heldout_fraction={heldout_fraction})")
  random.Random(0).shuffle(refs)  # fixed seed: the same corpus gives the same tokenizer
  texts = (read_document(ref) for ref in refs)  # lazy: only what the cap needs is read
  model = io.BytesIO()
  start = time.perf_counter()
  print(f"training a tokenizer of {vocab_size} pieces on up to {max_training_chars:,} characters "
        f"of {corpus or 'the Python standard library'} (once: it is saved to {out_path})",
        file=sys.stderr, flush=True)
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=_training_chunks(texts, max_training_chars), model_writer=model,
        vocab_size=vocab_size, **_TRAINER_OPTIONS)
  except RuntimeError as e:  # e.g. a vocab too small for the corpus's characters
    reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    raise DataError(f"tokenizer training failed (vocab_size={vocab_size}): {reason}") from None
  paths.write_bytes(out_path, model.getvalue())  # never half a model for a resumed run
  print(f"tokenizer trained in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
  return Tokenizer(out_path)


def prepared_corpus(corpus: str):
  """The metadata of each directory of a prepared corpus (`python -m evo_jax.prepare`), or
  None for a raw one (the standard library, files and globs)."""
  entries = [e.strip() for e in corpus.split(",") if e.strip()]
  kinds = [prepared.is_prepared(e) for e in entries]
  if not any(kinds):
    return None
  if not all(kinds):
    raw = entries[kinds.index(False)]
    raise DataError(f"data.corpus mixes prepared directories and raw files ({raw}): prepare "
                    f"them all (python -m evo_jax.prepare)")
  return [prepared.load_metadata(e) for e in entries]


def load_or_train_tokenizer(model_path: str, workdir: str, corpus: str, vocab_size: int,
                            heldout_fraction: float, text_field: str = "text",
                            max_training_chars: int = 20_000_000):
  """The tokenizer of a run: `model_path` if given; else the workdir's own: the tokenizer.json
  of an imported checkpoint (evo_jax/convert.py), or WORKDIR/tokenizer.model if a previous run
  cached it (so a resumed run gets the identical tokenizer); else the one a prepared corpus was
  prepared with; else train one."""
  if model_path:
    return load_tokenizer(model_path)
  imported = paths.path(workdir) / HF_TOKENIZER_FILE
  if imported.is_file():
    return HFTokenizer(os.fspath(imported))
  metas = prepared_corpus(corpus)
  if metas:
    return load_tokenizer(prepared.tokenizer_file(metas[0]))
  cached = paths.path(workdir) / TOKENIZER_FILE
  if cached.is_file():
    tok = Tokenizer(os.fspath(cached))
    if tok.vocab_size != vocab_size:
      raise DataError(f"cached tokenizer {cached} has vocab_size {tok.vocab_size}, not "
                      f"{vocab_size} (use another workdir or the same vocab_size)")
    return tok
  return train_tokenizer(os.fspath(cached), corpus, vocab_size, heldout_fraction, text_field,
                         max_training_chars)


TOKENIZER_FINGERPRINT = "tokenizer.sha256"   # in the workdir: the run's tokenizer, by content


def file_sha256(path):
  h = hashlib.sha256()
  with paths.path(path).open("rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def check_tokenizer(tokenizer, workdir, record=False):
  """Refuses a tokenizer whose file is not the one the workdir's run was trained with (a
  swapped file of the same size would otherwise tokenise silently wrong); with `record`, a
  run's first trainer writes the fingerprint (WORKDIR/tokenizer.sha256, sha256sum's format)."""
  path = paths.path(workdir) / TOKENIZER_FINGERPRINT
  digest = file_sha256(tokenizer.path)
  if path.is_file():
    saved = path.read_text().split()
    if saved and saved[0] != digest:
      raise DataError(f"tokenizer {tokenizer.path} is not the one the run in {workdir} was "
                      f"trained with (sha256 {digest[:12]}..., recorded {saved[0][:12]}... in "
                      f"{path})")
  elif record:
    paths.write_text(path, f"{digest}  {tokenizer.path}\n")


# ---------------------------------------------------------------------------------------------
# 3 + 4. Packing and the grain pipeline
# ---------------------------------------------------------------------------------------------


def _encode_document(ref: DocRef, tokenizer: Tokenizer) -> dict[str, np.ndarray]:
  ids = tokenizer.encode(read_document(ref))
  return {"tokens": np.asarray([tokenizer.bos_id, *ids, tokenizer.eos_id], dtype=np.int32)}


class _PackedRows(grain.IterDataset):
  """Grain's ConcatThenSplit packer with our key names (segment_ids, positions) and a fix for
  its state after a JSON round trip, which is how grain's Orbax handler saves it: grain 0.2.x
  tells "no partial document pending" by comparing a slice to the tuple (-1, -1), but JSON
  hands back the list [-1, -1], so a restored iterator would skip a document."""

  def __init__(self, parent: grain.IterDataset, seq_len: int):
    super().__init__(grain.experimental.ConcatThenSplitIterDataset(
        parent, length_struct={"tokens": seq_len}))

  def __iter__(self):
    return _PackedRowsIterator(self._parent.__iter__())


class _PackedRowsIterator(grain.DatasetIterator):

  def __next__(self) -> dict[str, np.ndarray]:
    row = next(self._parent)
    return {"tokens": row["tokens"], "segment_ids": row["tokens_segment_ids"],
            "positions": row["tokens_positions"]}

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    slices = {k: tuple(v) for k, v in state["remainder_slices"].items()}
    self._parent.set_state({**state, "remainder_slices": slices})


def make_dataset(corpus: str, split: str, tokenizer: Tokenizer, seq_len: int, batch_size: int,
                 seed: int, heldout_fraction: float, text_field: str = "text",
                 process_index: int = 0, process_count: int = 1,
                 num_epochs: int | None = None, shuffle_rows: int = 0,
                 mixture=(), workers: int = 0) -> grain.IterDataset:
  """Batches of packed documents for this process: dicts of int32 arrays
  [batch_size // process_count, seq_len] with

    tokens       concatenated [bos] + ids + [eos] documents, cut into rows of seq_len
                 (a long document continues in the next row); pad_id 0 only after the last
                 document of a finite dataset, and whole pad rows to fill its last batch;
    segment_ids  1, 2, 3... per document piece within a row, 0 on padding;
    positions    position within the piece: restarts at 0 at every row start, also for the
                 continuation of a document (grain's ConcatThenSplit convention).

  Each process reads documents[process_index::process_count] (disjoint shards). "train" is
  reshuffled every epoch from `seed`, and its packed rows are shuffled again in windows of
  `shuffle_rows` (a long file fills many consecutive rows; without this, a batch would hold a
  few files and consecutive batches the same ones); "heldout" keeps corpus order (use
  num_epochs=1 for a deterministic, finite evaluation set). num_epochs=None repeats forever.
  The iterator `iter(ds)` is checkpointable: get_state()/set_state(), or Orbax (see
  evo_jax/checkpoint.py). It runs in-process (no worker processes or threads).

  A prepared corpus (directories of `python -m evo_jax.prepare`) is read by
  prepared.PreparedDataset instead: a global shuffle of documents, sources mixed by `mixture`
  (shares of tokens), `workers` processes reading ahead, and an elastic state; heldout is
  finite (num_epochs is ignored) and shuffle_rows unused (its rows are lanes: see there).
  """
  if batch_size % process_count:
    raise DataError(f"batch_size={batch_size} is not divisible by process_count={process_count}")
  local_batch_size = batch_size // process_count
  metas = prepared_corpus(corpus)
  if metas:
    return _prepared_dataset(metas, split, tokenizer, seq_len, local_batch_size, seed,
                             heldout_fraction, process_index, process_count, mixture, workers)
  for name, value in (("mixture", mixture), ("workers", workers)):
    if value:
      raise DataError(f"data.{name} needs prepared corpora (python -m evo_jax.prepare); "
                      f"data.corpus is {corpus or 'the python stdlib'}")
  refs = corpus_documents(corpus, split, heldout_fraction, text_field)
  shard = refs[process_index::process_count]
  if not shard:
    raise DataError(f"no {split} documents for process {process_index} of {process_count} in "
                    f"corpus {corpus or 'python stdlib'} (heldout_fraction={heldout_fraction})")
  ds = grain.MapDataset.source(shard)
  if split == "train":
    ds = ds.shuffle(seed=seed % 2**32)  # repeat() below reseeds it with the epoch number
  ds = ds.repeat(num_epochs)
  ds = ds.map(functools.partial(_encode_document, tokenizer=tokenizer))
  # num_threads=0: encode in the calling thread. SentencePiece encodes ~0.7M tokens/s, far above
  # what training consumes, and no threads keeps the pipeline simple and easy to debug.
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  ds = _PackedRows(ds, seq_len)
  if split == "train" and shuffle_rows > 1:
    ds = grain.experimental.WindowShuffleIterDataset(ds, window_size=shuffle_rows, seed=seed)
  # batch_and_pad fills a finite dataset's last batch with pad rows (segment_ids 0) so every
  # batch has the same shape (no recompilation, and no heldout rows silently dropped).
  return ds.batch(local_batch_size, batch_fn=functools.partial(
      grain.experimental.batch_and_pad, batch_size=local_batch_size, pad_value=PAD_ID))


def _prepared_dataset(metas, split, tokenizer, seq_len, rows, seed, heldout_fraction,
                      process_index, process_count, mixture, workers):
  digest = file_sha256(tokenizer.path)
  for meta in metas:
    prepared.check_tokenizer(meta, digest, tokenizer.path)
    if meta["heldout_fraction"] != heldout_fraction:
      raise DataError(f"{meta['path']} was prepared with heldout_fraction "
                      f"{meta['heldout_fraction']}: set data.heldout_fraction to it")
  return prepared.PreparedDataset(
      metas, split, seq_len, rows, seed, process_index, process_count, bos_id=tokenizer.bos_id,
      eos_id=tokenizer.eos_id, pad_id=PAD_ID, mixture=mixture, workers=workers)


def document_name(ref: DocRef) -> str:
  return f"{ref.path}:{ref.line}" if ref.line else ref.path


def heldout_ids(corpus: str, heldout_fraction: float, text_field: str, tokenizer):
  """(name, token ids without bos/eos) of each held-out document, in corpus order: read from
  a prepared corpus (named DIR:heldout:INDEX), encoded from a raw one (named path[:line])."""
  metas = prepared_corpus(corpus)
  if metas:
    for path, index, ids in prepared.split_documents(metas, "heldout"):
      yield f"{path}:heldout:{index}", [int(i) for i in ids]
    return
  for ref in corpus_documents(corpus, "heldout", heldout_fraction, text_field):
    yield document_name(ref), tokenizer.encode(read_document(ref))


def make_eval_batches(corpus: str, tokenizer: Tokenizer, seq_len: int, batch_size: int,
                      num_batches: int, heldout_fraction: float, text_field: str = "text",
                      process_index: int = 0,
                      process_count: int = 1) -> list[dict[str, np.ndarray]]:
  """The first `num_batches` batches of this process's shard of the heldout split, in corpus
  order: the same fixed evaluation set every time. With several processes, a shard that runs
  out early is filled up with all-padding batches, so that every process runs the same number
  of (collective) evaluation steps; one process simply gets fewer batches."""
  ds = make_dataset(corpus, "heldout", tokenizer, seq_len, batch_size, seed=0,
                    heldout_fraction=heldout_fraction, text_field=text_field,
                    process_index=process_index, process_count=process_count, num_epochs=1)
  batches = list(itertools.islice(ds, num_batches))
  if not batches:
    raise DataError(f"no heldout batches in corpus {corpus or 'python stdlib'} "
                    f"(heldout_fraction={heldout_fraction}, num_batches={num_batches})")
  if process_count > 1:
    empty = {k: np.zeros_like(v) for k, v in batches[0].items()}
    batches += [empty] * (num_batches - len(batches))
  return batches

