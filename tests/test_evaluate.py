"""`python -m evo_jax.evaluate` and `python -m evo_jax.tables` on a briefly trained tiny run:
GSM8K answer extraction on the real test file, end-to-end runs that write valid results files,
the tables in the paper's layout, and one-line errors for bad input."""
import csv
import json
import math

import numpy as np
import pytest

import conftest
from conftest import SHARED
from evo_jax import data
from evo_jax import decoding
from evo_jax import evaluate
from evo_jax import humaneval
from evo_jax import run as run_lib
from evo_jax import scoring
from evo_jax import tables

GSM8K = SHARED / "data" / "gsm8k"
CHOICES = [
    {"context": "def add(a, b):\n    return", "choices": [" a + b", " a - b", "!!"], "label": 0},
    {"context": "import os\nimport", "choices": [" sys", " ))(", " re"], "label": 0},
    {"context": "for i in range(10):\n   ", "choices": [" print(i)", " ]]", " pass"], "label": 2},
    {"context": "class Foo", "choices": [":", "(object):", " = 3"], "label": 1},
]


def test_gsm8k_answer_extraction_on_the_gold_solutions():
  records = [json.loads(line) for line in (GSM8K / "test.jsonl").read_text().splitlines()]
  assert len(records) == 1319
  for r in records:
    gold = r["answer"].split("####")[-1].strip()
    target = evaluate.extract_answer(r["answer"])
    assert target is not None and float(target) == float(gold.replace(",", "")), gold
    # the same number written as free text (no '####'): the last number, $ and commas dropped
    reasoning = r["answer"].split("####")[0]
    assert evaluate.extract_answer(f"{reasoning}So the answer is ${gold}.") == target
  cases = {"1,000": "1000", "$5": "5", "18.0": "18", "-3": "-3", "0.50": "0.5", "7.": "7",
           "x": None}
  assert {k: evaluate.normalize_number(k) for k in cases} == cases
  assert evaluate.extract_answer("#### 1,234.00 dollars") == "1234"
  assert evaluate.extract_answer("3 apples and 4 pears make 7") == "7"
  assert evaluate.extract_answer("no number here") is None


def test_bad_input_is_one_line(tmp_path, capsys):
  base = ["--workdir", str(tmp_path / "run"), "--output", str(tmp_path / "out.json")]
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"context": "a", "choices": ["b", "c"], "label": 0}\n\n{"context": oops}\n')
  no_label = tmp_path / "no_label.jsonl"
  no_label.write_text('{"context": "a", "choices": ["b", "c"], "label": 5}\n')
  latin1 = tmp_path / "latin1.jsonl"
  latin1.write_bytes('{"question": "x", "answer": "#### 1"}\n{"question": "caf\u00e9"}\n'
                     .encode("latin-1"))
  (tmp_path / "folder.json").mkdir()
  cases = [
      (["--task", "gsm8k", "--test_file", str(latin1)],
       f"task file {latin1} is not valid UTF-8 (line 2, byte"),
      (["--task", "choice", "--file", str(tmp_path)], f"task file {tmp_path} is a directory"),
      (["--output", str(tmp_path / "folder.json"), "--task", "choice", "--file", str(bad)],
       "--output", "folder.json is a directory: give a file name"),
      (["--task", "mmlu"], "unknown task 'mmlu'", "likelihood, gsm8k, choice, humaneval"),
      (["--task", "gsm8k", "--test_file", str(tmp_path / "none.jsonl")],
       "task file not found", "none.jsonl"),
      (["--task", "choice", "--file", str(bad)], f"{bad} line 3: not valid JSON"),
      (["--task", "choice", "--file", str(no_label)], "line 1: label 5 is not an index"),
      (["--task", "gsm8k", "--test_file", str(bad)], "line 1: field 'question' missing"),
      (["--task", "choice", "--file", str(bad), "--policy.window=3"], "unknown argument"),
      (["--task", "gsm8k", "--test_file", str(GSM8K / "test.jsonl"), "--shots", "2"],
       "--shots > 0 needs --train_file"),
  ]
  for argv, *fragments in cases:
    conftest.one_line_error(capsys, evaluate.main, base + argv, *fragments)
  assert not (tmp_path / "out.json").exists()
  assert not list(tmp_path.glob("*.tmp*"))


def test_generation_lengths_fit_the_model(tiny_run, tmp_path, capsys):
  """A length that leaves no room for a prompt is refused before the checkpoint loads; a task's
  default length is capped to half the context, with a notice."""
  conftest.one_line_error(
      capsys, evaluate.main, ["--workdir", tiny_run, "--output", str(tmp_path / "out.json"),
                              "--task", "gsm8k", "--test_file", str(GSM8K / "test.jsonl"),
                              "--shots", "0", "--max_new_tokens", "64"],
      "--max_new_tokens 64 does not fit the model's context of 64 tokens")
  notices = []
  assert evaluate.generation_length(None, 256, 64, log=notices.append) == 32
  assert notices == ["note: --max_new_tokens is 32, half the model's context of 64 tokens "
                     "(this task's default is 256)"]
  assert evaluate.generation_length(None, 16, 64, log=notices.append) == 16
  assert evaluate.generation_length(63, 256, 64, log=notices.append) == 63 and len(notices) == 1


@pytest.fixture(scope="module")
def results(tiny_run, tmp_path_factory):
  """Results files of the tiny run: GSM8K greedy and sampled (one compilation: the temperature
  is not static), a multiple-choice file."""
  out = tmp_path_factory.mktemp("results")
  choice_file = out / "choice.jsonl"
  choice_file.write_text("".join(json.dumps(c) + "\n" for c in CHOICES))
  gsm = ["--workdir", tiny_run, "--task", "gsm8k", "--test_file", str(GSM8K / "test.jsonl"),
         "--train_file", str(GSM8K / "train.jsonl"), "--shots", "2", "--limit", "3",
         "--max_new_tokens", "8", "--batch_size", "4", "--seed", "1", "--policy", "evo",
         "--policy.window=4"]
  records = {
      "gsm8k_evo": evaluate.main(gsm + ["--output", str(out / "gsm8k_evo.json")]),
      "gsm8k_hot": evaluate.main(gsm + ["--output", str(out / "gsm8k_hot.json"),
                                        "--temperature", "0.8"]),
      "humaneval": evaluate.main([     # one problem: a score without a standard error
          "--workdir", tiny_run, "--task", "humaneval", "--limit", "1", "--n_samples", "2",
          "--k", "1,2", "--max_new_tokens", "8", "--temperature", "0.8", "--policy", "ar",
          "--output", str(out / "humaneval.json")]),
      "choice": evaluate.main(["--workdir", tiny_run, "--task", "choice", "--file",
                               str(choice_file), "--benchmark", "ARC-C", "--batch_size", "4",
                               "--output", str(out / "choice.json")]),
  }
  return out, choice_file, records


def test_gsm8k_end_to_end(results):
  out, _, records = results
  r = json.loads((out / "gsm8k_evo.json").read_text())
  assert r == json.loads(json.dumps(records["gsm8k_evo"]))
  assert r["task"] == "gsm8k" and r["benchmark"] == "GSM8K" and r["n_examples"] == 3
  assert r["checkpoint"]["step"] == 4 and r["tokenizer"].endswith("tokenizer.model")
  assert r["shots"] == 2 and len(r["fewshot_lines"]) == 2 and r["seed"] == 1
  assert r["policy"] == "evo" and r["policy_settings"]["window"] == 4
  assert r["temperature"] == 0.0 and r["max_new_tokens"] == 8
  correct = [e["correct"] for e in r["examples"]]
  assert r["metric"]["value"] == pytest.approx(np.mean(correct))
  assert r["metric"]["stderr"] == pytest.approx(np.std(correct, ddof=1) / math.sqrt(3))
  assert r["score"] == pytest.approx(100 * r["metric"]["value"])
  # The completions are what the decoding loop makes of the few-shot prompts, built here from
  # the files: the shots the record names, each question, [bos], cut from the left to leave
  # room for 8 new tokens, the three prompts and a repeat of the first in one batch of 4.
  lines = (GSM8K / "train.jsonl").read_text().splitlines()
  shots = [json.loads(lines[n - 1]) for n in r["fewshot_lines"]]
  tests = [json.loads(line) for line in (GSM8K / "test.jsonl").read_text().splitlines()[:3]]
  run = run_lib.load_run(r["checkpoint"]["workdir"])
  tok = run.tokenizer
  prompts = [([tok.bos_id] + tok.encode(evaluate.gsm8k_prompt(shots, t["question"])))[-(64 - 8):]
             for t in tests]
  samples = decoding.generate(run.model, run.params, run.schedule, prompts + prompts[:1],
                              decoding.make_policy("evo", window=4), max_new_tokens=8,
                              context=64, eos_id=tok.eos_id, seed=1)
  for e, t, sample in zip(r["examples"], tests, samples):
    text = tok.decode(sample.tokens)
    cut = min([text.find(s) for s in evaluate.GSM8K_STOPS if s in text] + [len(text)])
    assert e["completion"] == text[:cut] and e["tokens"] == len(sample.tokens)
    assert e["target"] == evaluate.extract_answer(t["answer"])
    assert e["prediction"] == evaluate.extract_answer(text[:cut])
    assert e["correct"] == (e["prediction"] == e["target"])
    assert e["nfe"] == sample.nfe and e["prompt_tokens_dropped"] > 0
  d = r["decoding"]
  assert d["tokens_per_forward"] == pytest.approx(sum(e["tokens"] for e in r["examples"]) /
                                                  sum(e["nfe"] for e in r["examples"]))
  hot = records["gsm8k_hot"]
  assert hot["temperature"] == 0.8 and hot["n_examples"] == 3 and hot["decoding"]["nfe"] >= 1


def test_humaneval_end_to_end(results):
  """Sampled completions of a real problem, run in the sandbox: pass@k from the per-sample
  verdicts, with every setting recorded (one problem: no standard error)."""
  out, _, records = results
  r = json.loads((out / "humaneval.json").read_text())
  assert r == json.loads(json.dumps(records["humaneval"]))
  assert r["task"] == "humaneval" and r["n_examples"] == 1 and r["policy"] == "ar"
  assert r["temperature"] == 0.8 and r["max_new_tokens"] == 8
  assert r["metric"]["stderr"] is None and r["score_stderr"] is None
  problems = humaneval.load_problems(limit=1)
  assert [e["task_id"] for e in r["examples"]] == [p["task_id"] for p in problems]
  per_problem = []
  for e in r["examples"]:
    assert len(e["samples"]) == 2
    assert all(s["status"] in ("passed", "failed", "timeout", "killed") for s in e["samples"])
    per_problem.append(sum(s["passed"] for s in e["samples"]))
  for k in (1, 2):
    expected = np.mean([humaneval.pass_at_k(2, c, k) for c in per_problem])
    assert r["metrics"][f"pass@{k}"] == pytest.approx(expected)
  assert r["metric"] == {"name": "pass@1", "value": r["metrics"]["pass@1"],
                         "stderr": r["metrics"]["pass@1_stderr"]}


def test_choice_scores_and_metrics(results, tiny_run):
  """Each choice's log-likelihood is the scorer's for `[bos] + context` then the choice's
  tokens, scored here one pair at a time; the predictions and accuracies follow from them."""
  _, _, records = results
  r = records["choice"]
  assert r["benchmark"] == "ARC-C" and r["policy"] == "ar-path" and r["n_examples"] == 4
  run = run_lib.load_run(tiny_run)
  scorer = scoring.Scorer(run.model, run.params, run.context, batch_size=1)
  tok = run.tokenizer
  hits, hits_norm = [], []
  for e, c in zip(r["examples"], CHOICES):
    logprobs = [scorer.score([([tok.bos_id] + tok.encode(c["context"]), tok.encode(x))])[0].logprob
                for x in c["choices"]]
    np.testing.assert_allclose(e["logprobs"], logprobs, rtol=1e-5, atol=1e-5)
    per_byte = [lp / len(x.encode()) for lp, x in zip(logprobs, c["choices"])]
    assert e["prediction"] == int(np.argmax(logprobs))
    assert e["prediction_norm"] == int(np.argmax(per_byte))
    hits.append(int(np.argmax(logprobs)) == c["label"])
    hits_norm.append(int(np.argmax(per_byte)) == c["label"])
  assert r["metrics"]["acc"] == np.mean(hits) and r["metrics"]["acc_norm"] == np.mean(hits_norm)
  assert r["score"] == pytest.approx(100 * np.mean(hits_norm))


def test_likelihood_on_files(tiny_run, tmp_path):
  docs = ["def f(x):\n    return x + 1\n" * 6, "import os\nprint(os.getcwd())\n"]
  (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
  r = evaluate.main(["--workdir", tiny_run, "--task", "likelihood", "--corpus",
                     str(tmp_path / "docs.jsonl"), "--windows", "1,-1", "--batch_size", "4",
                     "--output", str(tmp_path / "lik.json")])
  tok = data.Tokenizer(r["tokenizer"])
  counts = [len(tok.encode(d)) + 1 for d in docs]               # ids and eos, after bos
  assert [e["tokens"] for e in r["examples"]] == counts and r["metrics"]["tokens"] == sum(counts)
  nats = -sum(e["logprob"] for e in r["examples"]) / sum(counts)
  assert r["metrics"]["bits_per_token"] == pytest.approx(nats / math.log(2))
  assert r["metrics"]["perplexity"] == pytest.approx(math.exp(nats))
  for w in ("1", "L"):      # the names of metrics.jsonl (evo_jax/measure.py)
    parts = sum(r["metrics"][f"bound_w{w}_{t}_bpt"] for t in ("diffusion", "recon", "prior"))
    total = r["metrics"][f"bound_w{w}_bpt"]
    assert total == pytest.approx(parts) and total > 0


def test_tables_in_the_papers_layout(results, tmp_path):
  out, _, _ = results
  tables.main([str(out / n) for n in ("gsm8k_evo.json", "gsm8k_hot.json", "choice.json",
                                      "humaneval.json")] + ["--out", str(tmp_path)])
  with open(tmp_path / "benchmarks.csv") as f:
    rows = list(csv.reader(f))
  run = rows[0][-1]
  assert rows[0] == ["Benchmark", "LLaDA 8B", "LLaMA3 8B", "Qwen2.5 7B", "Evo 8B", run]
  assert run.endswith("@4") and len(rows) == 16                  # the 15 benchmarks of LLaDA
  by_name = {row[0]: row for row in rows[1:]}
  assert by_name["GSM8K (4-shot)"][1:4] == ["70.7", "53.1", "85.4"]
  assert by_name["GSM8K (4-shot)"][5].endswith("(2-shot)")      # ran with 2 shots, not 4
  assert by_name["ARC-C (0-shot)"][1:5] == ["47.9", "53.1", "63.7", "65.6"]
  assert "±" in by_name["ARC-C (0-shot)"][5] and "shot" not in by_name["ARC-C (0-shot)"][5]
  assert by_name["MMLU (5-shot)"][5] == ""
  humaneval_score = json.loads((out / "humaneval.json").read_text())["score"]
  assert by_name["HumanEval (0-shot)"][5] == f"{humaneval_score:.1f}"   # one problem: no ±
  with open(tmp_path / "decoding.csv") as f:
    decoding = list(csv.DictReader(f))
  assert [d["policy"] for d in decoding] == ["evo", "evo", "ar"]
  assert decoding[0]["settings"].startswith("W=4 ") and float(decoding[0]["tokens/forward"]) >= 1
  with open(tmp_path / "ablation-gsm8k.csv") as f:
    ablation = list(csv.reader(f))
  assert ablation[0] == ["run", "temperature", "score"]           # the one setting that differs
  assert [row[1] for row in ablation[1:]] == ["0.0", "0.8"]
  assert (tmp_path / "score_vs_speed.png").stat().st_size > 0
  assert "## Benchmarks" in (tmp_path / "tables.md").read_text()
