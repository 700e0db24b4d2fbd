"""The lm-evaluation-harness model (evo_jax/harness.py), offline, on a task defined here: a YAML
multiple-choice task over a local JSONL file. Its log-likelihoods must be those of
`evaluate --task choice` on the same file."""
import glob
import json
import os
import subprocess
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from evo_jax import evaluate  # noqa: E402

QUESTIONS = [
    {"context": "def add(a, b):\n    return", "choices": [" a + b", " a - b", "!!"], "label": 0},
    {"context": "import os\nimport", "choices": [" sys", " ))(", " re"], "label": 2},
    {"context": "while True:\n   ", "choices": [" break", " ]]"], "label": 0},
]
TASK_YAML = """task: evo_local_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def lm(tiny_run):
  from evo_jax import harness
  return harness.EvoLM(workdir=tiny_run, policy="ar", batch_size=4)


def lm_eval_command():
  """The `lm_eval` console script of this environment (where pip put it, beside python)."""
  script = os.path.join(os.path.dirname(sys.executable), "lm_eval")
  return [script] if os.path.exists(script) else [sys.executable, "-m", "lm_eval"]


def test_bare_lm_eval_command_loglikelihoods_equal_evaluate_choice(tiny_run, tmp_path):
  """`lm_eval --model evo_jax` as a user types it: the model is found through the
  evo_jax_lm_eval.pth that setup.py installs (evo_jax/lm_eval_plugin.py)."""
  data = tmp_path / "questions.jsonl"
  data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
  tasks = tmp_path / "tasks"
  tasks.mkdir()
  (tasks / "task.yaml").write_text(TASK_YAML.format(path=data))
  ours = evaluate.main(["--workdir", tiny_run, "--task", "choice", "--file", str(data),
                        "--batch_size", "4", "--output", str(tmp_path / "choice.json")])
  proc = subprocess.run(
      lm_eval_command() + ["--model", "evo_jax", "--model_args", f"workdir={tiny_run},policy=ar",
                           "--tasks", "evo_local_choice", "--include_path", str(tasks),
                           "--batch_size", "4", "--log_samples",
                           "--output_path", str(tmp_path / "out")],
      capture_output=True, text=True, cwd=tmp_path, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  [samples_file] = glob.glob(str(tmp_path / "out" / "**" / "samples_*.jsonl"), recursive=True)
  [results_file] = glob.glob(str(tmp_path / "out" / "**" / "results_*.json"), recursive=True)
  samples = sorted(map(json.loads, open(samples_file)), key=lambda s: s["doc_id"])
  assert len(samples) == len(QUESTIONS)
  for s, ex in zip(samples, ours["examples"]):
    assert [float(r[0][0]) for r in s["resps"]] == pytest.approx(ex["logprobs"], rel=1e-5,
                                                                abs=1e-5)
    assert [r[0][1] in (True, "True") for r in s["resps"]] == ex["is_greedy"]
  results = json.load(open(results_file))["results"]["evo_local_choice"]
  assert results["acc,none"] == pytest.approx(ours["metrics"]["acc"])


def test_simple_evaluate_after_import(tiny_run, lm, tmp_path):
  """From Python, `import evo_jax.harness` registers the model for lm_eval.simple_evaluate."""
  import lm_eval
  from lm_eval.api.registry import get_model
  from lm_eval.tasks import TaskManager
  from evo_jax import harness
  assert get_model("evo_jax") is harness.EvoLM
  data = tmp_path / "questions.jsonl"
  data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS[:1]))
  (tmp_path / "task.yaml").write_text(TASK_YAML.format(path=data))
  out = lm_eval.simple_evaluate(model="evo_jax", model_args=f"workdir={tiny_run},policy=ar",
                                tasks=["evo_local_choice"], batch_size=4, log_samples=True,
                                task_manager=TaskManager(include_path=str(tmp_path)))
  [sample] = out["samples"]["evo_local_choice"]
  pairs = [evaluate.encode_pair(lm.tokenizer, QUESTIONS[0]["context"], c)
           for c in QUESTIONS[0]["choices"]]
  assert [r[0][0] for r in sample["resps"]] == pytest.approx(
      [s.logprob for s in lm.scorer.score(pairs)], rel=1e-6, abs=1e-6)


def request(kind, *args):
  from lm_eval.api.instance import Instance
  return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_generate_until_honours_stops_and_length(lm):
  prompt = "def main():\n    "
  full, short = lm.generate_until([request("generate_until", prompt, {"max_gen_toks": 12}),
                                   request("generate_until", prompt, {"max_gen_toks": 4})])
  assert short and full.startswith(short) and len(short) < len(full)
  # Its 4 tokens (re-encoding the text is no count: a piece may be half a UTF-8 character).
  [c] = evaluate.complete(lm.run, [prompt], lm.policy, max_new_tokens=4)[0]
  assert c.tokens == 4 and c.text == short
  stop = full[len(full) // 2]                     # a character the greedy text does contain
  [cut] = lm.generate_until([request("generate_until", prompt,
                                     {"until": [stop], "max_gen_toks": 12})])
  assert cut == full[:full.index(stop)]


def test_loglikelihood_rolling(lm):
  short = "x = 1\n"
  [rolling] = lm.loglikelihood_rolling([request("loglikelihood_rolling", short)])
  [(whole, _)] = lm.loglikelihood([request("loglikelihood", "", short)])
  assert rolling == pytest.approx(whole, abs=1e-5)               # one window: no context lost
  long_text = "for i in range(3):\n    print(i)\n" * 12           # several windows of 64 tokens
  ids = lm.tokenizer.encode(long_text)
  assert len(ids) > 64
  [total] = lm.loglikelihood_rolling([request("loglikelihood_rolling", long_text)])
  # The first window is the first 63 tokens after [bos]; every later token adds a log-prob < 0.
  [first] = lm.scorer.score([([lm.tokenizer.bos_id], ids[:63])])
  assert total < first.logprob < 0
