"""Evaluating a trained run: `python -m evo_jax.evaluate --workdir DIR --task TASK [options]
--output results.json`.

Tasks (registered in TASKS as Task(add its options, read its input, run it)):

  likelihood  AR-path log-likelihood of documents (the run's held-out split, or --corpus
              files/globs): perplexity and bits per token (each token scored once, with as much
              preceding text as fits, see scoring.rolling_pairs), and the window-W variational
              bound (loss.make_bound) for --windows W,... (-1: the whole row).
  gsm8k       --test_file JSONL ({"question", "answer"}), few-shot prompts from --train_file,
              generation with a decoding policy, the number after "####" (else the last number
              in the text) against the reference's: accuracy.
  choice      --file JSONL, one multiple-choice question a line: {"context": str, "choices":
              [str, ...], "label": index of the right choice}. Each choice is scored as a
              continuation of the context by its AR-path log-likelihood: accuracy of the best
              raw log-likelihood (acc) and of the best per byte of the choice (acc_norm).
  humaneval   pass@k of sampled completions, run in a sandbox (evo_jax/humaneval.py).

Common options: --seed, --limit N (the first N examples), --batch_size. Generation tasks:
--policy NAME, --temperature, --top_p, --max_new_tokens, --policy.SETTING=VALUE (as sample.py).

The results file records the checkpoint (workdir, step), its config, the tokenizer, the task and
its options, shots, the policy and its settings, temperature, seed, the number of examples,
every example's output, the metric with its standard error (`score`: the metric in percent, the
unit of the paper's table) and, for generation, NFE, tokens per forward and tokens per second.
"""
import dataclasses
import itertools
import json
import math
import os
import random
import re
import sys
import time
from decimal import Decimal, InvalidOperation
from typing import Callable, NamedTuple

import jax
import numpy as np

from evo_jax import backend
from evo_jax import cli
from evo_jax import data
from evo_jax import decoding
from evo_jax import files
from evo_jax import humaneval
from evo_jax import measure
from evo_jax import paths
from evo_jax import run as run_lib
from evo_jax import scoring
from evo_jax.errors import UserError
from evo_jax.progress import Progress


class EvalError(UserError):
  pass


class Task(NamedTuple):
  add_args: Callable       # (parser) -> None: the task's own options
  read: Callable           # (args) -> examples: reads and checks the input before the run loads
  run: Callable            # (run, args, examples) -> dict of results
  generates: bool = False  # takes a decoding policy


# What the scored tasks decode with: the AR path (latent stream at W = 1, t = 1), no sampling.
AR_PATH = {"policy": "ar-path", "policy_settings": {"window": 1, "t": 1.0}}


# ---------------------------------------------------------------------------------------------
# Shared pieces: input files, statistics, generation
# ---------------------------------------------------------------------------------------------


def read_jsonl(path, fields):
  """The records of a JSONL file, each a dict with `fields` ({name: type}); a one-line error
  names the file and line of anything else."""
  records = []
  for n, line in enumerate(files.read_text(path, "task file").splitlines(), start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except ValueError:
      raise EvalError(f"{path} line {n}: not valid JSON") from None
    if not isinstance(record, dict):
      raise EvalError(f"{path} line {n}: expected a JSON object")
    for name, kind in fields.items():
      if not isinstance(record.get(name), kind) or isinstance(record.get(name), bool):
        raise EvalError(f"{path} line {n}: field {name!r} missing or not {kind.__name__}")
    record["_line"] = n
    records.append(record)
  if not records:
    raise EvalError(f"{path}: no examples")
  return records


def mean_stderr(values):
  """(mean, standard error of the mean) of per-example values; the standard error is None for
  one example (as humaneval.score_completions gives it)."""
  x = np.asarray(values, np.float64)
  se = float(np.std(x, ddof=1) / math.sqrt(len(x))) if len(x) > 1 else None
  return float(np.mean(x)), se


def percent(stderr):
  return None if stderr is None else 100 * stderr


def few_shot(train, shots, seed):
  """The same `shots` training examples for every question, drawn by the seed."""
  if shots > len(train):
    raise EvalError(f"--shots {shots} but the train file has {len(train)} examples")
  return random.Random(seed).sample(train, shots)


@dataclasses.dataclass
class Completion:
  text: str            # cut before the first stop sequence
  tokens: int          # new tokens generated (all of them, also those after a stop sequence)
  nfe: int
  stop_reason: str     # stop | eos | length | context
  dropped: int         # prompt tokens dropped from the left to fit the model's context


def complete(run, texts, policy, *, max_new_tokens, temperature=0.0, top_p=1.0, seed=0,
             batch_size=16, stops=()):
  """Continues each text ([bos] + its tokens, left-truncated to leave max_new_tokens of the
  context) under `policy`; each batch has batch_size rows (the last one padded) so that its
  compilation is reused. Returns ([Completion], seconds of decoding)."""
  run.check_policy(policy)
  context = run.context
  if not 1 <= max_new_tokens < context:
    raise EvalError(f"max_new_tokens must be in [1, {context - 1}] (the model's context is "
                    f"{context}), got {max_new_tokens}")
  tok = run.tokenizer
  room = context - max_new_tokens
  prompts = [[tok.bos_id] + tok.encode(t) for t in texts]
  dropped = [max(0, len(p) - room) for p in prompts]
  prompts = [p[d:] for p, d in zip(prompts, dropped)]
  out, seconds = [], 0.0
  starts = range(0, len(prompts), batch_size)
  progress = Progress("generating", len(starts), "batches")
  for first in starts:
    chunk = prompts[first:first + batch_size]
    padded = chunk + [chunk[0]] * (batch_size - len(chunk))
    samples = decoding.generate(run.model, run.params, run.schedule, padded, policy,
                               max_new_tokens=max_new_tokens, context=context,
                               eos_id=tok.eos_id, temperature=temperature, top_p=top_p,
                               seed=seed + first)
    seconds += samples[0].seconds
    for i, s in enumerate(samples[:len(chunk)]):
      text, reason = cut_at_stop(tok.decode(s.tokens), stops)
      out.append(Completion(text, len(s.tokens), s.nfe, reason or s.stop_reason,
                            dropped[first + i]))
    progress.advance()
  progress.done()
  return out, seconds


def cut_at_stop(text, stops):
  """(text before the first stop sequence, "stop" or None)."""
  cuts = [i for i in (text.find(s) for s in stops if s) if i >= 0]
  return (text[:min(cuts)], "stop") if cuts else (text, None)


def decoding_stats(completions, seconds):
  tokens = sum(c.tokens for c in completions)
  nfe = sum(c.nfe for c in completions)
  n = max(len(completions), 1)
  return {"nfe": nfe / n, "tokens_per_forward": tokens / max(nfe, 1),
          "tokens_per_sec": tokens / max(seconds, 1e-9), "new_tokens": tokens / n,
          "seconds": seconds}


def add_generation_args(p, max_new_tokens):
  """The options of a generation task; `max_new_tokens` is its default length, capped to half
  the model's context (generation_length)."""
  p.add_argument("--policy", default="verify", help=" | ".join(decoding.POLICIES))
  p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
  p.add_argument("--top_p", type=float, default=1.0)
  p.add_argument("--max_new_tokens", type=int, default=None,
                 help=f"default {max_new_tokens}, at most half the model's context")
  p.set_defaults(task_max_new_tokens=max_new_tokens)


def generation_length(given, task_default, context,
                      log=lambda line: print(line, file=sys.stderr)):
  """--max_new_tokens as given (it must leave room for a prompt), else the task's default
  capped to half the context, with a one-line notice when capped."""
  if given is not None:
    if not 1 <= given < context:
      raise EvalError(f"--max_new_tokens {given} does not fit the model's context of {context} "
                      f"tokens (give 1 to {context - 1})")
    return given
  if task_default <= context // 2:
    return task_default
  log(f"note: --max_new_tokens is {context // 2}, half the model's context of {context} "
      f"tokens (this task's default is {task_default})")
  return context // 2


def generation_record(args, policy, completions, seconds):
  return {"policy": policy.name, "policy_settings": dataclasses.asdict(policy),
          "temperature": args.temperature, "top_p": args.top_p,
          "max_new_tokens": args.max_new_tokens, "decoding": decoding_stats(completions, seconds)}


# ---------------------------------------------------------------------------------------------
# likelihood
# ---------------------------------------------------------------------------------------------


def add_likelihood_args(p):
  p.add_argument("--corpus", default="", help="files/globs (default: the run's held-out split)")
  p.add_argument("--text_field", default="text", help="the text of a .jsonl corpus line")
  p.add_argument("--windows", default="1,-1", help="W of the bounds to measure (-1: the row)")
  p.add_argument("--stride", type=int, default=0, help="tokens scored per window after the "
                 "first (default: half the context)")


def read_likelihood(args):
  try:
    args.window_list = [int(w) for w in args.windows.split(",") if w.strip()]
  except ValueError:
    raise EvalError(f"--windows: expected integers, got {args.windows!r}") from None
  # Every document of a user corpus: with heldout_fraction 0 the "train" split is all of it.
  return data.corpus_documents(args.corpus, "train", 0.0, args.text_field) if args.corpus else None


def run_likelihood(run, args, docs):
  cfg, tok, L = run.cfg, run.tokenizer, run.context
  if docs is None:
    docs = list(itertools.islice(data.heldout_ids(
        cfg.data.corpus, cfg.data.heldout_fraction, cfg.data.text_field, tok), args.limit or None))
    if not docs:
      raise EvalError("the run's corpus has no held-out documents")
  else:
    docs = [(data.document_name(ref), tok.encode(data.read_document(ref)))
            for ref in docs[:args.limit or None]]
  names = [name for name, _ in docs]
  ids = [doc + [tok.eos_id] for _, doc in docs]        # as in training: [bos] ids [eos]
  pairs, owner = [], []
  for d, doc_ids in enumerate(ids):
    for pair in scoring.rolling_pairs([tok.bos_id], doc_ids, L, args.stride or None):
      pairs.append(pair)
      owner.append(d)
  scores = scoring.Scorer(run.model, run.params, L, args.batch_size, args.seed).score(
      pairs, progress_label="scoring")
  logprob = np.zeros(len(docs))
  for d, s in zip(owner, scores):
    logprob[d] += s.logprob
  counts = np.asarray([len(x) for x in ids], np.float64)
  nats = -logprob.sum() / counts.sum()
  # Standard error of a ratio of sums over documents (the delta method).
  k = len(docs)
  resid = -logprob - nats * counts
  se = float(np.sqrt(np.sum(resid ** 2) / (k * (k - 1))) / counts.mean()) if k > 1 else None
  metrics = {"ar_nll": nats, "ar_nll_stderr": se, "perplexity": math.exp(nats),
             "bits_per_token": nats / math.log(2),
             "bits_per_token_stderr": None if se is None else se / math.log(2),
             "tokens": int(counts.sum()), "documents": k}

  # The bounds, on rows of up to L tokens cut from the same [bos] ids [eos] documents.
  rows = [[tok.bos_id] + x for x in ids]
  rows = [r[i:i + L] for r in rows for i in range(0, len(r), L)]
  B = args.batch_size
  batches = []
  for first in range(0, len(rows), B):
    batch = {k: np.zeros((B, L), np.int32) for k in ("tokens", "segment_ids", "positions")}
    for r, row in enumerate(rows[first:first + B]):
      batch["tokens"][r, :len(row)] = row
      batch["segment_ids"][r, :len(row)] = 1
      batch["positions"][r, :len(row)] = np.arange(len(row))
    batches.append(batch)
  bound = jax.jit(measure.make_measure(run.model, cfg, args.window_list, ar_path=False))
  with Progress("bounds", len(batches), "batches") as progress:
    metrics.update(measure.measure_batches(
        lambda batch, rng: bound(run.params, batch, rng), batches, jax.random.key(args.seed),
        args.window_list, progress))
  examples = [{"document": name, "tokens": int(n), "logprob": float(lp),
               "bits_per_token": float(-lp / n / math.log(2))}
              for name, n, lp in zip(names, counts, logprob)]
  return {"benchmark": "likelihood", "shots": 0, **AR_PATH, "examples": examples,
          "metrics": metrics,
          "metric": {"name": "bits_per_token", "value": metrics["bits_per_token"],
                     "stderr": metrics["bits_per_token_stderr"]}}


# ---------------------------------------------------------------------------------------------
# gsm8k
# ---------------------------------------------------------------------------------------------

GSM8K_STOPS = ("\n\nQuestion:", "Question:", "\n\n\n")
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\$?\.\d+")


def normalize_number(text):
  """'1,000' '$5' '18.0' '-3' '0.50' -> '1000' '5' '18' '-3' '0.5'; None if not a number."""
  text = text.strip().replace(",", "").replace("$", "").rstrip(".")
  try:
    value = Decimal(text)
  except InvalidOperation:
    return None
  if not value.is_finite():
    return None
  if value == value.to_integral_value():
    return str(int(value))
  return format(value.normalize(), "f")


def extract_answer(text):
  """The number after the last '####', else the last number in the text (normalised)."""
  if "####" in text:
    found = _NUMBER.findall(text.split("####")[-1])
    if found:
      return normalize_number(found[0])
  found = _NUMBER.findall(text)
  return normalize_number(found[-1]) if found else None


def gsm8k_prompt(shots, question):
  return "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in shots) + \
      f"Question: {question}\nAnswer:"


def add_gsm8k_args(p):
  p.add_argument("--test_file", required=True, help="GSM8K JSONL: question, answer")
  p.add_argument("--train_file", help="where the few-shot examples come from")
  p.add_argument("--shots", type=int, default=4)
  add_generation_args(p, max_new_tokens=256)


def read_gsm8k(args):
  fields = {"question": str, "answer": str}
  test = read_jsonl(args.test_file, fields)[:args.limit or None]
  if args.shots < 0:
    raise EvalError(f"--shots must be >= 0, got {args.shots}")
  if args.shots and not args.train_file:
    raise EvalError("--shots > 0 needs --train_file")
  shots = few_shot(read_jsonl(args.train_file, fields), args.shots, args.seed) if args.shots else []
  for ex in test:
    ex["target"] = extract_answer(ex["answer"])
    if ex["target"] is None:
      raise EvalError(f"{args.test_file} line {ex['_line']}: no number in the answer")
  return test, shots


def run_gsm8k(run, args, examples):
  test, shots = examples
  completions, seconds = complete(
      run, [gsm8k_prompt(shots, ex["question"]) for ex in test], args.policy_obj,
      max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
      seed=args.seed, batch_size=args.batch_size, stops=GSM8K_STOPS)
  out = []
  for ex, c in zip(test, completions):
    pred = extract_answer(c.text)
    out.append({"line": ex["_line"], "question": ex["question"], "target": ex["target"],
                "completion": c.text, "prediction": pred, "correct": pred == ex["target"],
                "tokens": c.tokens, "nfe": c.nfe, "stop_reason": c.stop_reason,
                "prompt_tokens_dropped": c.dropped})
  acc, se = mean_stderr([e["correct"] for e in out])
  return {"benchmark": "GSM8K", "shots": args.shots, "examples": out,
          "metrics": {"accuracy": acc, "accuracy_stderr": se},
          "metric": {"name": "accuracy", "value": acc, "stderr": se}, "score": 100 * acc,
          "score_stderr": percent(se), "fewshot_lines": [s["_line"] for s in shots],
          **generation_record(args, args.policy_obj, completions, seconds)}


# ---------------------------------------------------------------------------------------------
# choice
# ---------------------------------------------------------------------------------------------


def add_choice_args(p):
  p.add_argument("--file", required=True, help='JSONL: {"context", "choices": [...], "label"}')
  p.add_argument("--benchmark", help="its name in the tables (default: the file's name)")
  p.add_argument("--shots", type=int, default=0)
  p.add_argument("--fewshot_file", help="where the few-shot examples come from (same schema)")


def read_choice_file(path):
  records = read_jsonl(path, {"context": str, "choices": list, "label": int})
  for r in records:
    choices = r["choices"]
    if len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
      raise EvalError(f"{path} line {r['_line']}: 'choices' must be >= 2 non-empty strings")
    if not 0 <= r["label"] < len(choices):
      raise EvalError(f"{path} line {r['_line']}: label {r['label']} is not an index of choices")
  return records


def read_choice(args):
  test = read_choice_file(args.file)[:args.limit or None]
  if args.shots and not args.fewshot_file:
    raise EvalError("--shots > 0 needs --fewshot_file")
  shots = few_shot(read_choice_file(args.fewshot_file), args.shots, args.seed) if args.shots else []
  prefix = "".join(s["context"] + s["choices"][s["label"]] + "\n\n" for s in shots)
  return test, prefix


def encode_pair(tokenizer, context, continuation):
  """([bos] + context tokens, continuation tokens): how every log-likelihood request is
  tokenised (the choice task and the lm-eval model alike)."""
  return [tokenizer.bos_id] + tokenizer.encode(context), tokenizer.encode(continuation)


def run_choice(run, args, examples):
  test, prefix = examples
  pairs = [encode_pair(run.tokenizer, prefix + ex["context"], c)
           for ex in test for c in ex["choices"]]
  scores = iter(scoring.Scorer(run.model, run.params, run.context, args.batch_size,
                               args.seed).score(pairs, progress_label="scoring"))
  out = []
  for ex in test:
    s = [next(scores) for _ in ex["choices"]]
    lp = [x.logprob for x in s]
    per_byte = [x / len(c.encode("utf-8")) for x, c in zip(lp, ex["choices"])]
    pred, pred_norm = int(np.argmax(lp)), int(np.argmax(per_byte))
    out.append({"line": ex["_line"], "id": ex.get("id"), "label": ex["label"], "logprobs": lp,
                "is_greedy": [x.is_greedy for x in s], "n_tokens": [x.n_tokens for x in s],
                "prediction": pred, "prediction_norm": pred_norm,
                "correct": pred == ex["label"], "correct_norm": pred_norm == ex["label"]})
  acc, se = mean_stderr([e["correct"] for e in out])
  acc_norm, se_norm = mean_stderr([e["correct_norm"] for e in out])
  name = args.benchmark or os.path.splitext(os.path.basename(args.file))[0]
  return {"benchmark": name, "shots": args.shots, **AR_PATH, "examples": out,
          "metrics": {"acc": acc, "acc_stderr": se, "acc_norm": acc_norm,
                      "acc_norm_stderr": se_norm},
          "metric": {"name": "acc_norm", "value": acc_norm, "stderr": se_norm},
          "score": 100 * acc_norm, "score_stderr": percent(se_norm)}


# ---------------------------------------------------------------------------------------------
# humaneval (the sandbox and pass@k: evo_jax/humaneval.py)
# ---------------------------------------------------------------------------------------------

HUMANEVAL_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")


def add_humaneval_args(p):
  p.add_argument("--k", default="1", help="pass@k for these k (comma-separated)")
  p.add_argument("--n_samples", type=int, default=1, help="completions per problem (>= max k)")
  p.add_argument("--timeout_s", type=float, default=10.0, help="per program")
  p.add_argument("--workers", type=int, default=2, help="programs run in parallel")
  add_generation_args(p, max_new_tokens=384)


def read_humaneval(args):
  args.ks = tuple(int(k) for k in args.k.split(","))
  if args.n_samples < max(args.ks):
    raise EvalError(f"--n_samples {args.n_samples} is below the largest k {max(args.ks)}")
  return humaneval.load_problems(limit=args.limit or None)


def run_humaneval(run, args, problems):
  samples, seconds = [], 0.0
  for j in range(args.n_samples):        # sample j of every problem, with its own seed
    c, s = complete(run, [p["prompt"] for p in problems], args.policy_obj,
                    max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_p=args.top_p, seed=args.seed + 1000 * j, batch_size=args.batch_size,
                    stops=HUMANEVAL_STOPS)
    samples.append(c)
    seconds += s
  per_problem = [[samples[j][i].text for j in range(args.n_samples)] for i in range(len(problems))]
  per_example, metrics = humaneval.score_completions(problems, per_problem, ks=args.ks,
                                                     timeout_s=args.timeout_s,
                                                     workers=args.workers)
  k = args.ks[0]
  value = metrics[f"pass@{k}"]
  se = metrics[f"pass@{k}_stderr"]       # the interface of evo_jax/humaneval.py
  return {"benchmark": "HumanEval", "shots": 0, "examples": per_example, "metrics": metrics,
          "metric": {"name": f"pass@{k}", "value": value, "stderr": se}, "score": 100 * value,
          "score_stderr": percent(se),
          **generation_record(args, args.policy_obj, [c for s in samples for c in s], seconds)}


TASKS = {
    "likelihood": Task(add_likelihood_args, read_likelihood, run_likelihood),
    "gsm8k": Task(add_gsm8k_args, read_gsm8k, run_gsm8k, generates=True),
    "choice": Task(add_choice_args, read_choice, run_choice),
    "humaneval": Task(add_humaneval_args, read_humaneval, run_humaneval, generates=True),
}


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------


def evaluate(argv):
  """Parses the command line, runs the task and returns the results record (also written to
  --output)."""
  parser = cli.OneLineParser(description=__doc__.strip().splitlines()[0])
  parser.add_argument("--workdir", required=True, help="a trained run")
  parser.add_argument("--task", required=True, help=" | ".join(TASKS))
  parser.add_argument("--output", required=True, help="the results JSON file")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--limit", type=int, default=0, help="the first N examples (0: all)")
  parser.add_argument("--batch_size", type=int, default=16)
  args, rest = parser.parse_known_args(argv)
  if args.task not in TASKS:
    raise EvalError(f"unknown task {args.task!r} (expected one of {', '.join(TASKS)})")
  if args.limit < 0 or args.batch_size < 1:
    raise EvalError("--limit must be >= 0 and --batch_size >= 1")
  files.check_output(args.output, "--output")
  task = TASKS[args.task]
  task_parser = cli.OneLineParser(prog=f"evaluate --task {args.task}")
  task.add_args(task_parser)
  task_args, rest = task_parser.parse_known_args(rest)
  vars(args).update(vars(task_args))
  if task.generates:
    args.policy_obj = cli.parse_policy(args.policy, rest)
  elif rest:
    raise EvalError(f"unknown argument for task {args.task}: {rest[0]}")
  examples = task.read(args)                  # bad input fails here, before the run loads
  if task.generates:
    context = run_lib.read_run_config(args.workdir).data.seq_len
    args.max_new_tokens = generation_length(args.max_new_tokens, args.task_max_new_tokens,
                                            context)

  start = time.perf_counter()
  run = run_lib.load_run(args.workdir)
  cfg, tokenizer, step = run.cfg, run.tokenizer, run.step
  results = task.run(run, args, examples)
  generation = ("policy", "temperature", "top_p", "max_new_tokens",     # recorded on their own
                "task_max_new_tokens")
  options = {k: v for k, v in vars(task_args).items() if k not in generation}
  record = {
      "task": args.task, "benchmark": results.pop("benchmark"),
      "checkpoint": {"workdir": str(paths.path(args.workdir)), "step": int(step)},
      "tokenizer": tokenizer.path, "shots": results.pop("shots"), "policy": None,
      "policy_settings": None, "temperature": None, "top_p": None, "seed": args.seed,
      "options": options, "n_examples": len(results["examples"]), "score": None,
      "score_stderr": None, "decoding": None, **results,
      "config": cfg.to_dict(), "machine": backend.machine(),
      "seconds": time.perf_counter() - start,
      "command": ["python", "-m", "evo_jax.evaluate"] + argv}
  files.write_text(args.output, json.dumps(record, indent=1), "--output")
  m = record["metric"]
  stderr = "" if m["stderr"] is None else f" +- {m['stderr']:.4f}"   # None: one example
  print(f"{args.task} ({record['benchmark']}, {record['n_examples']} examples, step {step}): "
        f"{m['name']} = {m['value']:.4f}{stderr} -> {args.output}")
  return record


def main(argv=None):
  with cli.command():
    return evaluate(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
  main()
