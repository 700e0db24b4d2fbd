"""Progress lines of long jobs (evo_jax/progress.py)."""
import io

from evo_jax import progress


def test_lines_carry_count_rate_and_eta_then_a_final_line():
  out = io.StringIO()
  with progress.Progress("scoring", total=4, unit="batches", every_s=0.0, stream=out) as p:
    for _ in range(4):
      p.advance()
  lines = out.getvalue().splitlines()
  assert len(lines) == 4                       # after each of the first 3, then the end
  assert lines[0].startswith("scoring: 1/4 batches (25%) | ") and "batches/s | eta " in lines[0]
  assert lines[2].startswith("scoring: 3/4 batches (75%)")
  assert lines[-1].startswith("scoring: 4 batches done in ")


def test_quiet_between_intervals_and_durations_read_well():
  out = io.StringIO()
  p = progress.Progress("x", total=100, every_s=3600.0, stream=out)
  for _ in range(100):
    p.advance()
  assert out.getvalue() == ""
  assert [progress.duration(s) for s in (5, 150, 7200)] == ["5 s", "2.5 min", "2.0 h"]
