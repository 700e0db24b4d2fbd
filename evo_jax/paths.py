"""Where a run's files live: a local folder, or a bucket (gs://, s3://) one string away.

Every file of a workdir is read and written through etils.epath, as Orbax and Grain do. An
object store differs from a disk in three ways that this module hides from the rest:
- a write replaces an object whole, or not at all: no temporary file and rename is needed
  (on a disk, `write_bytes` writes a temporary file and renames it);
- nothing can be appended to: a `LineLog` on a bucket keeps its lines and rewrites the object
  at each line (on a disk it appends);
- nothing can be created exclusively: `create_exclusive` on a bucket checks, writes and reads
  back, which two writers racing within the same second can both pass (on a disk, O_EXCL)."""
import os

from etils import epath


def is_remote(path) -> bool:
  """A bucket's path (gs://bucket/dir), as opposed to a local one."""
  return "://" in os.fspath(path)


def path(p) -> epath.Path:
  """p as an epath.Path; local paths made absolute (Orbax asks for that), ~ expanded."""
  if is_remote(p):
    return epath.Path(os.fspath(p))
  return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(p))))


def write_bytes(p, data: bytes):
  """Writes `p` whole or not at all, making its folder: a failed write leaves the old file."""
  p = path(p)
  p.parent.mkdir(parents=True, exist_ok=True)
  if is_remote(p):
    p.write_bytes(data)
    return
  tmp = p.parent / f"{p.name}.tmp{os.getpid()}"   # a writer's own: no other rename takes it
  try:
    tmp.write_bytes(data)
    os.replace(tmp, p)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise


def write_text(p, text: str):
  write_bytes(p, text.encode("utf-8"))


def create_exclusive(p, text: str) -> bool:
  """Creates `p` holding `text` if it does not exist; False if it does."""
  p = path(p)
  if is_remote(p):
    if p.exists():
      return False
    p.write_text(text)
    return p.read_text() == text
  try:
    fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, "w") as f:
    f.write(text)
  return True


class LineLog:
  """A text file that grows a line at a time (metrics.jsonl, batches/*.jsonl): each line is
  in the file once `append` returns."""

  def __init__(self, p):
    self.path = path(p)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    if is_remote(self.path):
      self._lines = self.path.read_text() if self.path.exists() else ""
      self._file = None
    else:
      self._file = open(self.path, "a", encoding="utf-8")

  def append(self, line: str):
    if self._file is None:
      self._lines += line + "\n"
      self.path.write_text(self._lines)
    else:
      self._file.write(line + "\n")
      self._file.flush()

  def close(self):
    if self._file is not None:
      self._file.close()
