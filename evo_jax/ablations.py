"""The paper's ablation tables at small scale: `python -m evo_jax.ablations TABLE --out DIR`.

Each row of a table is the reference run (configs/reference.py: the same data, the same steps)
with a few fields changed (TABLES). The command trains every row into DIR/ROW_NAME (resuming
what a killed command left; a finished row is only read), then writes DIR/TABLE.csv and
DIR/TABLE.md with, per row: the held-out numbers of its last step from metrics.jsonl (AR-path
and clean perplexity, the bounds at W = 1 and W = L in bits per token and as a multiple of the
AR path), the median training tokens per second, and the decoding benchmark of `bench decode`
on held-out prompts (tokens per forward pass and the AR-NLL of the text under the row's own
model, per policy in --policies).

        python -m evo_jax.ablations progression --out runs/ablations [--config configs/reference.py]
            [--rows evo,ar] [--policies ar,verify,evo,block]
            [--n_prompts 16] [--prompt_len 32] [--max_new_tokens 64] [--config.a.b=v ...]

The reference row of every table (no overrides) is one run, DIR/reference, so a second table in
the same DIR reuses it. --config.a.b=v changes every row (a test runs
the tables on a small model for a few steps that way). Results: docs/training.md, "The
ablation tables".
"""
import argparse
import csv
import os
import sys

import numpy as np

from evo_jax import bench
from evo_jax import cli
from evo_jax import guards
from evo_jax import loss as loss_lib
from evo_jax import metrics
from evo_jax import model as model_lib
from evo_jax import train
from evo_jax.errors import UserError

REFERENCE_CONFIG = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs",
                                "reference.py")

# TABLE -> {row: the --config overrides of the reference run}. A row trains in DIR/ROW; the rows
# without overrides, one per table, share DIR/reference.
TABLES = {
    # Which progressions training sees (method.md section 4).
    "progression": {
        "evo": [],                                   # the default mixture of W and patterns
        "ar": ["--config.progression.window_sizes=1", "--config.progression.window_probs=1.0",
               "--config.progression.p_t_one=1.0"],   # W = 1 at t = 1 only: an AR model
        "diffusion": ["--config.progression.window_sizes=-1",
                      "--config.progression.window_probs=1.0"],   # W = L only
        # the "evolving balance": AR-heavy at the start, the default mixture from step 1,000
        "curriculum": ["--config.progression.window_probs_start=(0.7,0.1,0.1,0.1)",
                       "--config.progression.curriculum_steps=1000"],
    },
    # How the network is told t (method.md section 2) and what else a latent reads.
    "conditioning": {
        "adaln": [],
        "adaln_lowrank": ["--config.model.time_cond=adaln_lowrank"],
        "add": ["--config.model.time_cond=add"],
        "no_time_head": ["--config.loss.time_weight=0.0"],   # the head is there, untrained
        "self_conditioning": ["--config.model.self_conditioning=e_hat"],
    },
}

POLICIES = "ar,verify,evo,block"
HEADER = ["row", "overrides", "step", "AR-path ppl", "clean ppl", "AR-path bpt", "bound W=1 bpt",
          "W=1 / AR", "bound W=L bpt", "W=L / AR", "train tok/s"]


def row_config(base_file, common, overrides):
  """The row's config, checked as the Trainer checks it (a one-line error otherwise)."""
  cfg = cli.load_config_file(base_file)
  cli.apply_overrides(cfg, list(common) + list(overrides))
  model_lib.from_config(cfg.model)
  loss_lib.check_config(cfg)
  return cfg


def heldout_numbers(workdir, steps):
  """The row's held-out record at its last step, and its median training tokens per second."""
  records = metrics.read_metrics(workdir)
  heldout = [r for r in records if r.get("split") == "heldout" and r["step"] == steps]
  if not heldout:
    raise UserError(f"{workdir}/metrics.jsonl has no held-out record of step {steps}")
  r = heldout[-1]
  ar_bpt = r["ar_nll"] / np.log(2)
  speeds = [x["tokens_per_sec"] for x in records
            if x.get("split") == "train" and x.get("tokens_per_sec")]
  return {"step": steps, "AR-path ppl": r["ar_ppl"], "clean ppl": r["clean_ar_ppl"],
          "AR-path bpt": ar_bpt, "bound W=1 bpt": r["bound_w1_bpt"],
          "W=1 / AR": r["bound_w1_bpt"] / ar_bpt, "bound W=L bpt": r["bound_wL_bpt"],
          "W=L / AR": r["bound_wL_bpt"] / ar_bpt,
          "train tok/s": float(np.median(speeds)) if speeds else None}


def decoding_numbers(workdir, args):
  """{--policies item: (tokens per forward, AR-NLL, its settings)} from `bench decode` at one
  batch size."""
  ns = argparse.Namespace(workdir=workdir, policies=args.policies, n_prompts=args.n_prompts,
                          prompt_len=args.prompt_len, max_new_tokens=args.max_new_tokens,
                          batch_sizes=[args.n_prompts], temperature=0.0, top_p=1.0, seed=0,
                          repeats=1, json=None, plot=None)
  rows = bench.run_decode(ns, [])[1:]          # after the held-out text's own row
  items = [item.strip() for item in args.policies.split(",") if item.strip()]
  return {item: (r["tokens_per_forward"], r["nll"], r["settings"])
          for item, r in zip(items, rows)}


def fmt(value):
  if value is None:
    return ""
  if isinstance(value, float):
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}" if abs(value) < 1 else \
        f"{value:.2f}"
  return str(value)


def run_table(args, common):
  rows = TABLES[args.table]
  names = args.rows.split(",") if args.rows else list(rows)
  unknown = [n for n in names if n not in rows]
  if unknown:
    raise UserError(f"table {args.table} has no row {unknown[0]!r} (rows: {', '.join(rows)})")
  configs = {n: row_config(args.config, common, rows[n]) for n in names}   # all checked first
  os.makedirs(args.out, exist_ok=True)
  results = []
  for name in names:
    workdir = os.path.join(args.out, name if rows[name] else "reference")
    cfg = configs[name]
    print(f"== {args.table}/{name}: {workdir} {' '.join(rows[name]) or '(the reference run)'}")
    trainer = train.Trainer(cfg, workdir)
    if not trainer_finished(workdir, cfg.train.steps):
      trainer.run()
      if trainer.stopped_by is not None:   # preempted: saved; rerun the command to go on
        sys.exit(guards.EXIT_CODES[trainer.stopped_by])
    row = {"row": name, "overrides": " ".join(o[len("--config."):] for o in rows[name]),
           **heldout_numbers(workdir, cfg.train.steps)}
    row["decoding"] = decoding_numbers(workdir, args)
    results.append(row)
  command = " ".join(["python -m evo_jax.ablations", args.table, "--out", args.out]
                     + (["--rows", args.rows] if args.rows else []) + list(common))
  write_outputs(args.out, args.table, results, command)
  return results


def trainer_finished(workdir, steps):
  """Whether the row's run reached `steps` (its held-out record of that step is written)."""
  try:
    return any(r.get("split") == "heldout" and r["step"] == steps
               for r in metrics.read_metrics(workdir))
  except FileNotFoundError:
    return False


def write_outputs(out, table, results, command):
  policies = list(dict.fromkeys(p for r in results for p in r["decoding"]))
  header = HEADER + [f"{p} {what}" for p in policies for what in ("tok/fwd", "AR-NLL")]
  cells = []
  for r in results:
    line = [r.get(h) for h in HEADER]
    for p in policies:
      line += list(r["decoding"].get(p, (None, None, None))[:2])
    cells.append(line)
  settings = {p: s for r in results for p, (_, _, s) in r["decoding"].items()}
  with open(os.path.join(out, f"{table}.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(header)
    w.writerows(cells)
  md = [f"# The {table} table", "",
        f"Command: `{command}`; each row the reference run with the overrides "
        "shown. bpt: bits per token (held-out); W=1 / AR: the bound as a multiple of the AR "
        "path; decoding: tokens per forward pass and AR-NLL (nats per token, under the row's "
        "own model, so a row's figures compare with its own `ar`) of greedy decoding on "
        "held-out prompts with: " + "; ".join(f"`{p}` {s}" for p, s in settings.items()) + ".",
        "",
        "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  md += ["| " + " | ".join(fmt(c) for c in line) + " |" for line in cells]
  with open(os.path.join(out, f"{table}.md"), "w") as f:
    f.write("\n".join(md) + "\n")
  print("\n".join(md[4:]))
  print(f"wrote {out}/{table}.csv and {out}/{table}.md")


def main(argv=None):
  with cli.command():
    parser = cli.OneLineParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("table", choices=list(TABLES))
    parser.add_argument("--out", required=True, help="one workdir per row, and the tables")
    parser.add_argument("--config", default=REFERENCE_CONFIG, help="the run every row changes")
    parser.add_argument("--rows", help="comma-separated rows of the table (default: all)")
    parser.add_argument("--policies", default=POLICIES, help="as bench decode's --policies")
    parser.add_argument("--n_prompts", type=int, default=16)
    parser.add_argument("--prompt_len", type=int, default=32)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    args, common = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    return run_table(args, common)


if __name__ == "__main__":
  main()
