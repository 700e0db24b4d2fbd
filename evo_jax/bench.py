"""Benchmarks of a trained run: `python -m evo_jax.bench SUBCOMMAND --workdir DIR [...]`.

Subcommands (each registered in COMMANDS as (add its arguments, run it)):

  train    median step time and training tokens per second of a config on the real data:
        python -m evo_jax.bench train --config configs/tiny.py [--steps 20] [--config.x.y=v ...]

  bound    the held-out bound of a checkpoint for several log-SNR ranges:
        python -m evo_jax.bench bound --workdir DIR [--log_snr_min -12] [--log_snr_max 10,6,4,2,0]

  memory   temporary memory of the compiled train step, dense vs chunked attention:
        python -m evo_jax.bench memory --config configs/tiny.py [--seq_len 256,512,1024,2048]

  decode   every decoding policy on the same held-out prompts: a table of NFE (forward passes per
           sequence), tokens per forward pass, tokens per second, and two quality figures of the
           generated text: its AR-path NLL under the model (nats per token, the exact likelihood
           of AR decoding; lower is more likely text) and its token entropy (bits, the entropy of
           each continuation's own token frequencies: low when it repeats itself). The held-out
           text's own continuation is the reference row.

        python -m evo_jax.bench decode --workdir DIR [--policies ar,ar_clean,diffusion,block,evo]
            [--n_prompts 16] [--prompt_len 32] [--max_new_tokens 64] [--batch_size 16]
            [--temperature 0] [--top_p 1] [--seed 0] [--repeats 3] [--json FILE]
            [--NAME.SETTING=VALUE ...]

--NAME.SETTING=VALUE changes a setting of policy NAME, e.g. --evo.gamma=0.8 --block.steps=2.

Prompts are token slices from the middle of held-out documents of the run's corpus (as the
training rows, which also start mid-document). Timings exclude compilation; each batch is timed
--repeats times and the fastest counts (a shared machine's noise only ever slows a run down).
"""
import dataclasses
import json
import math
import sys
import tempfile
import time

import jax
import ml_collections
import numpy as np

from evo_jax import backend
from evo_jax import cli
from evo_jax import data
from evo_jax import decoding
from evo_jax import measure
from evo_jax import run as run_lib
from evo_jax import scoring
from evo_jax import train
from evo_jax.errors import UserError
from evo_jax.progress import Progress


# ---------------------------------------------------------------------------------------------
# decode
# ---------------------------------------------------------------------------------------------


def heldout_prompts(cfg, tokenizer, n_prompts, prompt_len, continuation_len):
  """(prompt, true continuation) token lists from the middle of the first held-out documents
  long enough for both."""
  out = []
  d = cfg.data
  for ref in data.corpus_documents(d.corpus, "heldout", d.heldout_fraction, d.text_field):
    ids = tokenizer.encode(data.read_document(ref))
    if len(ids) < 2 * (prompt_len + continuation_len):
      continue
    start = len(ids) // 2
    out.append((ids[start:start + prompt_len],
                ids[start + prompt_len:start + prompt_len + continuation_len]))
    if len(out) == n_prompts:
      return out
  if not out:
    raise UserError(f"no held-out document of {2 * (prompt_len + continuation_len)} tokens in "
                    f"corpus {d.corpus or 'python stdlib'}")
  return out


def token_entropy_bits(tokens):
  """Entropy of a sequence's own token frequencies (bits): 0 for one repeated token."""
  if not tokens:
    return 0.0
  _, counts = np.unique(np.asarray(tokens), return_counts=True)
  p = counts / counts.sum()
  return float(-(p * np.log2(p)).sum())


def quality(scorer, prompts, continuations):
  """Mean AR-path NLL (nats/token, over all continuation tokens) and mean token entropy."""
  scores = scorer.score(list(zip(prompts, continuations)))
  nll = -sum(s.logprob for s in scores) / max(sum(s.n_tokens for s in scores), 1)
  return nll, float(np.mean([token_entropy_bits(c) for c in continuations]))


def run_decode(args, rest):
  names = [n.strip() for n in args.policies.split(",") if n.strip()]
  overrides = {n: [] for n in names}      # --evo.gamma=0.8 -> evo's --policy.gamma=0.8
  for item in rest:
    name, dot, setting = item[2:].partition(".") if item.startswith("--") else ("", "", "")
    if name not in overrides or not dot:
      raise UserError(f"unknown argument: {item} (policy settings: --NAME.SETTING=VALUE for a "
                      f"policy in --policies)")
    overrides[name].append(f"--policy.{setting}")
  policies = [cli.parse_policy(n, overrides[n]) for n in names]
  if min(args.n_prompts, args.prompt_len, args.max_new_tokens, args.batch_size, args.repeats) < 1:
    raise UserError("n_prompts, prompt_len, max_new_tokens, batch_size and repeats must be >= 1")
  context = run_lib.read_run_config(args.workdir).data.seq_len   # checked before loading
  if args.prompt_len + args.max_new_tokens > context:
    raise UserError(f"--prompt_len + --max_new_tokens = {args.prompt_len + args.max_new_tokens} "
                    f"exceeds the model's context of {context} tokens")
  run = run_lib.load_run(args.workdir)
  cfg, model, params, tokenizer, step = run.cfg, run.model, run.params, run.tokenizer, run.step
  sched = run.schedule
  pairs = heldout_prompts(cfg, tokenizer, args.n_prompts, args.prompt_len, args.max_new_tokens)
  prompts = [p for p, _ in pairs]
  scorer = scoring.Scorer(model, params, cfg.data.seq_len, args.batch_size, args.seed)

  rows = []
  nll, ent = quality(scorer, prompts, [c for _, c in pairs])
  rows.append({"policy": "held-out text", "settings": "(reference)", "nll": nll, "entropy": ent})
  for policy in policies:
    samples, batch_seconds = [], 0.0
    starts = range(0, len(prompts), args.batch_size)
    progress = Progress(f"policy {policy.name}", len(starts), "batches")
    for i in starts:
      runs = [decoding.generate(
          model, params, sched, prompts[i:i + args.batch_size], policy,
          max_new_tokens=args.max_new_tokens, context=cfg.data.seq_len,
          eos_id=tokenizer.eos_id, temperature=args.temperature, top_p=args.top_p,
          seed=args.seed + i) for _ in range(args.repeats)]
      samples += runs[0]                       # the same seed: the same tokens every time
      batch_seconds += min(r[0].seconds for r in runs)
      progress.advance()
    progress.done()
    n_tokens = sum(len(s.tokens) for s in samples)
    nfe = sum(s.nfe for s in samples)
    nll, ent = quality(scorer, prompts, [s.tokens for s in samples])
    rows.append({"policy": policy.name, "settings": policy.describe(args.max_new_tokens),
                 "nfe": nfe / len(samples), "tokens_per_forward": n_tokens / max(nfe, 1),
                 "tokens_per_sec": n_tokens / max(batch_seconds, 1e-9),
                 "tokens": n_tokens / len(samples), "nll": nll, "entropy": ent,
                 "eos_stops": sum(s.stop_reason == "eos" for s in samples),
                 "policy_settings": dataclasses.asdict(policy)})

  header = (f"decode benchmark: {args.workdir} (step {step}), {len(prompts)} held-out prompts of "
            f"{args.prompt_len} tokens, up to {args.max_new_tokens} new tokens, batch "
            f"{args.batch_size}, temperature {args.temperature:g}, top_p {args.top_p:g}, "
            f"seed {args.seed}\nmachine: {backend.machine()}")
  print(header)
  print(format_table(rows))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"header": header, "rows": rows}, f, indent=2)
  return rows


def format_table(rows):
  cols = [("policy", "policy", "{}"), ("settings", "settings", "{}"), ("NFE/seq", "nfe", "{:.1f}"),
          ("tok/fwd", "tokens_per_forward", "{:.2f}"), ("tok/s", "tokens_per_sec", "{:,.0f}"),
          ("new tok", "tokens", "{:.1f}"), ("AR-NLL", "nll", "{:.3f}"),
          ("entropy", "entropy", "{:.2f}"), ("EOS", "eos_stops", "{}")]
  cells = [[h for h, _, _ in cols]]
  for r in rows:
    cells.append([fmt.format(r[k]) if r.get(k) is not None and not (
        isinstance(r[k], float) and math.isnan(r[k])) else "-" for _, k, fmt in cols])
  widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
  lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
  lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
  return "\n".join(lines)


def add_decode_args(p):
  p.add_argument("--workdir", required=True)
  p.add_argument("--policies", default="ar,ar_clean,diffusion,block,evo")
  p.add_argument("--n_prompts", type=int, default=16)
  p.add_argument("--prompt_len", type=int, default=32)
  p.add_argument("--max_new_tokens", type=int, default=64)
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--temperature", type=float, default=0.0)
  p.add_argument("--top_p", type=float, default=1.0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--repeats", type=int, default=3, help="time each batch this often, keep the best")
  p.add_argument("--json", help="also write the rows to this JSON file")


# ---------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------


def run_train(args, rest):
  """Median step time and training throughput of a config on the real data pipeline."""
  cfg = cli.load_config_file(args.config)
  cli.apply_overrides(cfg, rest)
  with tempfile.TemporaryDirectory() as workdir:
    trainer = train.Trainer(cfg, workdir)
    state = trainer.init_state(jax.random.key(cfg.seed))
    batches = iter(trainer.dataset("train"))
    state, aux = trainer.step(state, next(batches))          # compiles
    jax.block_until_ready(aux)
    seconds, tokens = [], []
    progress = Progress("timing", args.steps, "steps")
    for _ in range(args.steps):
      batch = next(batches)
      start = time.perf_counter()
      state, aux = trainer.step(state, batch)
      jax.block_until_ready(aux)
      seconds.append(time.perf_counter() - start)
      tokens.append(int(np.sum(batch["segment_ids"] > 0)))
      progress.advance()
    progress.done()
  step_s = float(np.median(seconds))
  print(f"machine: {backend.machine()}")
  print(f"config: {args.config} {' '.join(rest)}")
  print(f"median step: {step_s * 1000:.1f} ms over {args.steps} steps | "
        f"{np.median(tokens) / step_s:,.0f} tokens/s | batch {cfg.data.batch_size} x "
        f"{cfg.data.seq_len}")


def add_train_args(p):
  p.add_argument("--config", required=True, help="config file, e.g. configs/tiny.py")
  p.add_argument("--steps", type=int, default=20, help="timed steps after one compile step")


# ---------------------------------------------------------------------------------------------
# bound
# ---------------------------------------------------------------------------------------------


def run_bound(args, rest):
  """The held-out bound of a checkpoint for several log-SNR ranges (docs/training.md, "The
  bound")."""
  if rest:
    raise UserError(f"unknown argument: {rest[0]}")
  run = run_lib.load_run(args.workdir)
  cfg, d = run.cfg, run.cfg.data
  batches = data.make_eval_batches(d.corpus, run.tokenizer, d.seq_len, d.batch_size,
                                   args.batches, d.heldout_fraction, d.text_field)
  print(f"machine: {backend.machine()}")
  print(f"{args.workdir} @ step {run.step}, {len(batches)} held-out batches; bits per token")
  ranges = [(lo, hi) for lo in args.log_snr_min for hi in args.log_snr_max]
  rows, keys = [], []
  with Progress("log-SNR ranges", len(ranges)) as progress:
    for lam_min, lam_max in ranges:
      c = ml_collections.ConfigDict(cfg.to_dict())
      c.bound.update(log_snr_min=lam_min, log_snr_max=lam_max)
      fn = jax.jit(measure.make_measure(run.model, c))
      summary = measure.measure_batches(lambda batch, rng: fn(run.params, batch, rng), batches,
                                        jax.random.key(0), c.bound.windows)
      keys = [k for k in summary if k.startswith("bound_")] + ["ar_nll"]
      rows.append([lam_min, lam_max] + [summary[k] / (math.log(2) if k == "ar_nll" else 1.0)
                                        for k in keys])
      progress.advance()
  header = ["lambda_min", "lambda_max"] + keys
  print(" | ".join(h.replace("_bpt", "").replace("ar_nll", "AR-path") for h in header))
  for row in rows:
    print(" | ".join(f"{v:,.3f}" for v in row))


def floats(text):
  return [float(x) for x in text.split(",")]


def add_bound_args(p):
  p.add_argument("--workdir", required=True)
  p.add_argument("--log_snr_min", type=floats, default=[-12.0])
  p.add_argument("--log_snr_max", type=floats, default=[10.0, 6.0, 4.0, 2.0, 0.0])
  p.add_argument("--batches", type=int, default=4)


# ---------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------


def run_memory(args, rest):
  """Temporary memory of the compiled train step (one device) with dense and chunked attention,
  for growing sequence lengths: what model.attention=chunked saves. The step is the Trainer's
  (train.build_step: its shardings and donation), lowered from shapes only."""
  base = cli.load_config_file(args.config)
  cli.apply_overrides(base, rest)
  print(f"machine: {backend.machine()}")
  print(f"config: {args.config} {' '.join(rest)} | batch {args.batch_size} | one device | "
        f"temporary memory of the compiled train step, MiB")
  print("seq_len | dense | chunked | dense / chunked")
  for L in args.seq_len:
    temp = {}
    for kind in ("dense", "chunked"):
      cfg = ml_collections.ConfigDict(base.to_dict())
      cfg.data.update(seq_len=L, batch_size=args.batch_size)
      cfg.mesh.update(data=1, fsdp=1, tensor=1)
      cfg.train.grad_accum_steps = 1
      cfg.model.update(attention=kind, attention_chunk=min(args.chunk, 2 * L))
      step = train.build_step(cfg, jax.devices()[:1])
      compiled = step.fn.lower(step.state, step.batch).compile()
      temp[kind] = compiled.memory_analysis().temp_size_in_bytes / 2**20
    print(f"{L} | {temp['dense']:,.1f} | {temp['chunked']:,.1f} | "
          f"{temp['dense'] / temp['chunked']:.2f}", flush=True)


def ints(text):
  return [int(x) for x in text.split(",")]


def add_memory_args(p):
  p.add_argument("--config", required=True, help="config file, e.g. configs/tiny.py")
  p.add_argument("--seq_len", type=ints, default=[256, 512, 1024, 2048])
  p.add_argument("--batch_size", type=int, default=1)
  p.add_argument("--chunk", type=int, default=256, help="model.attention_chunk")


COMMANDS = {"decode": (add_decode_args, run_decode), "train": (add_train_args, run_train),
            "bound": (add_bound_args, run_bound), "memory": (add_memory_args, run_memory)}


def main(argv=None):
  with cli.command():
    parser = cli.OneLineParser(description=__doc__.strip().splitlines()[0])
    sub = parser.add_subparsers(dest="command", parser_class=cli.OneLineParser)
    for name, (add_args, _) in COMMANDS.items():
      add_args(sub.add_parser(name))
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.command is None:
      raise UserError(f"give a subcommand: {', '.join(COMMANDS)}")
    return COMMANDS[args.command][1](args, rest)


if __name__ == "__main__":
  main()
