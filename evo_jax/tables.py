"""The paper's tables from evaluation results: `python -m evo_jax.tables results/*.json --out DIR`.

Reads the results files of `python -m evo_jax.evaluate` and writes to DIR:
  tables.md             every table below, in Markdown, with the sources of the reference figures;
  benchmarks.csv        (1) the benchmark table in the layout of LLaDA's base-model table:
                        benchmarks as rows (with their shots), the reference models' published
                        scores (evo_jax/reference_results.json, with its sources), then one column
                        per evaluated checkpoint (score +- standard error; its shots when they
                        differ from the reference's). A benchmark outside the reference list gets
                        a row of its own; when several results fill one cell, the last one given
                        wins (the ablation table shows them all);
  decoding.csv          (2) per generation result: policy, settings, NFE, tokens per forward pass,
                        tokens per second, score;
  ablation-NAME.csv     (3) per benchmark with several results: the settings in which they differ
                        (run config, policy, task options), and the score;
  score_vs_speed.png    score against tokens per second, one marker per policy.
"""
import csv
import json
import os
import re
import sys

from evo_jax import cli
from evo_jax import config
from evo_jax import decoding
from evo_jax import files
from evo_jax.errors import UserError

REFERENCE_FILE = os.path.join(os.path.dirname(__file__), "reference_results.json")


class TablesError(UserError):
  pass


def load_results(paths):
  results = []
  for path in paths:
    text = files.read_text(path, "results file")
    try:
      record = json.loads(text)
    except ValueError:
      raise TablesError(f"{path}: not valid JSON") from None
    required = {"task", "benchmark", "metric", "checkpoint"}
    if not isinstance(record, dict) or not required <= set(record):
      raise TablesError(f"{path}: not a results file of python -m evo_jax.evaluate")
    results.append(record)
  if not results:
    raise TablesError("no results files given")
  return results


def key(name):
  """Benchmark names compared loosely: 'ARC-C' = 'arc_c' = 'arcc'."""
  return re.sub(r"[^a-z0-9]", "", name.lower())


def run_name(r):
  return f"{os.path.basename(r['checkpoint']['workdir'].rstrip('/'))}@{r['checkpoint']['step']}"


def fmt(value, digits=1):
  return "" if value is None else f"{value:,.{digits}f}"


def benchmark_table(results, reference):
  """(header, rows, notes) of the benchmark table."""
  models = reference["models"]
  runs = list(dict.fromkeys(run_name(r) for r in results))
  rows = {key(b["name"]): [b["name"], b["shots"]] + [b["scores"].get(m) for m in models]
          for b in reference["benchmarks"]}
  cells = {}
  for r in results:
    k = key(r["benchmark"])
    if k not in rows:        # not in the reference table: a row of its own
      label = r["shots"] if r["score"] is not None else None
      rows[k] = [r["benchmark"], label] + [None] * len(models)
    cells[k, run_name(r)] = r
  header = ["Benchmark"] + models + runs
  table = []
  for k, (name, shots, *scores) in rows.items():
    line = [f"{name} ({shots}-shot)" if shots is not None else name] + [fmt(s) for s in scores]
    for run in runs:
      r = cells.get((k, run))
      if r is None:
        line.append("")
        continue
      if r["score"] is not None:
        # No standard error from one example (a HumanEval run of one problem, say).
        stderr = r.get("score_stderr")
        text = f"{r['score']:.1f}" + ("" if stderr is None else f" ± {stderr:.1f}")
      else:
        text = f"{r['metric']['value']:.3f} {r['metric']['name']}"
      line.append(text + (f" ({r['shots']}-shot)" if shots is not None and r["shots"] != shots
                          else ""))
    table.append(line)
  notes = [f"{m}: {reference['sources'][m]}" for m in models] + reference["notes"]
  return header, table, notes


def decoding_table(results):
  header = ["run", "benchmark", "policy", "settings", "NFE", "tokens/forward", "tokens/s", "score"]
  rows = []
  for r in results:
    d = r.get("decoding")
    if not d:
      continue
    policy = decoding.Policy(**r["policy_settings"])
    rows.append([run_name(r), r["benchmark"], r["policy"],
                 policy.describe(r["max_new_tokens"]), fmt(d["nfe"]),
                 fmt(d["tokens_per_forward"], 2), fmt(d["tokens_per_sec"], 0), fmt(r["score"])])
  return header, rows


def settings_of(r):
  """Everything a result was run with, flattened: run config, task options, policy."""
  out = {f"config.{k}": v for k, v in config.flatten(r.get("config") or {}).items()}
  out.update({f"option.{k}": v for k, v in (r.get("options") or {}).items()})
  out.update({f"policy.{k}": v for k, v in (r.get("policy_settings") or {}).items()
              if k != "name"})
  out.update({k: r.get(k) for k in ("policy", "shots", "temperature", "top_p", "seed")})
  return out


def ablation_tables(results):
  """{benchmark: (header, rows)} over the results of each benchmark that differ in settings."""
  groups = {}
  for r in results:
    groups.setdefault(r["benchmark"], []).append(r)
  tables = {}
  for name, group in groups.items():
    settings = [settings_of(r) for r in group]
    names = sorted(set().union(*settings))
    varying = [k for k in names
               if len({json.dumps(s.get(k), sort_keys=True) for s in settings}) > 1]
    if len(group) < 2 or not varying:
      continue
    rows = [[run_name(r)] + [json.dumps(s.get(k)) if isinstance(s.get(k), (list, dict)) else
                             str(s.get(k)) for k in varying] +
            [fmt(r["score"]) if r["score"] is not None else f"{r['metric']['value']:.3f}"]
            for r, s in zip(group, settings)]
    tables[name] = (["run"] + varying + ["score"], rows)
  return tables


def markdown(header, rows):
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def write_csv(path, header, rows):
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)


def plot_score_vs_speed(results, path):
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    raise TablesError("the plot needs matplotlib: pip install -e '.[eval]'") from None
  fig, ax = plt.subplots(figsize=(6, 4))
  by_policy = {}
  for r in results:
    if r.get("decoding") and r["score"] is not None:
      by_policy.setdefault(r["policy"], []).append(r)
  for policy, rs in sorted(by_policy.items()):
    ax.scatter([r["decoding"]["tokens_per_sec"] for r in rs], [r["score"] for r in rs],
               label=policy)
    for r in rs:
      ax.annotate(r["benchmark"], (r["decoding"]["tokens_per_sec"], r["score"]), fontsize=7)
  ax.set_xlabel("tokens per second")
  ax.set_ylabel("score (%)")
  ax.set_title("score against decoding speed, per policy")
  if by_policy:
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def render(paths, out_dir, reference_file=REFERENCE_FILE):
  """Writes every table and the plot to out_dir; returns the Markdown text."""
  results = load_results(paths)
  with open(reference_file) as f:
    reference = json.load(f)
  os.makedirs(out_dir, exist_ok=True)
  header, rows, notes = benchmark_table(results, reference)
  write_csv(os.path.join(out_dir, "benchmarks.csv"), header, rows)
  parts = ["## Benchmarks", markdown(header, rows), "Reference figures:\n" +
           "\n".join(f"- {n}" for n in notes)]
  header, rows = decoding_table(results)
  write_csv(os.path.join(out_dir, "decoding.csv"), header, rows)
  parts += ["## Decoding", markdown(header, rows) if rows else "(no generation results)"]
  parts.append("## Ablations")
  ablations = ablation_tables(results)
  for name, (header, rows) in ablations.items():
    write_csv(os.path.join(out_dir, f"ablation-{key(name)}.csv"), header, rows)
    parts += [f"### {name}", markdown(header, rows)]
  if not ablations:
    parts.append("(no benchmark has results that differ in their settings)")
  plot_score_vs_speed(results, os.path.join(out_dir, "score_vs_speed.png"))
  text = "\n\n".join(parts) + "\n"
  with open(os.path.join(out_dir, "tables.md"), "w") as f:
    f.write(text)
  return text


def main(argv=None):
  with cli.command():
    parser = cli.OneLineParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("results", nargs="+", help="results files of python -m evo_jax.evaluate")
    parser.add_argument("--out", required=True, help="where the tables go")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    print(render(args.results, args.out))


if __name__ == "__main__":
  main()
