"""pass@k against the closed form, and real HumanEval problems scored in the sandbox."""
import math

import pytest

from evo_jax import humaneval
from evo_jax.errors import UserError


def test_pass_at_k_hand_made_cases():
  assert humaneval.pass_at_k(5, 2, 1) == pytest.approx(0.4, abs=1e-12)
  assert humaneval.pass_at_k(5, 2, 2) == pytest.approx(0.7, abs=1e-12)  # 1 - C(3,2)/C(5,2)
  assert humaneval.pass_at_k(5, 0, 3) == 0.0
  assert humaneval.pass_at_k(5, 3, 3) == 1.0  # n - c < k: every k-subset holds a correct one
  assert humaneval.pass_at_k(1, 1, 1) == 1.0


def test_pass_at_k_matches_binomials_on_a_grid():
  for n in range(1, 21):
    for c in range(n + 1):
      for k in range(1, n + 1):
        closed_form = 1.0 - math.comb(n - c, k) / math.comb(n, k)
        assert humaneval.pass_at_k(n, c, k) == pytest.approx(closed_form, abs=1e-12)


def test_pass_at_k_bad_input():
  with pytest.raises(UserError, match="1 <= k <= n"):
    humaneval.pass_at_k(3, 1, 4)
  with pytest.raises(UserError, match="0 <= c <= n"):
    humaneval.pass_at_k(3, 4, 1)


@pytest.fixture(scope="module")
def problems():
  return humaneval.load_problems(limit=3)


def test_load_problems(problems):
  assert [p["task_id"] for p in problems] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
  assert problems[0]["entry_point"] == "has_close_elements"
  assert {"prompt", "test", "canonical_solution"} <= set(problems[0])
  assert len(humaneval.load_problems()) == 164


def test_program_for_runs_the_tests(problems):
  program = humaneval.program_for(problems[0], problems[0]["canonical_solution"])
  assert program.startswith(problems[0]["prompt"])
  assert program.rstrip().endswith("check(has_close_elements)")


def test_canonical_solutions_score_one_and_wrong_ones_zero(problems):
  wrong = "    return None\n"
  early_exit = "    import sys\n    sys.exit(0)\n"  # status 0 without running the tests
  completions = [[p["canonical_solution"], wrong, early_exit] for p in problems]
  per_example, metrics = humaneval.score_completions(problems, completions, ks=(1, 2, 3),
                                                     timeout_s=10.0, workers=2)
  for problem, example in zip(problems, per_example):
    assert example["task_id"] == problem["task_id"]
    assert [s["passed"] for s in example["samples"]] == [True, False, False]
    # The early exit's program itself ends with status 0 ("passed"), but not its tests.
    assert [s["status"] for s in example["samples"]] == ["passed", "failed", "passed"]
    assert example["samples"][1]["error"].startswith("AssertionError")
    assert example["samples"][2]["error"] == "exited before the tests finished"
    assert example["samples"][0]["completion"] == problem["canonical_solution"]
    assert example["correct"] == 1
  # n=3, c=1: pass@1 = 1/3, pass@2 = 1 - C(2,2)/C(3,2) = 2/3, pass@3 = 1; the same for every
  # problem, so the standard error is 0.
  assert metrics["pass@1"] == pytest.approx(1 / 3)
  assert metrics["pass@2"] == pytest.approx(2 / 3)
  assert metrics["pass@3"] == 1.0
  assert metrics["pass@1_stderr"] == 0.0


def test_scores_differ_per_problem(problems):
  right, wrong = problems[0]["canonical_solution"], "    return None\n"
  _, metrics = humaneval.score_completions(problems[:2], [[right], [wrong]])
  assert metrics["pass@1"] == 0.5
  assert metrics["pass@1_stderr"] == pytest.approx(math.sqrt(0.5) / math.sqrt(2))


def test_bad_input_is_a_user_error(problems):
  with pytest.raises(UserError, match="2 lists of completions for 3 problems"):
    humaneval.score_completions(problems, [["x"], ["y"]])
  with pytest.raises(UserError, match="pass@2 needs at least 2 samples"):
    humaneval.score_completions(problems[:1], [["x"]], ks=(2,))
  with pytest.raises(UserError, match="non-empty list of strings"):
    humaneval.score_completions(problems[:1], [[]])
  with pytest.raises(UserError, match="limit must be at least 1"):
    humaneval.load_problems(limit=0)
