"""`python -m evo_jax.ablations`: each table's command, run on a small model for one step
(with two rows and one: every row trains the same way, and a row costs a compile of its train
step), trains its rows and writes one row of held-out and decoding numbers per run; the second
table reuses the reference row the first one trained; every row of every table is a valid
config."""
import csv
import json
import math

import conftest
from evo_jax import ablations
from evo_jax import train

SMALL = [f"--config.model.{k}={v}" for k, v in dict(
    vocab_size=512, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64, time_dim=16,
    fourier_dim=16, time_rank=8).items()]
FEW_STEPS = [f"--config.{k}={v}" for k, v in {
    "data.seq_len": 32, "data.batch_size": 8, "train.steps": 1, "train.log_every": 1,
    "train.eval_every": 1, "train.ckpt_every": 1, "train.eval_batches": 1, "train.samples": 0,
    "optim.warmup_steps": 1}.items()]
# One policy beyond the greedy ar and ar_clean that bench decode always runs.
DECODE = ["--n_prompts", "2", "--prompt_len", "8", "--max_new_tokens", "8", "--policies",
          "block"]


def read_table(out, table):
  with open(out / f"{table}.csv") as f:
    return list(csv.DictReader(f))


def test_a_table_trains_its_rows_and_writes_them(stdlib_tokenizer, tmp_path, monkeypatch):
  # One device: a mesh of 8 simulated ones would only make each row compile longer.
  trainer = train.Trainer
  monkeypatch.setattr(train, "Trainer", lambda cfg, workdir: trainer(
      cfg, workdir, devices=conftest.one_device()))
  out = tmp_path / "ablations"
  common = ["--out", str(out), *DECODE, *SMALL, *FEW_STEPS,
            f"--config.data.tokenizer={stdlib_tokenizer}"]
  ablations.main(["progression", "--rows", "evo,ar", *common])
  lines = read_table(out, "progression")
  assert [r["row"] for r in lines] == ["evo", "ar"]
  for r in lines:
    for column in ("AR-path ppl", "clean ppl", "bound W=1 bpt", "bound W=L bpt", "W=L / AR",
                   "block tok/fwd", "block AR-NLL"):
      assert math.isfinite(float(r[column])) and float(r[column]) > 0, (r["row"], column)
  assert "| evo |" in (out / "progression.md").read_text()
  saved = json.loads((out / "ar" / "config.json").read_text())
  assert saved["progression"]["window_sizes"] == [1] and saved["progression"]["p_t_one"] == 1.0
  assert saved["train"]["steps"] == 1

  # The second table reads the reference row the first one trained.
  trained = (out / "reference" / "metrics.jsonl").read_text()
  ablations.main(["conditioning", "--rows", "adaln", *common])
  assert (out / "reference" / "metrics.jsonl").read_text() == trained
  assert read_table(out, "conditioning")[0]["AR-path ppl"] == lines[0]["AR-path ppl"]


def test_every_row_is_a_valid_config():
  for table, rows in ablations.TABLES.items():
    for name, overrides in rows.items():
      cfg = ablations.row_config(ablations.REFERENCE_CONFIG, [], overrides)   # checked
      assert cfg.train.steps == 2000, (table, name)


def test_bad_rows_and_settings_are_one_line_errors(capsys, tmp_path):
  out = ["--out", str(tmp_path / "x")]
  conftest.one_line_error(capsys, ablations.main, ["progression", *out, "--rows", "evo,ra"],
                          "table progression has no row 'ra'")
  conftest.one_line_error(capsys, ablations.main, ["conditioning", *out, "--config.trian.steps=2"],
                          "unknown config key: trian.steps")
  assert not (tmp_path / "x").exists()     # every row's config is checked before anything runs
