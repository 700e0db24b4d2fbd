"""Tokenise a corpus once into ArrayRecord shards that training reads (evo_jax/prepared.py).

    python -m evo_jax.prepare --input 'docs/**/*.md,data.jsonl,table.parquet,hf_saved/' \\
        --tokenizer WORKDIR/tokenizer.model --out prepared/ [--shards 8] [--workers 2]

Inputs, comma-separated: files and globs (a .jsonl file holds one document per line, its
--text_field string; a .parquet file one per row, its --text_field column; any other file is
one document) and Hugging Face `datasets` directories saved with save_to_disk (the arrow files
named by their state.json; name one split of a DatasetDict). Empty documents are dropped.

The documents are listed and checked first, the files read by the worker processes (a bad
file fails before anything is written), split into train and heldout by the stable hash that
raw corpora use, and cut into --shards contiguous shards per split. The workers then tokenise
a shard each and write it under a temporary name, renamed when complete; metadata.json is
written last. A prepare killed at any point and rerun with the same arguments redoes only the
shards not complete and gives byte-identical files; rerun with other arguments, it refuses
(use another --out).
"""
from __future__ import annotations

import argparse
import glob
import json
import multiprocessing
import os
import sys
from typing import NamedTuple

import numpy as np
from etils import epath

from evo_jax import data, paths, prepared
from evo_jax.errors import UserError
from evo_jax.progress import Progress

ARRAY_RECORD_OPTIONS = "group_size:1"   # one record per chunk: cheap random access


class TableRef(NamedTuple):
  """One row of a Parquet file or of a `datasets` arrow file (IPC stream)."""
  path: str
  row: int
  column: str
  kind: str       # parquet | arrow


def _string_column(schema, column, path):
  import pyarrow as pa
  if column not in schema.names:
    raise data.DataError(f"{path} has no column {column!r} (columns: "
                         f"{', '.join(schema.names)}; set --text_field)")
  kind = schema.field(column).type
  if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
    raise data.DataError(f"{path}: column {column!r} is {kind}, not a string column")


def _table_refs(path, column, kind):
  try:
    import pyarrow as pa
    import pyarrow.parquet as pq
  except ImportError:
    raise data.DataError(f"reading {path} needs pyarrow: pip install -e '.[data]'") from None
  try:
    if kind == "parquet":
      meta = pq.ParquetFile(path)
      schema, rows = meta.schema_arrow, meta.metadata.num_rows
    else:
      with pa.memory_map(path) as source:
        table = pa.ipc.open_stream(source).read_all()
      schema, rows = table.schema, table.num_rows
  except (pa.ArrowException, OSError) as e:
    raise data.DataError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
  _string_column(schema, column, path)
  return [(f"{path}:{row + 1}", TableRef(path, row, column, kind)) for row in range(rows)]


def _saved_dataset_files(directory):
  """The arrow files of a `datasets` save_to_disk directory, in order."""
  state = os.path.join(directory, "state.json")
  if not os.path.isfile(state):
    if os.path.isfile(os.path.join(directory, "dataset_dict.json")):
      raise data.DataError(f"{directory} holds a DatasetDict: name one split, e.g. "
                           f"{os.path.join(directory, 'train')}")
    raise data.DataError(f"{directory} is a directory but not a saved `datasets` dataset "
                         f"(no state.json): give its files or a glob instead")
  with open(state) as f:
    return [os.path.join(directory, entry["filename"]) for entry in json.load(f)["_data_files"]]


def list_files(inputs):
  """[(path, kind)] of the comma-separated inputs, each file once, in a fixed order."""
  files, seen = [], set()
  for item in (i.strip() for i in inputs.split(",")):
    if not item:
      continue
    item = os.path.expanduser(item)
    if os.path.isdir(item):
      found = [(path, "arrow") for path in _saved_dataset_files(item)]
    else:
      matches = [p for p in sorted(glob.glob(item, recursive=True)) if os.path.isfile(p)]
      if not matches:
        raise data.DataError(f"input not found: {item}")
      found = [(p, "parquet" if p.endswith(".parquet") else "text") for p in matches]
    for path, kind in found:
      if path not in seen:
        seen.add(path)
        files.append((path, kind))
  return files


def _file_documents(task):
  """[(split key, ref)] of one file's documents; the file is read once to check it."""
  path, kind, text_field = task
  if kind == "text":
    return [(f"{ref.path}:{ref.line}", ref) for ref in data.scan_file(path, text_field)]
  return _table_refs(path, text_field, kind)


def list_documents(inputs, text_field, pool=None):
  """[(split key, ref)] for every document of the comma-separated inputs, in a fixed order;
  the files are read by `pool`'s processes when given (in order: the same list)."""
  tasks = [(path, kind, text_field) for path, kind in list_files(inputs)]
  per_file = pool.imap(_file_documents, tasks, chunksize=8) if pool else map(_file_documents,
                                                                               tasks)
  docs = [doc for file_docs in per_file for doc in file_docs]
  if not docs:
    raise data.DataError(f"no documents in {inputs}")
  return docs


class _Tables:
  """Rows of tabular files, one record batch or row group in memory at a time."""

  def __init__(self):
    self.key, self.rows, self.start = None, [], 0

  def text(self, ref):
    import pyarrow as pa
    import pyarrow.parquet as pq
    if self.key != (ref.path, ref.column) or not self.start <= ref.row < self.start + len(
        self.rows):
      start = 0
      if ref.kind == "parquet":
        pf = pq.ParquetFile(ref.path)
        for group in range(pf.metadata.num_row_groups):
          size = pf.metadata.row_group(group).num_rows
          if ref.row < start + size:
            column = pf.read_row_group(group, columns=[ref.column]).column(0)
            break
          start += size
      else:
        with pa.memory_map(ref.path) as source:
          for batch in pa.ipc.open_stream(source):
            if ref.row < start + batch.num_rows:
              column = batch.column(ref.column)
              break
            start += batch.num_rows
      try:
        self.rows = column.to_pylist()
      except UnicodeDecodeError:
        raise data.DataError(f"invalid UTF-8 in {ref.path}, column {ref.column!r}, rows "
                             f"{start + 1}-{start + len(column)}") from None
      self.key, self.start = (ref.path, ref.column), start
    return self.rows[ref.row - self.start] or ""


_worker = {}


def _init_worker(tokenizer_path):
  _worker["tokenizer"] = data.load_tokenizer(tokenizer_path)
  _worker["tables"] = _Tables()


def _write_shard(task):
  """Tokenises one shard's documents into OUT/name (complete, or not there at all)."""
  out, name, refs = task
  from array_record.python import array_record_module
  tokenizer, tables = _worker["tokenizer"], _worker["tables"]
  final = epath.Path(out) / name
  tmp = final.with_name(f"{name}.tmp")
  writer = array_record_module.ArrayRecordWriter(str(tmp), ARRAY_RECORD_OPTIONS)
  documents = tokens = 0
  try:
    for ref in refs:
      text = tables.text(ref) if isinstance(ref, TableRef) else data.read_document(ref)
      if not text:
        continue
      ids = np.asarray(tokenizer.encode(text), dtype=prepared.TOKEN_DTYPE)
      writer.write(ids.tobytes())
      documents, tokens = documents + 1, tokens + len(ids)
  finally:
    writer.close()
  tmp.replace(final)
  return name, documents, tokens


def _shard_counts(path):
  """(documents, tokens) of a complete shard left by an earlier, interrupted prepare."""
  from array_record.python import array_record_module
  reader = array_record_module.ArrayRecordReader(str(path))
  count = reader.num_records()
  tokens = sum(len(r) for r in reader.read(list(range(count)))) // 4 if count else 0
  reader.close()
  return count, tokens


def _plan(args, docs, tokenizer_sha256):
  keyed = {split: [] for split in prepared.SPLITS}
  for key, ref in docs:
    heldout = data.hash_fraction(key) < args.heldout_fraction
    keyed["heldout" if heldout else "train"].append(ref)
  tasks = []
  for split, refs in keyed.items():
    for k in range(args.shards):
      part = refs[k * len(refs) // args.shards:(k + 1) * len(refs) // args.shards]
      tasks.append((args.out, prepared.shard_name(split, k, args.shards), part))
  plan = {"inputs": args.input, "text_field": args.text_field, "shards": args.shards,
          "heldout_fraction": args.heldout_fraction, "tokenizer_sha256": tokenizer_sha256,
          "listed": {split: len(refs) for split, refs in keyed.items()}}
  return plan, tasks


def _write_json(path, value):
  paths.write_text(path, json.dumps(value, indent=1))   # whole or not at all


def _claim(out, plan):
  """Records the plan in OUT, or checks that OUT holds a prepare of this very plan."""
  out.mkdir(parents=True, exist_ok=True)
  path = out / prepared.PLAN
  if path.exists():
    earlier = json.loads(path.read_text())
    differs = [k for k in sorted(set(plan) | set(earlier)) if plan.get(k) != earlier.get(k)]
    if differs:
      raise data.DataError(f"{out} holds a prepare with other {', '.join(differs)}: use another "
                           f"--out (or remove {out})")
    return
  if any(out.iterdir()):
    raise data.DataError(f"--out {out} is not empty and holds no prepare: use another --out")
  _write_json(path, plan)


def _copy_tokenizer(tokenizer_path, out):
  name = os.path.basename(tokenizer_path) if tokenizer_path.endswith(".json") else (
      data.TOKENIZER_FILE)
  names = [(tokenizer_path, name)]
  config = os.path.join(os.path.dirname(tokenizer_path), data.HF_TOKENIZER_CONFIG)
  if tokenizer_path.endswith(".json") and os.path.isfile(config):
    names.append((config, data.HF_TOKENIZER_CONFIG))
  for source, target in names:
    epath.Path(source).copy(out / f"{target}.tmp", overwrite=True)
    (out / f"{target}.tmp").replace(out / target)
  return name


def prepare(args, log=print):
  tokenizer = data.load_tokenizer(args.tokenizer)
  digest = data.file_sha256(tokenizer.path)
  if args.shards < 1:
    raise data.DataError(f"--shards={args.shards} must be at least 1")
  if not 0.0 <= args.heldout_fraction < 1.0:
    raise data.DataError(f"--heldout_fraction={args.heldout_fraction} must be in [0, 1)")
  out = epath.Path(args.out)
  if (out / prepared.METADATA).exists():   # finished: only the plan is checked (below)
    plan, tasks = _plan(args, list_documents(args.input, args.text_field), digest)
    _claim(out, plan)
    log(f"{args.out} is already prepared")
    return prepared.load_metadata(args.out)
  # One pool of processes lists the files, then tokenises the shards.
  context = multiprocessing.get_context("spawn")   # never fork: JAX may hold threads
  with context.Pool(max(1, args.workers), _init_worker, (tokenizer.path,)) as pool:
    plan, tasks = _plan(args, list_documents(args.input, args.text_field, pool), digest)
    _claim(out, plan)
    counts = {}
    todo = []
    for task in tasks:
      path = out / task[1]
      if path.exists():
        counts[task[1]] = _shard_counts(path)
      else:
        todo.append(task)
    if counts:
      log(f"{len(counts)} of {len(tasks)} shards were complete: preparing the other "
          f"{len(todo)}")
    with Progress(f"preparing {args.out}", len(tasks), "shards") as progress:
      progress.advance(len(counts))
      for name, documents, tokens in pool.imap_unordered(_write_shard, todo):
        counts[name] = (documents, tokens)
        progress.advance()
  splits = {}
  for split in prepared.SPLITS:
    shards = [{"file": name, "documents": counts[name][0], "tokens": counts[name][1]}
              for _, name, _ in tasks if name.startswith(f"{split}-")]
    splits[split] = {"documents": sum(s["documents"] for s in shards),
                     "tokens": sum(s["tokens"] for s in shards), "shards": shards}
  meta = {"format": prepared.FORMAT, "sources": [i.strip() for i in args.input.split(",")
                                                 if i.strip()],
          "tokenizer": os.path.abspath(tokenizer.path), "tokenizer_sha256": digest,
          "tokenizer_file": _copy_tokenizer(tokenizer.path, out),
          "vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.bos_id,
          "eos_id": tokenizer.eos_id, "text_field": args.text_field,
          "heldout_fraction": args.heldout_fraction, "splits": splits}
  _write_json(out / prepared.METADATA, meta)
  total = splits["train"]["tokens"] + splits["heldout"]["tokens"]
  log(f"prepared {splits['train']['documents']:,} train and {splits['heldout']['documents']:,} "
      f"heldout documents ({total:,} tokens) in {args.out}")
  return prepared.load_metadata(args.out)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--input", required=True, help="files, globs and datasets dirs, comma-separated")
  p.add_argument("--tokenizer", required=True,
                 help="a SentencePiece .model or a Hugging Face tokenizer.json (a run's own: "
                      "WORKDIR/tokenizer.model)")
  p.add_argument("--out", required=True, help="the prepared directory (new, or an unfinished one)")
  p.add_argument("--shards", type=int, default=8, help="shards per split")
  p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                 help="tokenising processes (default: one per core)")
  p.add_argument("--text_field", default="text", help="JSONL field / Parquet and arrow column")
  p.add_argument("--heldout_fraction", type=float, default=0.05,
                 help="share of documents held out (must equal the run's data.heldout_fraction)")
  return p.parse_args(argv)


def main(argv=None):
  try:
    prepare(parse_args(argv), log=lambda line: print(line, file=sys.stderr, flush=True))
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  main()
