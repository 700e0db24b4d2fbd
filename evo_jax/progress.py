"""Progress of long jobs: a line on stderr at most every `every_s` seconds with the count, the
rate and the time left, and one line when the job is done.

    with Progress("scoring", total=len(batches), unit="batches") as progress:
      for batch in batches:
        ...
        progress.advance()

prints, for example, `scoring: 12/40 batches (30%) | 1.9 batches/s | eta 15 s`.
"""
import sys
import time


def duration(seconds):
  if seconds < 90:
    return f"{seconds:.0f} s"
  if seconds < 5400:
    return f"{seconds / 60:.1f} min"
  return f"{seconds / 3600:.1f} h"


class Progress:

  def __init__(self, label, total, unit="", every_s=10.0, stream=None):
    self.label, self.total, self.unit, self.every_s = label, total, unit, every_s
    self.stream = stream if stream is not None else sys.stderr
    self.count = 0
    self.start = self.last = time.perf_counter()

  def __enter__(self):
    return self

  def __exit__(self, kind, *_):
    if kind is None:
      self.done()

  def advance(self, n=1):
    self.count += n
    now = time.perf_counter()
    if now - self.last >= self.every_s and self.count < self.total:
      self.last = now
      self._print(self.line(now))

  def line(self, now):
    elapsed = max(now - self.start, 1e-9)
    rate = self.count / elapsed
    unit = f" {self.unit}" if self.unit else ""
    eta = duration((self.total - self.count) / rate) if rate > 0 else "?"
    share = f" ({100 * self.count / self.total:.0f}%)" if self.total else ""
    return (f"{self.label}: {self.count}/{self.total}{unit}{share} | {rate:,.2f}{unit}/s | "
            f"eta {eta}")

  def done(self):
    elapsed = time.perf_counter() - self.start
    unit = f" {self.unit}" if self.unit else ""
    self._print(f"{self.label}: {self.count}{unit} done in {duration(elapsed)}")

  def _print(self, text):
    print(text, file=self.stream, flush=True)
