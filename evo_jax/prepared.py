"""Prepared data: documents tokenised once by `python -m evo_jax.prepare`, read by training.

A prepared directory holds

  metadata.json                          written last: the prepare finished (format below)
  tokenizer.model | tokenizer.json       a copy of the tokenizer (and its tokenizer_config.json)
  train-00000-of-00008.array_record      one record per document: its token ids as
  heldout-00000-of-00008.array_record    little-endian int32, without bos/eos

The train/heldout split is made by prepare, with the stable hash that raw corpora use
(data.corpus_documents), so the held-out documents of a prepared corpus are those of the same
files read raw.

Reading (`PreparedDataset`). Training draws documents from one infinite *global stream*: each
source's train documents in a fresh shuffle every epoch (grain's index shuffle: random access,
O(1) memory), the sources mixed by `data.mixture` (grain's MapDataset.mix: a fixed, periodic
selection). Process p of P takes global positions p, p + P, p + 2P, ...; each of its batch rows
is a *lane* that packs documents one after another, a document too long for its row continuing
in the same row of the next batch (so a long file spreads over steps, not over one batch).

The iterator's state is small JSON: the next global position, the positions already consumed
ahead of it, and each lane's unfinished document (position, token offset). Restored on the same
number of processes it continues exactly. Restored on another number (`set_elastic_state`, from
every old process's state) it is *elastic*: no document is read twice and none is skipped; the
unfinished documents are handed to the new lanes and continue at their token offsets. What
changes is only which row and process a document lands in.
"""
from __future__ import annotations

import bisect
import collections
import json
import multiprocessing
import os
import weakref

import grain
import numpy as np
from etils import epath

from evo_jax.errors import UserError

FORMAT = "evo_jax.prepared.v1"
METADATA = "metadata.json"
PLAN = "prepare.json"         # written first: what a resumed prepare must match
SPLITS = ("train", "heldout")
TOKEN_DTYPE = np.dtype("<i4")


class PreparedError(UserError):
  """A prepared directory that cannot be read: its message names the file."""


def shard_name(split, index, count):
  return f"{split}-{index:05d}-of-{count:05d}.array_record"


def is_prepared(path):
  """Whether a data.corpus entry names a prepared directory (finished or not)."""
  p = epath.Path(os.path.expanduser(path))
  return p.is_dir() and ((p / METADATA).exists() or (p / PLAN).exists())


def load_metadata(path):
  """The metadata of a finished prepared directory, each shard checked to be there (one
  listing of the directory: one request on a bucket); a PreparedError naming the file
  otherwise. Their document counts are checked when they are opened (_Documents)."""
  root = epath.Path(os.path.expanduser(path))
  meta_path = root / METADATA
  if not meta_path.exists():
    raise PreparedError(f"{root} is not a finished prepared dataset (no {METADATA}: rerun "
                        f"python -m evo_jax.prepare with the same arguments to finish it)")
  try:
    meta = json.loads(meta_path.read_text())
  except ValueError:
    raise PreparedError(f"{meta_path} is not valid JSON") from None
  if meta.get("format") != FORMAT:
    raise PreparedError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
  present = {p.name for p in root.iterdir()}
  for split in SPLITS:
    for shard in meta["splits"][split]["shards"]:
      if shard["file"] not in present:
        raise PreparedError(f"{root}: shard {shard['file']} is missing")
  meta["path"] = str(root)
  return meta


def _check_counts(meta, split, found):
  """PreparedError naming the first shard of a split whose number of documents is not its
  metadata's, when the split's `found` total differs from the metadata's."""
  shards = meta["splits"][split]["shards"]
  if found == sum(s["documents"] for s in shards):
    return
  from array_record.python import array_record_module
  for shard in shards:
    shard_path = os.path.join(meta["path"], shard["file"])
    reader = array_record_module.ArrayRecordReader(shard_path)
    count = reader.num_records()
    reader.close()
    if count != shard["documents"]:
      raise PreparedError(f"{shard_path} holds {count} documents, its metadata says "
                          f"{shard['documents']} (a damaged or foreign shard)")


def tokenizer_file(meta):
  """The copy of the tokenizer inside a prepared directory."""
  return os.path.join(meta["path"], meta["tokenizer_file"])


def check_tokenizer(meta, tokenizer_sha256, tokenizer_path):
  if meta["tokenizer_sha256"] != tokenizer_sha256:
    raise PreparedError(
        f"{meta['path']} was prepared with another tokenizer (sha256 "
        f"{meta['tokenizer_sha256'][:12]}...) than the run's {tokenizer_path} (sha256 "
        f"{tokenizer_sha256[:12]}...): prepare it again with --tokenizer {tokenizer_path}")


def mixture_weights(metas, weights):
  """Document-draw weights that give each source `weights` as its share of *tokens*: a
  source of long documents is drawn proportionally less often (mean length from metadata)."""
  if not weights:
    return None
  if len(weights) != len(metas):
    raise PreparedError(f"data.mixture has {len(weights)} weights for {len(metas)} sources "
                        f"({', '.join(m['path'] for m in metas)})")
  if any(w < 0 for w in weights) or not sum(weights) > 0:
    raise PreparedError(f"data.mixture={tuple(weights)}: weights must be >= 0 and not all 0")
  draws = []
  for meta, weight in zip(metas, weights):
    train = meta["splits"]["train"]
    if weight > 0 and not train["documents"]:
      raise PreparedError(f"{meta['path']} has no train documents but mixture weight {weight}")
    mean_len = (train["tokens"] + 2 * train["documents"]) / max(train["documents"], 1)
    draws.append(weight / mean_len)
  return [d / sum(draws) for d in draws]


class _Documents:
  """Random access to one split's documents of several prepared directories."""

  def __init__(self, metas, split):
    self.sources = []
    for meta in metas:
      files = [os.path.join(meta["path"], s["file"])
               for s in meta["splits"][split]["shards"] if s["documents"]]
      self.sources.append(grain.sources.ArrayRecordDataSource(files) if files else [])
      _check_counts(meta, split, len(self.sources[-1]))
    self.sizes = [len(s) for s in self.sources]

  def tokens(self, source, index):
    return np.frombuffer(self.sources[source][index], dtype=TOKEN_DTYPE)


def split_documents(metas, split):
  """(directory, index, token ids) of every document of a split, directory by directory, in
  order."""
  documents = _Documents(metas, split)
  for source, size in enumerate(documents.sizes):
    for index in range(size):
      yield metas[source]["path"], index, documents.tokens(source, index)


_worker = {}


def _open_documents(metas, split):
  _worker["documents"] = _Documents(metas, split)


def _read_documents(keys):
  """In a worker process: the token ids of [(source, index)]."""
  return [_worker["documents"].tokens(s, i) for s, i in keys]


class _ReadAhead:
  """Worker processes that read the documents of the positions a process will take next
  (they are known ahead: they do not depend on document lengths). Which documents make which
  rows is decided in the iterator alone, so the data does not depend on data.workers."""

  CHUNK = 64          # documents per request
  CHUNKS_PER_WORKER = 4

  def __init__(self, metas, split, workers):
    context = multiprocessing.get_context("spawn")   # never fork a process that runs JAX
    self.pool = context.Pool(workers, _open_documents, (metas, split))
    weakref.finalize(self, self.pool.terminate)   # also when the iterator is just dropped
    self.depth = workers * self.CHUNKS_PER_WORKER
    self.pending = collections.deque()    # (positions, AsyncResult)
    self.ready = collections.deque()      # (position, tokens)
    self.positions = None

  def restart(self, positions):
    """Reads ahead along `positions` (an iterator of the positions to be taken, in order)."""
    self.pending.clear()
    self.ready.clear()
    self.positions = positions

  def take(self, position, stream):
    while len(self.pending) < self.depth:
      chunk = [p for _, p in zip(range(self.CHUNK), self.positions)]
      if not chunk:
        break
      keys = [stream[p] for p in chunk]
      self.pending.append((chunk, self.pool.apply_async(_read_documents, (keys,))))
    if not self.ready:
      if not self.pending:
        return None
      chunk, result = self.pending.popleft()
      self.ready.extend(zip(chunk, result.get()))
    ahead, tokens = self.ready.popleft()
    assert ahead == position, (ahead, position)   # the read-ahead follows _take exactly
    return tokens

  def close(self):
    self.pool.terminate()


def _train_stream(sizes, draw_weights, seed):
  """global position -> (source, document index): each source reshuffled every epoch."""
  streams = []
  for s, size in enumerate(sizes):
    if not size or (draw_weights and not draw_weights[s]):
      continue
    ds = grain.MapDataset.range(size).shuffle(seed=(seed * 7919 + s) % 2**32).repeat()
    streams.append((s, ds))
  if not streams:
    raise PreparedError("the prepared corpus has no train documents")
  mixed = [ds.map(lambda i, s=s: (s, int(i))) for s, ds in streams]
  if len(mixed) == 1:
    return mixed[0]
  return grain.MapDataset.mix(mixed, [draw_weights[s] if draw_weights else sizes[s]
                                      for s, _ in streams])


class _HeldoutStream:
  """global position -> (source, document index): the sources in order, each in order."""

  def __init__(self, sizes):
    self.starts = list(np.cumsum([0, *sizes]))

  def __len__(self):
    return int(self.starts[-1])

  def __getitem__(self, position):
    source = bisect.bisect_right(self.starts, position) - 1
    return source, position - int(self.starts[source])


class PreparedDataset(grain.IterDataset):
  """Batches {tokens, segment_ids, positions} [rows, seq_len] int32 of prepared documents, as
  data.make_dataset gives for raw corpora: [bos] + ids + [eos] per document, segment ids 1, 2,
  ... per piece within a row (0 on padding), positions restarting at 0 at each row start.
  split "train" is infinite; "heldout" reads each held-out document once, in order, and pads
  the last batch with empty rows."""

  def __init__(self, metas, split, seq_len, rows, seed, process_index, process_count,
               bos_id, eos_id, pad_id, mixture=(), workers=0):
    super().__init__()
    self.metas, self.split, self.seq_len, self.rows = metas, split, seq_len, rows
    self.workers = workers
    self.seed, self.process_index, self.process_count = seed, process_index, process_count
    self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
    self.draw_weights = mixture_weights(metas, tuple(mixture)) if split == "train" else None

  def __iter__(self):
    return PreparedIterator(self)


class PreparedIterator(grain.DatasetIterator):

  def __init__(self, dataset: PreparedDataset):
    super().__init__()
    self.ds = dataset
    self.read_ahead = None       # set below; close() may run if _Documents refuses a shard
    self.documents = _Documents(dataset.metas, dataset.split)
    if dataset.split == "train":
      self.stream = _train_stream(self.documents.sizes, dataset.draw_weights, dataset.seed)
    else:
      self.stream = _HeldoutStream(self.documents.sizes)
    self.elastic_from = None     # the process count of an elastic restore
    self.read_ahead = (_ReadAhead(dataset.metas, dataset.split, dataset.workers)
                       if dataset.workers > 0 else None)
    self._reset(base=0, next_position=dataset.process_index, consumed=(),
                lanes=[[] for _ in range(dataset.rows)])

  def _reset(self, base, next_position, consumed, lanes):
    stride, index = self.ds.process_count, self.ds.process_index
    self.base, self.next = base, next_position
    # Global positions ahead that this process must skip: read before an elastic resume.
    self.consumed = sorted(c for c in consumed
                           if c >= next_position and (c - base) % stride == index)
    self.lanes = [[[int(g), int(o), None] for g, o in lane] for lane in lanes]
    if self.read_ahead:
      self.read_ahead.restart(self._positions(self.next, list(self.consumed)))

  def _positions(self, position, consumed):
    """The unread global positions of this process from `position` on, in order."""
    consumed = collections.deque(consumed)
    while self.ds.split == "train" or position < len(self.stream):
      if consumed and consumed[0] == position:
        consumed.popleft()
      else:
        yield position
      position += self.ds.process_count

  def _take(self):
    """The next unread global position of this process, or None at the end of a finite
    stream."""
    while True:
      position = self.next
      if self.ds.split == "heldout" and position >= len(self.stream):
        return None
      self.next += self.ds.process_count
      if self.consumed and self.consumed[0] == position:
        self.consumed.pop(0)
        continue
      return position

  def _document(self, position, fresh):
    """[bos] + ids + [eos] of the document at a global position (`fresh`: taken just now,
    so the read-ahead has it)."""
    if fresh and self.read_ahead:
      ids = self.read_ahead.take(position, self.stream)
    else:
      ids = self.documents.tokens(*self.stream[position])
    return np.concatenate([[self.ds.bos_id], ids, [self.ds.eos_id]]).astype(np.int32)

  def _fill(self, lane, tokens, segments, positions):
    """Packs one row from its lane: the unfinished document first, then new ones."""
    filled, segment = 0, 0
    while filled < self.ds.seq_len:
      if not lane:
        position = self._take()
        if position is None:
          break
        lane.append([position, 0, self._document(position, fresh=True)])
      item = lane[0]
      if item[2] is None:     # restored: an unfinished document, read again
        item[2] = self._document(item[0], fresh=False)
      rest = item[2][item[1]:]
      n = min(len(rest), self.ds.seq_len - filled)
      segment += 1
      tokens[filled:filled + n] = rest[:n]
      segments[filled:filled + n] = segment
      positions[filled:filled + n] = np.arange(n)
      filled += n
      if n < len(rest):
        item[1] += n
      else:
        lane.pop(0)
    return filled

  def __next__(self):
    shape = (self.ds.rows, self.ds.seq_len)
    batch = {"tokens": np.full(shape, self.ds.pad_id, np.int32),
             "segment_ids": np.zeros(shape, np.int32), "positions": np.zeros(shape, np.int32)}
    filled = [self._fill(lane, batch["tokens"][r], batch["segment_ids"][r],
                         batch["positions"][r]) for r, lane in enumerate(self.lanes)]
    if not any(filled):
      raise StopIteration
    return batch

  def get_state(self):
    return {"process_index": self.ds.process_index, "process_count": self.ds.process_count,
            "base": self.base, "next": self.next, "consumed": list(self.consumed),
            "lanes": [[[g, o] for g, o, _ in lane] for lane in self.lanes]}

  def set_state(self, state):
    if state["process_count"] != self.ds.process_count:
      self.set_elastic_state([state])
      return
    self._reset(state["base"], state["next"], state["consumed"], state["lanes"])

  def set_elastic_state(self, states):
    """Continues from the states of *all* processes of a run saved on another number of
    processes: every document any of them began is consumed (the unfinished ones are dealt
    out to the new lanes), every other is read by exactly one new process."""
    old_count = states[0]["process_count"]
    if sorted(s["process_index"] for s in states) != list(range(old_count)):
      raise PreparedError(f"an elastic resume needs the data state of all {old_count} "
                          f"processes of the saved run")
    # Process p read its positions base + p + k * old_count below its `next`, and the
    # `consumed` ones read before; everything below the smallest `next` is read.
    base = min(s["next"] for s in states)
    consumed = {c for s in states for c in s["consumed"] if c >= base}
    for s in states:
      start = s["base"] + s["process_index"]
      first = start + max(0, -(-(base - start) // old_count)) * old_count
      consumed.update(range(first, s["next"], old_count))
    pending = [item for s in sorted(states, key=lambda s: s["process_index"])
               for lane in s["lanes"] for item in lane]
    rows, index = self.ds.rows, self.ds.process_index
    lanes = [[] for _ in range(rows)]
    for i, item in enumerate(pending):   # slot i % (processes x rows), in order
      slot = i % (rows * self.ds.process_count)
      if slot // rows == index:
        lanes[slot % rows].append(item)
    self._reset(base, base + index, consumed, lanes)
    self.elastic_from = old_count

  def close(self):
    if self.read_ahead:
      self.read_ahead.close()
