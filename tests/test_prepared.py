"""Reading prepared data (evo_jax/prepared.py): processes read disjoint documents; mixtures
give each source its share of tokens; a state restored on the same number of processes
continues exactly, on another number neither repeats nor skips a token; worker processes
change nothing. The documents are synthetic: token k of document d of source s is
s * 10**6 + d * 1000 + k, so every token says where it came from."""
import collections
import json
import os
import types

import numpy as np
import pytest

from evo_jax import prepared

SEQ_LEN = 16
BOS, EOS = -1, -2


def write_source(root, lengths, source, heldout=4):
  """A prepared directory in the format prepare writes, with 2 shards per split."""
  from array_record.python import array_record_module
  os.makedirs(root)
  splits = {}
  for split, lens in (("train", lengths), ("heldout", lengths[:heldout])):
    shards = []
    for k in range(2):
      docs = range(k * len(lens) // 2, (k + 1) * len(lens) // 2)
      name = prepared.shard_name(split, k, 2)
      writer = array_record_module.ArrayRecordWriter(os.path.join(root, name), "group_size:1")
      for d in docs:
        tokens = source * 10**6 + d * 1000 + np.arange(lens[d])
        writer.write(tokens.astype(prepared.TOKEN_DTYPE).tobytes())
      writer.close()
      shards.append({"file": name, "documents": len(docs),
                     "tokens": int(sum(lens[d] for d in docs))})
    splits[split] = {"documents": len(lens), "tokens": int(sum(lens)), "shards": shards}
  meta = {"format": prepared.FORMAT, "tokenizer_sha256": "-", "heldout_fraction": 0.05,
          "splits": splits}
  with open(os.path.join(root, prepared.METADATA), "w") as f:
    json.dump(meta, f)
  return prepared.load_metadata(root)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  """Source 1: 600 documents of 1-60 tokens; source 2: 600 of 100-300 tokens."""
  root = tmp_path_factory.mktemp("prepared")
  rng = np.random.default_rng(0)
  return [write_source(str(root / "short"), rng.integers(1, 60, 600).tolist(), 1),
          write_source(str(root / "long"), rng.integers(100, 300, 600).tolist(), 2)]


def iterator(metas, process_index=0, process_count=1, rows=4, split="train", **kw):
  ds = prepared.PreparedDataset(metas, split, SEQ_LEN, rows, 0, process_index, process_count,
                                bos_id=BOS, eos_id=EOS, pad_id=0, **kw)
  return iter(ds)


def tokens_of(batches):
  return [int(t) for b in batches for t in b["tokens"].ravel() if t > 0]


def take(it, n):
  return [next(it) for _ in range(n)]


def test_rows_are_packed_documents(sources):
  batch = next(iterator(sources[:1]))
  for tokens, segments, positions in zip(batch["tokens"], batch["segment_ids"],
                                         batch["positions"]):
    assert segments[0] == 1 and (np.diff(segments) >= 0).all()
    for s in set(segments.tolist()) - {0}:
      piece = tokens[segments == s]
      np.testing.assert_array_equal(positions[segments == s], np.arange(len(piece)))
      body = piece[(piece != BOS) & (piece != EOS)]
      assert len({int(t) // 1000 for t in body}) <= 1          # one document per segment
      np.testing.assert_array_equal(np.diff(body), 1)          # its tokens in order


def test_processes_read_disjoint_documents_that_make_the_global_batch(sources):
  its = [iterator(sources, p, 2) for p in range(2)]
  read = [tokens_of(take(it, 30)) for it in its]
  docs = [{t // 1000 for t in r} for r in read]
  assert not docs[0] & docs[1]
  # Together they read the global stream's documents: every one below the smaller `next`.
  begun = min(it.get_state()["next"] for it in its)
  stream = its[0].stream
  want = {(stream[g][0] + 1) * 1000 + stream[g][1] for g in range(begun)}
  assert want <= docs[0] | docs[1]


def test_mixture_gives_each_source_its_share_of_tokens(sources):
  """Over 250 batches of 8 rows (32,000 tokens), within 0.03 of the weight; without a
  mixture, the short-document source would get its share of documents (half) but a tenth of
  the tokens."""
  for weights in ((0.5, 0.5), (0.8, 0.2)):
    read = tokens_of(take(iterator(sources, rows=8, mixture=weights), 250))
    share = sum(t < 2 * 10**6 for t in read) / len(read)
    assert abs(share - weights[0]) < 0.03, (weights, share)
  read = tokens_of(take(iterator(sources, rows=8), 250))
  assert sum(t < 2 * 10**6 for t in read) / len(read) < 0.2
  assert all(t < 2 * 10**6 for t in tokens_of(take(iterator(sources, mixture=(1.0, 0.0)), 50)))


def test_state_on_the_same_processes_continues_exactly(sources):
  it = iterator(sources, 1, 2)
  take(it, 7)
  state = json.loads(json.dumps(it.get_state()))      # as the checkpoint saves it
  after = take(it, 5)
  restored = iterator(sources, 1, 2)
  restored.set_state(state)
  for a, b in zip(after, take(restored, 5)):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize("old,new", [(2, 1), (1, 2), (2, 3)])
def test_elastic_resume_neither_repeats_nor_skips(sources, old, new):
  """Saved by `old` processes (each 4 rows) after 9 batches, resumed on `new` (3 rows each):
  every token read at most once, and every document of the stream begun before the resumed
  run's position read whole."""
  its = [iterator(sources, p, old) for p in range(old)]
  read = [t for it in its for t in tokens_of(take(it, 9))]
  states = [json.loads(json.dumps(it.get_state())) for it in its]
  resumed = [iterator(sources, q, new, rows=3) for q in range(new)]
  for it in resumed:
    it.set_elastic_state(states)
  read += [t for it in resumed for t in tokens_of(take(it, 30))]
  counts = collections.Counter(read)
  assert max(counts.values()) == 1
  unfinished = {g for it in resumed for lane in it.get_state()["lanes"] for g, _ in lane}
  stream = its[0].stream
  lengths = collections.Counter(t // 1000 for t in read)
  for g in range(min(it.get_state()["next"] for it in resumed)):
    if g in unfinished:
      continue
    source, index = stream[g]
    meta = sources[source]
    assert lengths[(source + 1) * 1000 + index] == doc_length(meta, index), g


def doc_length(meta, index):
  from array_record.python import array_record_module
  sizes = [s["documents"] for s in meta["splits"]["train"]["shards"]]
  shard = 0
  while index >= sizes[shard]:
    index, shard = index - sizes[shard], shard + 1
  reader = array_record_module.ArrayRecordReader(
      os.path.join(meta["path"], meta["splits"]["train"]["shards"][shard]["file"]))
  return len(reader.read([index])[0]) // 4


def test_heldout_is_every_document_once_and_workers_change_nothing(sources):
  read = [t for p in range(2)
          for t in tokens_of(list(iterator(sources, p, 2, split="heldout")))]
  assert sorted(read) == sorted(s * 10**6 + d * 1000 + k for s, meta in enumerate(sources, 1)
                                for d in range(4) for k in range(doc_length(meta, d)))
  plain, ahead = iterator(sources, mixture=(0.3, 0.7)), iterator(sources, mixture=(0.3, 0.7),
                                                                  workers=2)
  try:
    for _ in range(2):      # before and after a restore
      for a, b in zip(take(plain, 20), take(ahead, 20)):
        for key in a:
          np.testing.assert_array_equal(a[key], b[key])
      ahead.set_state(plain.get_state())
  finally:
    ahead.close()


def test_checkpoints_hand_other_process_counts_to_the_elastic_state(tmp_path, monkeypatch,
                                                                     sources):
  """A checkpoint saved by 1 process, restored where it sees 2: a prepared iterator gets every
  saved state through set_elastic_state; a raw corpus's iterator is refused in one line."""
  import jax
  import jax.numpy as jnp
  from evo_jax import checkpoint, data
  corpus = tmp_path / "raw.txt"
  corpus.write_text("def f():\n  return 1\n" * 50)
  tokenizer = types.SimpleNamespace(encode=lambda text: [5] * len(text), bos_id=2, eos_id=3)
  raw = iter(data.make_dataset(str(corpus), "train", tokenizer, SEQ_LEN, 2, seed=0,
                               heldout_fraction=0.0))
  ckpts = checkpoint.RunCheckpoints(str(tmp_path / "run"), async_save=False)
  state = {"w": jnp.arange(3.0)}
  it = iterator(sources)
  take(it, 3)
  ckpts.save(1, state, it, {})
  ckpts.save(2, state, raw, {})
  ckpts.wait()
  class TwoProcesses:       # jax as checkpoint.py sees it, on (say) a larger slice
    process_count = staticmethod(lambda: 2)

    def __getattr__(self, name):
      return getattr(jax, name)

  monkeypatch.setattr(checkpoint, "jax", TwoProcesses())
  resumed = iterator(sources, 1, 2)
  ckpts.restore(1, jax.eval_shape(lambda: state), resumed)
  assert resumed.elastic_from == 1 and resumed.get_state()["next"] == it.get_state()["next"] + 1
  with pytest.raises(checkpoint.CheckpointError, match="saved by 1 process, and the data "
                     "position of a raw corpus resumes only on as many .this run has 2."):
    ckpts.restore(2, jax.eval_shape(lambda: state), raw)
  ckpts.close()
