"""Benchmarks of a trained run: `python -m evo_jax.bench SUBCOMMAND --workdir DIR [...]`.

Subcommands (each registered in COMMANDS as (add its arguments, run it)):

  train    median step time, tokens per second, model FLOPs and their share of the peak of a
           config on the real data, against the plain causal-LM step of the same backbone
           (the Evo tax):
        python -m evo_jax.bench train --config configs/tiny.py [--steps 20]
            [--against FIELD=VALUE,...] [--json FILE] [--config.x.y=v ...]

  attention  every model.attention kind against dense on one two-stream batch: the largest
           difference of output and gradients, and the time of forward plus backward:
        python -m evo_jax.bench attention [--seq_len 1024] [--batch_size 4] [--chunk 256]
            [--dtype float32] [--kinds dense,chunked,block_sparse] [--json FILE]

  bound    the held-out bound of a checkpoint for several log-SNR ranges; --profile PREFIX also
           writes where it goes (the diffusion integrand by log-SNR bin, the latent
           cross-entropy by log-SNR and t bin, per W) to PREFIX.csv and PREFIX.png:
        python -m evo_jax.bench bound --workdir DIR [--log_snr_min -12] [--log_snr_max 10,6,4,2,0]
            [--batches 4] [--profile PREFIX] [--bins 16]

  memory   temporary memory of the compiled train step: dense, chunked and block-sparse
           attention, and a vocabulary-chunked loss:
        python -m evo_jax.bench memory --config configs/tiny.py [--seq_len 256,512,1024,2048]
            [--chunk 256] [--kinds dense,chunked,block_sparse] [--vocab_chunk 8192]

  data     rows per second of the data pipeline on one host, against what a pod-scale step
           consumes per host (--target: its tokens per step over the hosts of --chips, in the
           step time its model FLOPs take at --mfu of the chips' bf16 peak):
        python -m evo_jax.bench data --corpus DIR[,DIR] [--mixture 0.7,0.3] [--workers 0,2]
            [--target configs/evo_8b.py] [--chips 64] [--chips_per_host 4] [--mfu 0.5]
            [--seconds 10] [--json FILE]

  decode   every decoding policy on the same held-out prompts: a table of NFE (forward passes per
           sequence), tokens per forward pass, accepted drafts per pass (verify), tokens per
           second at each batch size, and the quality of the generated text: its AR-path NLL
           under the model (nats per token, the exact likelihood of AR decoding; lower is more
           likely text), its token entropy (bits, of each continuation's own token frequencies:
           low when it repeats itself), and the share of greedy ar's and ar_clean's tokens it
           reproduces. The held-out text's own continuation is the reference row.

        python -m evo_jax.bench decode --workdir DIR [--policies ar,ar_clean,verify,...]
            [--n_prompts 16] [--prompt_len 32] [--max_new_tokens 64] [--batch_sizes 1,16]
            [--temperature 0] [--top_p 1] [--seed 0] [--repeats 3] [--json FILE]
            [--plot FILE.png] [--NAME.SETTING=VALUE ...]

--NAME.SETTING=VALUE changes a setting of every row of policy NAME, e.g. --evo.gamma=0.8; a row
of its own is NAME:SETTING=VALUE[:...] in --policies, e.g. --policies ar,verify:window=4,verify.
--plot draws tokens per forward against AR-NLL, with the Pareto front.

Prompts are token slices from the middle of held-out documents of the run's corpus (as the
training rows, which also start mid-document). Timings exclude compilation; each batch is timed
--repeats times and the fastest counts (a shared machine's noise only ever slows a run down).
"""
import contextlib
import dataclasses
import json
import math
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from evo_jax import attention
from evo_jax import backend
from evo_jax import cli
from evo_jax import data
from evo_jax import decoding
from evo_jax import flops
from evo_jax import loss as loss_lib
from evo_jax import measure
from evo_jax import model as model_lib
from evo_jax import prepared
from evo_jax import run as run_lib
from evo_jax import scoring
from evo_jax import sharding
from evo_jax import state as state_lib
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
  for _, ids in data.heldout_ids(d.corpus, d.heldout_fraction, d.text_field, tokenizer):
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


def parse_policies(spec, rest):
  """The rows of the table: --policies items NAME or NAME:SETTING=VALUE[:SETTING=VALUE ...]
  (one row each, so that a policy can appear with several settings), and --NAME.SETTING=VALUE
  arguments, which apply to every row of NAME."""
  items = [item.strip() for item in spec.split(",") if item.strip()]
  names = [item.split(":")[0] for item in items]
  overrides = {n: [] for n in names}      # --evo.gamma=0.8 -> evo's --policy.gamma=0.8
  for item in rest:
    name, dot, setting = item[2:].partition(".") if item.startswith("--") else ("", "", "")
    if name not in overrides or not dot:
      raise UserError(f"unknown argument: {item} (policy settings: --NAME.SETTING=VALUE for a "
                      f"policy in --policies)")
    overrides[name].append(f"--policy.{setting}")
  return [cli.parse_policy(name, overrides[name] + [f"--policy.{s}" for s in item.split(":")[1:]])
          for name, item in zip(names, items)]


def agreement(samples, reference):
  """The share of the reference's tokens that the samples reproduce at the same position."""
  same = sum(sum(a == b for a, b in zip(s.tokens, r.tokens)) for s, r in zip(samples, reference))
  return same / max(sum(len(r.tokens) for r in reference), 1)


def run_decode(args, rest):
  policies = parse_policies(args.policies, rest)
  if min(args.n_prompts, args.prompt_len, args.max_new_tokens, args.repeats,
         *args.batch_sizes) < 1:
    raise UserError("n_prompts, prompt_len, max_new_tokens, batch_sizes and repeats must be >= 1")
  context = run_lib.read_run_config(args.workdir).data.seq_len   # checked before loading
  if args.prompt_len + args.max_new_tokens > context:
    raise UserError(f"--prompt_len + --max_new_tokens = {args.prompt_len + args.max_new_tokens} "
                    f"exceeds the model's context of {context} tokens")
  run = run_lib.load_run(args.workdir)
  for policy in policies:
    run.check_policy(policy)
  pairs = heldout_prompts(run.cfg, run.tokenizer, args.n_prompts, args.prompt_len,
                          args.max_new_tokens)
  prompts = [p for p, _ in pairs]
  scorer = scoring.Scorer(run.model, run.params, context, max(args.batch_sizes), args.seed)

  def decode(policy, batch_size, temperature, repeats):
    """All prompts in batches: the samples and the decoding seconds (each batch's best)."""
    samples, seconds = [], 0.0
    starts = range(0, len(prompts), batch_size)
    progress = Progress(f"policy {policy.name}, batch {batch_size}", len(starts), "batches")
    for i in starts:
      runs = [decoding.generate(
          run.model, run.params, run.schedule, prompts[i:i + batch_size], policy,
          max_new_tokens=args.max_new_tokens, context=context, eos_id=run.tokenizer.eos_id,
          temperature=temperature, top_p=args.top_p, seed=args.seed + i)
          for _ in range(repeats)]
      samples += runs[0]                       # the same seed: the same tokens every time
      seconds += min(r[0].seconds for r in runs)
      progress.advance()
    progress.done()
    return samples, seconds

  greedy = {name: decode(decoding.POLICIES[name], max(args.batch_sizes), 0.0, 1)[0]
            for name in ("ar", "ar_clean")
            if name == "ar" or run.cfg.loss.clean_ar_weight > 0}     # a clean readout trained
  rows = []
  nll, ent = quality(scorer, prompts, [c for _, c in pairs])
  rows.append({"policy": "held-out text", "settings": "(reference)", "nll": nll, "entropy": ent})
  for policy in policies:
    speed = {}
    for batch_size in args.batch_sizes:
      samples, seconds = decode(policy, batch_size, args.temperature, args.repeats)
      speed[batch_size] = sum(len(s.tokens) for s in samples) / max(seconds, 1e-9)
    n_tokens = sum(len(s.tokens) for s in samples)
    nfe = sum(s.nfe for s in samples)
    nll, ent = quality(scorer, prompts, [s.tokens for s in samples])
    rows.append({"policy": policy.name, "settings": policy.describe(args.max_new_tokens),
                 "nfe": nfe / len(samples), "tokens_per_forward": n_tokens / max(nfe, 1),
                 "drafts_per_pass": (sum(s.accepted_drafts for s in samples) / max(nfe, 1)
                                     if policy.readout == "clean" else None),
                 "tokens_per_sec": speed, "tokens": n_tokens / len(samples), "nll": nll,
                 "entropy": ent, "same_as_ar": agreement(samples, greedy["ar"]),
                 "same_as_ar_clean": (agreement(samples, greedy["ar_clean"])
                                      if "ar_clean" in greedy else None),
                 "eos_stops": sum(s.stop_reason == "eos" for s in samples),
                 "policy_settings": dataclasses.asdict(policy)})

  header = (f"decode benchmark: {args.workdir} (step {run.step}), {len(prompts)} held-out "
            f"prompts of {args.prompt_len} tokens, up to {args.max_new_tokens} new tokens, "
            f"temperature {args.temperature:g}, top_p {args.top_p:g}, seed {args.seed}; "
            f"tokens/s at batch {', '.join(map(str, args.batch_sizes))}; 'same as' is the share "
            f"of greedy ar's (ar_clean's) tokens reproduced\nmachine: {backend.machine()}")
  print(header)
  print(format_table(rows, args.batch_sizes))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"header": header, "rows": rows}, f, indent=2)
  if args.plot:
    plot_front(rows, args.plot, f"{args.workdir} (step {run.step}), temperature "
               f"{args.temperature:g}")
  return rows


def format_table(rows, batch_sizes):
  speed = [(f"tok/s b={b}", ("tokens_per_sec", b), "{:,.0f}") for b in batch_sizes]
  cols = [("policy", "policy", "{}"), ("settings", "settings", "{}"), ("NFE/seq", "nfe", "{:.1f}"),
          ("tok/fwd", "tokens_per_forward", "{:.2f}"),
          ("drafts/pass", "drafts_per_pass", "{:.2f}"), *speed,
          ("new tok", "tokens", "{:.1f}"), ("AR-NLL", "nll", "{:.3f}"),
          ("entropy", "entropy", "{:.2f}"), ("same as ar", "same_as_ar", "{:.0%}"),
          ("same as ar_clean", "same_as_ar_clean", "{:.0%}"), ("EOS", "eos_stops", "{}")]
  value = lambda r, k: r.get(k[0], {}).get(k[1]) if isinstance(k, tuple) else r.get(k)
  cells = [[h for h, _, _ in cols]]
  for r in rows:
    cells.append([fmt.format(value(r, k)) if value(r, k) is not None and not (
        isinstance(value(r, k), float) and math.isnan(value(r, k))) else "-"
        for _, k, fmt in cols])
  widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
  lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
  lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
  return "\n".join(lines)


def plotting():
  """matplotlib.pyplot (headless), or a one-line error naming the extra that installs it."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    raise UserError("plots need matplotlib: pip install -e '.[plot]'") from None
  return plt


def plot_front(rows, path, title):
  """The speed/quality picture: tokens per forward pass against AR-NLL, one point per policy
  row, the Pareto front (no other row both faster and more likely) joined by a line, and the
  held-out text's own AR-NLL as a dashed line."""
  plt = plotting()
  points = [r for r in rows if r.get("tokens_per_forward") is not None]
  front = sorted((r for r in points if not any(
      o["tokens_per_forward"] >= r["tokens_per_forward"] and o["nll"] <= r["nll"] and
      (o["tokens_per_forward"], o["nll"]) != (r["tokens_per_forward"], r["nll"])
      for o in points)), key=lambda r: r["tokens_per_forward"])
  fig, ax = plt.subplots(figsize=(9, 6))
  ax.scatter([r["tokens_per_forward"] for r in points], [r["nll"] for r in points])
  for i, r in enumerate(points):     # labels alternate above and below, to overlap less
    ax.annotate(f"{r['policy']} {r['settings']}", (r["tokens_per_forward"], r["nll"]),
                fontsize=7, xytext=(4, 4 if i % 2 else -10), textcoords="offset points")
  ax.plot([r["tokens_per_forward"] for r in front], [r["nll"] for r in front], "k-", lw=0.8,
          label="Pareto front")
  ax.axhline(rows[0]["nll"], ls="--", color="gray", lw=0.8, label="held-out text")
  ax.set_yscale("log")
  ax.set_xlabel("tokens per forward pass")
  ax.set_ylabel("AR-NLL of the text (nats/token, log scale, lower is better)")
  ax.set_title(title, fontsize=9)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def add_decode_args(p):
  p.add_argument("--workdir", required=True)
  p.add_argument("--policies", default=",".join(decoding.POLICIES),
                 help="NAME or NAME:SETTING=VALUE[:...], comma-separated")
  p.add_argument("--n_prompts", type=int, default=16)
  p.add_argument("--prompt_len", type=int, default=32)
  p.add_argument("--max_new_tokens", type=int, default=64)
  p.add_argument("--batch_sizes", type=ints, default=[1, 16],
                 help="tokens/s at each; the other columns come from the last")
  p.add_argument("--temperature", type=float, default=0.0)
  p.add_argument("--top_p", type=float, default=1.0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--repeats", type=int, default=3, help="time each batch this often, keep the best")
  p.add_argument("--json", help="also write the rows to this JSON file")
  p.add_argument("--plot", help="also draw tokens per forward against AR-NLL to this PNG")


# ---------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------


def run_train(args, rest):
  """Median step time, tokens per second, FLOPs and their share of the peak of a config on
  the real data pipeline, and of the plain causal-LM step of the same backbone on the same
  tokens (clean stream only, next-token loss, same optimizer): their ratio is the Evo tax.
  With --against, also the config with those fields changed. All steps run interleaved, so
  that the machine's noise falls on each alike, and ratios are of medians from this one run."""
  cfg = cli.load_config_file(args.config)
  cli.apply_overrides(cfg, rest)
  variants = [("evo", cfg)]
  if args.against:
    other = ml_collections.ConfigDict(cfg.to_dict())
    cli.apply_overrides(other, [f"--config.{item}" for item in args.against.split(",")])
    variants.append((args.against, other))
  device = jax.devices()[0]
  peak = flops.peak_flops(device)
  peak_note = "the chip's bf16 peak"
  if peak is None:
    peak = flops.measured_matmul_peak()
    peak_note = "a 2048 x 2048 float32 matmul measured in this run"
  peak *= 1 if device.platform == "cpu" else jax.device_count()
  with contextlib.ExitStack() as stack:
    runs = []
    for name, c in variants:
      trainer = train.Trainer(c, stack.enter_context(tempfile.TemporaryDirectory()))
      state = trainer.init_state(jax.random.key(c.seed))
      batches = iter(trainer.dataset("train"))
      n_params = sum(x.size for x in jax.tree.leaves(state.params))
      steps = [(name, trainer._step, flops.model_flops(c, n_params))]
      if name == "evo":
        steps.append(("causal", causal_step(trainer), flops.model_flops(c, n_params, streams=1)))
      for step_name, fn, model_flops in steps:
        batch = trainer.global_batch(next(batches))
        run = dict(name=step_name, cfg=c, fn=fn, trainer=trainer, batches=batches,
                   model_flops=model_flops, traced_flops=flops.traced_flops(fn, state, batch),
                   seconds=[], tokens=[])
        run["state"], aux = fn(jax.tree.map(lambda x: x.copy(), state), batch)   # compiles
        jax.block_until_ready(aux)
        runs.append(run)
    progress = Progress("timing", args.steps, "steps")
    for _ in range(args.steps):
      drawn = {}        # one batch per trainer a round: the Evo and causal steps read the same
      for r in runs:
        local = drawn.setdefault(id(r["trainer"]), next(r["batches"]))
        batch = r["trainer"].global_batch(local)
        start = time.perf_counter()
        r["state"], aux = r["fn"](r["state"], batch)
        jax.block_until_ready(aux)
        r["seconds"].append(time.perf_counter() - start)
        r["tokens"].append(int(np.sum(local["segment_ids"] > 0)))
      progress.advance()
    progress.done()
  print(f"machine: {backend.machine()}")
  print(f"peak: {peak / 1e12:.3g} TFLOP/s ({peak_note}, {jax.device_count()} device(s))")
  print(f"config: {args.config} {' '.join(rest)}")
  results = {}
  for r in runs:
    step_s = float(np.median(r["seconds"]))
    achieved = r["model_flops"] / step_s
    results[r["name"]] = dict(
        median_step_s=step_s, tokens_per_sec=float(np.median(r["tokens"])) / step_s,
        model_flops=r["model_flops"], traced_flops=r["traced_flops"], flops_per_sec=achieved,
        share_of_peak=achieved / peak, batch=[r["cfg"].data.batch_size, r["cfg"].data.seq_len])
    print(f"{r['name']}: median step {step_s * 1000:.1f} ms over {args.steps} steps | "
          f"{results[r['name']]['tokens_per_sec']:,.0f} tokens/s | model "
          f"{r['model_flops'] / 1e9:.3g} GFLOP/step (matmuls traced: "
          f"{r['traced_flops'] / 1e9:.3g}) | {achieved / 1e12:.3g} TFLOP/s = "
          f"{achieved / peak:.1%} of peak | batch {r['cfg'].data.batch_size} x "
          f"{r['cfg'].data.seq_len}")
  ratios = {"evo_tax": results["evo"]["median_step_s"] / results["causal"]["median_step_s"]}
  print(f"Evo tax (evo / causal step time): {ratios['evo_tax']:.3f}")
  if args.against:
    ratios["against"] = results[args.against]["median_step_s"] / results["evo"]["median_step_s"]
    print(f"ratio ({args.against} / evo): {ratios['against']:.3f}")
  summary = dict(machine=backend.machine(), config=args.config, overrides=rest, peak=peak,
                 peak_source=peak_note, steps=args.steps, results=results, ratios=ratios)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(summary, f, indent=1)
  return summary


def causal_step(trainer):
  """The plain causal LM of the trainer's backbone: the clean stream alone (causal over each
  packed document), next-token loss, the same optimizer; sharded as the Evo step is."""
  model, tx, mesh = trainer.model, trainer.tx, trainer.mesh

  def mean_nll(params, batch):
    seg = batch["segment_ids"]
    logits, _ = model.apply(params, batch["tokens"], None, None, jnp.zeros(seg.shape),
                            batch["positions"], attention.causal_spec(seg))
    nll, mask = loss_lib.clean_next_token(logits, batch)
    return jnp.sum(jnp.where(mask, nll, 0.0)) / jnp.maximum(jnp.sum(mask), 1)

  def step(state, batch):
    loss, grads = jax.value_and_grad(mean_nll)(state.params, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return state.replace(params=optax.apply_updates(state.params, updates),
                         opt_state=opt_state, step=state.step + 1), loss

  return sharding.traced_under_rules(
      jax.jit(step, in_shardings=(trainer.state_sharding, sharding.batch_sharding(mesh)),
              out_shardings=(trainer.state_sharding, sharding.replicated(mesh)),
              donate_argnums=0),
      mesh, sharding.logical_rules(trainer.cfg.sharding.rules))


def add_train_args(p):
  p.add_argument("--config", required=True, help="config file, e.g. configs/tiny.py")
  p.add_argument("--steps", type=int, default=20, help="timed steps after one compile step")
  p.add_argument("--against", help="FIELD=VALUE[,FIELD=VALUE]: also time the config with these "
                                   "fields changed, interleaved, and print the ratio")
  p.add_argument("--json", help="also write the figures to this JSON file")


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
  if args.profile:
    write_bound_profile(run, batches, args.profile, args.bins)


def bound_profile(run, batches, bins):
  """Where the bound goes, for each W of bound.windows on the run's own log-SNR range: the
  diffusion integrand and the latent cross-entropy averaged per log-SNR bin, and the latent
  cross-entropy per t bin, beside that of the posterior from the latent alone (what the table
  allows). Rows (window, bin_by, lo, hi, draws, integrand, latent_ce, latent_only_ce). The
  draws are those of the table's row for the run's own range (the same keys)."""
  cfg = run.cfg
  lam_min, lam_max = float(cfg.bound.log_snr_min), float(cfg.bound.log_snr_max)
  rows = []
  for j, w in enumerate(cfg.bound.windows):
    fn = jax.jit(loss_lib.make_bound(run.model, cfg, w, per_token=True))
    key = lambda i: jax.random.fold_in(jax.random.fold_in(jax.random.key(0), i), j)
    draws = [jax.device_get(fn(run.params, b, key(i))) for i, b in enumerate(batches)]
    get = lambda k: np.concatenate([d[k][d["mask"]] for d in draws])
    lam, t, integrand, ce = get("log_snr"), get("t"), get("integrand"), get("latent_ce")
    alone = get("latent_only_ce")
    for bin_by, x, edges in (("log_snr", lam, np.linspace(lam_min, lam_max, bins + 1)),
                             ("t", t, np.linspace(0.0, 1.0, bins + 1))):
      which = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, bins - 1)
      for i in range(bins):
        sel = which == i
        mean = lambda x: float(x[sel].mean()) if sel.any() else float("nan")
        rows.append((measure.window_name(w), bin_by, edges[i], edges[i + 1], int(sel.sum()),
                     mean(integrand), mean(ce), mean(alone)))
  return rows


def write_bound_profile(run, batches, prefix, bins):
  """bound_profile as PREFIX.csv and a plot, PREFIX.png (integrand by log-SNR, latent
  cross-entropy by t, one line per W)."""
  rows = bound_profile(run, batches, bins)
  with open(f"{prefix}.csv", "w") as f:
    f.write("window,bin_by,lo,hi,draws,integrand_nats,latent_ce_nats,latent_only_ce_nats\n")
    for r in rows:
      f.write(",".join(str(v) if isinstance(v, (str, int)) else f"{v:.6g}" for v in r) + "\n")
  plt = plotting()
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
  for w in dict.fromkeys(r[0] for r in rows):
    for ax, bin_by, col in ((left, "log_snr", 5), (right, "t", 6)):
      sel = [r for r in rows if r[0] == w and r[1] == bin_by]
      ax.plot([(r[2] + r[3]) / 2 for r in sel], [r[col] for r in sel], "o-", label=f"W={w}")
  alone = [r for r in rows if r[0] == rows[0][0] and r[1] == "t"]
  right.plot([(r[2] + r[3]) / 2 for r in alone], [r[7] for r in alone], "k--",
             label="the latent alone (uniform prior)")
  left.set_yscale("log")
  left.set(xlabel="log-SNR lambda", ylabel="1/2 exp(lambda) ||e - e_hat||^2 (nats)",
           title="the diffusion term's integrand")
  right.set(xlabel="t", ylabel="latent cross-entropy (nats)",
            title="latent cross-entropy by t (shared pattern)")
  for ax in (left, right):
    ax.legend(fontsize=8)
  fig.suptitle(f"{run.workdir} (step {run.step}), held-out", fontsize=9)
  fig.tight_layout()
  fig.savefig(f"{prefix}.png", dpi=100)
  plt.close(fig)
  print(f"bound profile: {prefix}.csv, {prefix}.png")


def floats(text):
  return [float(x) for x in text.split(",")]


def add_bound_args(p):
  p.add_argument("--workdir", required=True)
  p.add_argument("--log_snr_min", type=floats, default=[-12.0])
  p.add_argument("--log_snr_max", type=floats, default=[10.0, 6.0, 4.0, 2.0, 0.0])
  p.add_argument("--batches", type=int, default=4)
  p.add_argument("--profile", help="also write where the bound goes to PREFIX.csv and .png")
  p.add_argument("--bins", type=int, default=16, help="of the profile")


# ---------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------


def run_memory(args, rest):
  """Temporary memory of the compiled train step (one device) for growing sequence lengths,
  with dense, chunked and block-sparse attention and, with --vocab_chunk, chunked attention
  and a vocabulary-chunked loss: what each saves against dense. The step is the Trainer's
  (train.build_step: its shardings and donation), lowered from shapes only."""
  base = cli.load_config_file(args.config)
  cli.apply_overrides(base, rest)
  kinds = args.kinds.split(",")
  if kinds[0] != "dense" or not set(kinds) <= set(ATTENTION_KINDS):
    raise UserError(f"--kinds must start with dense and name only {', '.join(ATTENTION_KINDS)}, "
                    f"got {args.kinds}")
  variants = {kind: dict(model=dict(attention=kind)) for kind in kinds}
  if args.vocab_chunk:
    variants[f"chunked, vocab_chunk={args.vocab_chunk}"] = dict(
        model=dict(attention="chunked"), loss=dict(vocab_chunk=args.vocab_chunk))
  print(f"machine: {backend.machine()}")
  print(f"config: {args.config} {' '.join(rest)} | batch {args.batch_size} | one device | "
        f"temporary memory of the compiled train step, MiB")
  others = list(variants)[1:]
  print(" | ".join(["seq_len", *variants, *(f"dense / {name}" for name in others)]))
  for L in args.seq_len:
    temp = {}
    for name, changes in variants.items():
      cfg = ml_collections.ConfigDict(base.to_dict())
      cfg.data.update(seq_len=L, batch_size=args.batch_size)
      cfg.mesh.update(data=1, fsdp=1, tensor=1)
      cfg.train.grad_accum_steps = 1
      cfg.model.update(attention_chunk=min(args.chunk, L))
      for section, fields in changes.items():
        cfg[section].update(fields)
      step = train.build_step(cfg, jax.devices()[:1])
      compiled = step.fn.lower(step.state, step.batch).compile()
      temp[name] = compiled.memory_analysis().temp_size_in_bytes / 2**20
    print(" | ".join([str(L), *(f"{temp[n]:,.1f}" for n in variants),
                      *(f"{temp['dense'] / temp[n]:.2f}" for n in others)]), flush=True)


# ---------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------

ATTENTION_KINDS = ("dense", "chunked", "block_sparse")


def run_attention(args, rest):
  """Each attention kind of model.attention against dense on one two-stream batch (rows with
  W = 1, 4, 16 and L, packed documents): the largest difference of the output and of the
  gradients of q, k and v, and the median time of forward plus backward."""
  if rest:
    raise UserError(f"bench attention takes no config overrides, got {' '.join(rest)}")
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
  B, L, N, K, H = args.batch_size, args.seq_len, args.heads, args.kv_heads, args.head_dim
  key = jax.random.key(0)
  q, k, v, probe = (jax.random.normal(jax.random.fold_in(key, i), (B, 2 * L, n, H), dtype)
                    for i, n in enumerate((N, K, K, N)))
  half = jnp.arange(L) < L // 2
  seg = jnp.broadcast_to(jnp.where(half, 1, 2), (B, L)).astype(jnp.int32)   # two documents
  window = jnp.asarray([(1, 4, 16, L)[i % 4] for i in range(B)])
  spec = attention.two_stream_spec(seg, window, jnp.zeros((B,), jnp.int32))
  calls = {"dense": lambda q, k, v: attention.dot_product_attention(
               q, k, v, attention.spec_mask(spec, spec)),
           "chunked": lambda q, k, v: attention.chunked_attention(q, k, v, spec, args.chunk),
           "block_sparse": lambda q, k, v: attention.block_sparse_attention(q, k, v, spec,
                                                                             args.chunk),
           "cudnn": lambda q, k, v: attention.fused_attention(
               q, k, v, attention.spec_mask(spec, spec))}
  for kind in args.kinds.split(","):
    if kind not in calls:
      raise UserError(f"--kinds: no attention kind {kind!r} (kinds: {', '.join(calls)})")
    attention.check_backend(kind)
  results = {}
  for kind in args.kinds.split(","):
    objective = lambda q, k, v, f=calls[kind]: jnp.sum(f(q, k, v).astype(jnp.float32) * probe)
    fn = jax.jit(jax.value_and_grad(objective, argnums=(0, 1, 2)))
    out = jax.jit(calls[kind])(q, k, v)
    jax.block_until_ready(fn(q, k, v))                     # compiles
    seconds = []
    for _ in range(args.repeats):
      start = time.perf_counter()
      jax.block_until_ready(fn(q, k, v))
      seconds.append(time.perf_counter() - start)
    results[kind] = dict(out=out, grads=fn(q, k, v)[1], median_s=float(np.median(seconds)))
  base = results.get("dense")
  print(f"machine: {backend.machine()}")
  print(f"batch {B} x 2 x {L} positions, {N} heads ({K} kv) of {H}, {args.dtype}, chunk "
        f"{args.chunk}; forward + backward, median of {args.repeats}")
  print("kind | ms | max |out - dense| | max |grad - dense| | dense / kind")
  summary = {}
  for kind, r in results.items():
    diff = lambda a, b: float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
    out_diff = diff(r["out"], base["out"]) if base else None
    grad_diff = (max(diff(a, b) for a, b in zip(r["grads"], base["grads"])) if base else None)
    speedup = base["median_s"] / r["median_s"] if base else None
    summary[kind] = dict(median_s=r["median_s"], max_out_diff=out_diff,
                         max_grad_diff=grad_diff, dense_over_kind=speedup)
    print(f"{kind} | {r['median_s'] * 1000:.2f} | " + " | ".join(
        "" if x is None else f"{x:.3g}" for x in (out_diff, grad_diff, speedup)))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(machine=backend.machine(), shape=[B, 2 * L, N, K, H], dtype=args.dtype,
                     chunk=args.chunk, results=summary), f, indent=1)
  return summary


def add_attention_args(p):
  p.add_argument("--seq_len", type=int, default=1024, help="L: the attention spans 2L")
  p.add_argument("--batch_size", type=int, default=4)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--kv_heads", type=int, default=8)
  p.add_argument("--head_dim", type=int, default=64)
  p.add_argument("--chunk", type=int, default=256, help="model.attention_chunk")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--kinds", default=",".join(ATTENTION_KINDS))
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--json", help="also write the figures to this JSON file")


def ints(text):
  return [int(x) for x in text.split(",")]


def add_memory_args(p):
  p.add_argument("--config", required=True, help="config file, e.g. configs/tiny.py")
  p.add_argument("--seq_len", type=ints, default=[256, 512, 1024, 2048])
  p.add_argument("--batch_size", type=int, default=1)
  p.add_argument("--chunk", type=int, default=256, help="model.attention_chunk")
  p.add_argument("--kinds", default=",".join(ATTENTION_KINDS),
                 help="model.attention kinds to compile, dense first")
  p.add_argument("--vocab_chunk", type=int, default=0,
                 help="also measure chunked attention with this loss.vocab_chunk")


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------


def run_data(args, rest):
  """Batches per second of `data.make_dataset` for one host's share of --target's batch."""
  del rest
  target = cli.load_config_file(args.target)
  shapes = jax.eval_shape(lambda r: state_lib.init_params(
      model_lib.EvoTransformer(model_lib.from_config(target.model)), r), jax.random.key(0))
  step_flops = flops.model_flops(target, sum(x.size for x in jax.tree.leaves(shapes)))
  hosts = args.chips // args.chips_per_host
  step_s = step_flops / (args.chips * args.peak * args.mfu)
  rows, seq_len = target.data.batch_size // hosts, target.data.seq_len
  consumed = rows * seq_len / step_s       # tokens per second per host
  metas = data.prepared_corpus(args.corpus)
  if not (metas or args.tokenizer):
    raise UserError(f"--corpus {args.corpus} is raw text: give its --tokenizer")
  tokenizer = data.load_tokenizer(args.tokenizer or prepared.tokenizer_file(metas[0]))
  heldout_fraction = metas[0]["heldout_fraction"] if metas else 0.05
  print(f"{args.target}: {target.data.batch_size} x {seq_len} tokens per step, "
        f"{step_flops:.3g} model FLOPs; on {args.chips} chips ({hosts} hosts) at {args.mfu:.0%} "
        f"of {args.peak:.3g} FLOP/s a step takes {step_s:.2f} s: each host consumes {rows} rows "
        f"per step, {consumed:,.0f} tokens/s")
  results = []
  for workers in args.workers:
    ds = data.make_dataset(args.corpus, "train", tokenizer, seq_len, rows, seed=0,
                           heldout_fraction=heldout_fraction, text_field=args.text_field,
                           workers=workers, mixture=tuple(args.mixture))
    it = iter(ds)
    next(it)                               # start-up: workers, file handles
    batches, tokens, start = 0, 0, time.perf_counter()
    while time.perf_counter() - start < args.seconds:
      batch = next(it)
      batches, tokens = batches + 1, tokens + int((batch["segment_ids"] > 0).sum())
    seconds = time.perf_counter() - start
    if hasattr(it, "close"):
      it.close()
    result = dict(workers=workers, rows_per_s=batches * rows / seconds,
                  tokens_per_s=tokens / seconds, times_consumption=tokens / seconds / consumed)
    results.append(result)
    print(f"workers {workers}: {result['rows_per_s']:,.1f} rows/s, "
          f"{result['tokens_per_s']:,.0f} tokens/s: {result['times_consumption']:.1f}x what a "
          f"host consumes", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(corpus=args.corpus, target=args.target, hosts=hosts, step_s=step_s,
                     rows_per_host=rows, seq_len=seq_len, consumed_tokens_per_s=consumed,
                     results=results), f, indent=1)
  return results


def add_data_args(p):
  p.add_argument("--corpus", required=True, help="data.corpus: prepared directories or files")
  p.add_argument("--tokenizer", default="", help="for a raw corpus (prepared: its own)")
  p.add_argument("--text_field", default="text", help="of a raw .jsonl corpus")
  p.add_argument("--mixture", type=floats, default=[], help="data.mixture, comma-separated")
  p.add_argument("--workers", type=ints, default=[0, 2], help="data.workers values to time")
  p.add_argument("--target", default="configs/evo_8b.py", help="the config whose step to feed")
  p.add_argument("--chips", type=int, default=64, help="chips of the slice (v5p-128: 64)")
  p.add_argument("--chips_per_host", type=int, default=4)
  p.add_argument("--peak", type=float, default=459e12, help="bf16 FLOP/s per chip (v5p)")
  p.add_argument("--mfu", type=float, default=0.5, help="the step's share of the peak")
  p.add_argument("--seconds", type=float, default=10.0, help="per --workers value")
  p.add_argument("--json", default="", help="also write the figures here")


COMMANDS = {"data": (add_data_args, run_data), "decode": (add_decode_args, run_decode),
            "train": (add_train_args, run_train),
            "bound": (add_bound_args, run_bound), "memory": (add_memory_args, run_memory),
            "attention": (add_attention_args, run_attention)}


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
