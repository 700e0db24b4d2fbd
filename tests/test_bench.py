"""`python -m evo_jax.bench train | bound | memory` on small settings: each prints its table, with
progress on stderr (bench decode: test_sample_cli.py)."""
import json
import math

import pytest

from conftest import REPO, SMALL_MODEL
from evo_jax import bench

TINY = str(REPO / "configs" / "tiny.py")


def small(tokenizer):
  """The small model with one layer (these tests compile the train step: the fewer layers the
  quicker), on 8 rows (one per simulated device) of 32 tokens."""
  return [f"--config.model.{k}={v}" for k, v in dict(SMALL_MODEL, vocab_size=512,
                                                      n_layers=1).items()] + [
      f"--config.data.tokenizer={tokenizer}", "--config.data.seq_len=32",
      "--config.data.batch_size=8"]


def test_bench_train_times_the_evo_and_causal_steps(stdlib_tokenizer, capsys, tmp_path):
  """One run times the Evo step, the plain causal step of the same backbone on the same rows,
  and an --against variant, interleaved; the ratios are those of the printed medians, and the
  model FLOPs of the causal step are what its traced program multiplies (the matmuls of its
  parameters and of every attention score, forward and backward) to within a few percent."""
  summary = bench.main(["train", "--config", TINY, "--steps", "2", *small(stdlib_tokenizer),
                        "--against", "data.shuffle_rows=64",      # the same program, other rows
                        "--json", str(tmp_path / "train.json")])
  out = capsys.readouterr()
  rows = [line for line in out.out.splitlines() if "median step " in line]
  assert [r.split(":")[0] for r in rows] == ["evo", "causal", "data.shuffle_rows=64"]
  assert " of peak | batch 8 x 32" in rows[0] and out.out.startswith("machine: CPU")
  ms = [float(r.split("median step ")[1].split(" ms")[0]) for r in rows]
  last = out.out.strip().splitlines()
  assert last[-2].startswith("Evo tax (evo / causal step time): ")
  assert float(last[-2].split(": ")[1]) == pytest.approx(ms[0] / ms[1], rel=0.05)
  assert last[-1].startswith("ratio (data.shuffle_rows=64 / evo): ")
  assert float(last[-1].split(": ")[1]) == pytest.approx(ms[2] / ms[0], rel=0.05)
  assert "timing: 2 steps done in" in out.err
  assert json.loads((tmp_path / "train.json").read_text())["ratios"] == summary["ratios"]
  evo, causal = summary["results"]["evo"], summary["results"]["causal"]
  assert causal["traced_flops"] == pytest.approx(causal["model_flops"], rel=0.05)
  # The Evo step also computes what its loss adds (the posterior term).
  assert evo["traced_flops"] >= evo["model_flops"] > 2 * causal["model_flops"]
  assert 0 < evo["share_of_peak"] < 1


def test_bench_bound_rows_add_up(tiny_run, capsys):
  bench.main(["bound", "--workdir", tiny_run, "--log_snr_max", "4,0", "--batches", "1"])
  lines = capsys.readouterr().out.strip().splitlines()
  header = lines[2].split(" | ")
  assert header[:3] == ["lambda_min", "lambda_max", "bound_w1"]
  rows = [dict(zip(header, map(float, line.replace(",", "").split(" | ")))) for line in lines[3:]]
  assert [(r["lambda_min"], r["lambda_max"]) for r in rows] == [(-12, 4), (-12, 0)]
  for r in rows:
    parts = r["bound_w1_diffusion"] + r["bound_w1_recon"] + r["bound_w1_prior"]
    assert r["bound_w1"] == pytest.approx(parts, abs=0.01) and r["AR-path"] > 0


def test_bench_bound_profile_is_the_bound_binned(tiny_run, tmp_path, capsys):
  """The profile's integrand, averaged over its log-SNR bins and times the range, is the
  table's diffusion term for the run's own range (the same draws), for each W."""
  prefix = str(tmp_path / "profile")
  bench.main(["bound", "--workdir", tiny_run, "--log_snr_max", "4", "--batches", "1",
              "--bins", "4", "--profile", prefix])
  lines = capsys.readouterr().out.strip().splitlines()
  header, row = lines[2].split(" | "), lines[3].replace(",", "").split(" | ")
  table = dict(zip(header, map(float, row)))
  with open(prefix + ".csv") as f:
    rows = [line.strip().split(",") for line in f]
  assert rows[0] == ["window", "bin_by", "lo", "hi", "draws", "integrand_nats", "latent_ce_nats",
                     "latent_only_ce_nats"]
  rows = rows[1:]
  windows = sorted({r[0] for r in rows})
  assert len(rows) == len(windows) * 2 * 4 and windows   # per W, by log-SNR and by t, 4 bins
  for w in windows:
    by_snr = [r for r in rows if r[0] == w and r[1] == "log_snr"]
    by_t = [r for r in rows if r[0] == w and r[1] == "t"]
    n = sum(int(r[4]) for r in by_snr)
    assert n == sum(int(r[4]) for r in by_t) > 0
    term = sum(int(r[4]) * float(r[5]) for r in by_snr if int(r[4])) / n * 16 / math.log(2)
    assert term == pytest.approx(table[f"bound_w{w}_diffusion"], rel=2e-3)
    assert all(float(r[7]) > 0 for r in by_t if int(r[4]))   # the latent-only posterior's CE
  assert (tmp_path / "profile.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_memory_compiles_the_trainers_step(stdlib_tokenizer, capsys):
  bench.main(["memory", "--config", TINY, "--seq_len", "32", "--chunk", "16", "--batch_size",
              "2", "--kinds", "dense", "--vocab_chunk", "128", *small(stdlib_tokenizer)])
  *_, header, row = capsys.readouterr().out.strip().splitlines()
  assert header.split(" | ")[1:] == ["dense", "chunked, vocab_chunk=128",
                                     "dense / chunked, vocab_chunk=128"]
  L, dense, chunked, ratio = (float(x.replace(",", "")) for x in row.split(" | "))
  assert L == 32 and dense > 0 and chunked > 0
  assert ratio == pytest.approx(dense / chunked, rel=0.05)      # of the rounded figures


def test_bench_attention_compares_every_kind_with_dense(capsys, tmp_path):
  summary = bench.main(["attention", "--seq_len", "32", "--batch_size", "4", "--chunk", "8",
                        "--heads", "4", "--kv_heads", "2", "--head_dim", "8", "--repeats", "1",
                        "--json", str(tmp_path / "attention.json")])
  rows = capsys.readouterr().out.strip().splitlines()[3:]
  assert [r.split(" | ")[0] for r in rows] == ["dense", "chunked", "block_sparse"]
  for kind in ("chunked", "block_sparse"):
    assert summary[kind]["max_out_diff"] < 1e-5 and summary[kind]["max_grad_diff"] < 1e-4
  assert json.loads((tmp_path / "attention.json").read_text())["results"] == summary
