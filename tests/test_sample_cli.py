"""The decoding tools on a (very briefly) trained run: `python -m evo_jax.sample` and
`python -m evo_jax.bench decode`. Bad input is one line on stderr and exit status 2."""
import json
import subprocess
import sys

import pytest

from conftest import REPO, one_line_error
from evo_jax import bench
from evo_jax import sample


@pytest.fixture
def workdir(tiny_run):
  return tiny_run      # 4 steps of the small model, a 64-token context


def test_bad_input_before_loading_the_run(tmp_path, capsys):
  (tmp_path / "nockpt").mkdir()
  (tmp_path / "nockpt" / "config.json").write_text("{}")
  latin1 = tmp_path / "prompts.txt"
  latin1.write_bytes("caf\u00e9\n".encode("latin-1"))
  cases = [
      (["--workdir", str(tmp_path), "--policy", "beam", "--prompt", "x"], "unknown policy 'beam'"),
      (["--workdir", str(tmp_path), "--prompt", ""], "empty prompt"),
      (["--workdir", str(tmp_path)], "no prompt"),
      (["--workdir", str(tmp_path), "--prompt", "x", "--policy.windw=2"], "unknown policy setting"),
      (["--workdir", str(tmp_path), "--prompt", "x", "--max_new_tokens", "many"], "many"),
      (["--workdir", str(tmp_path / "nowhere"), "--prompt", "x"], "no run in", "nowhere"),
      (["--workdir", str(tmp_path / "nockpt"), "--prompt", "x"], "no checkpoint in"),
      (["--workdir", str(tmp_path), "--prompts_file", str(latin1)],
       f"prompts file {latin1} is not valid UTF-8 (line 1, byte 3)"),
      (["--workdir", str(tmp_path), "--prompts_file", str(tmp_path)],
       f"prompts file {tmp_path} is a directory, not a file"),
  ]
  for argv, *fragments in cases:
    one_line_error(capsys, sample.main, argv, *fragments)


def test_module_entry_point_exits_2():
  result = subprocess.run([sys.executable, "-m", "evo_jax.sample", "--workdir", "w", "--policy",
                           "beam", "--prompt", "x"], capture_output=True, text=True, cwd=REPO,
                          timeout=120)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      "error: unknown policy 'beam' (expected one of ar, ar_clean, verify, diffusion, block, evo)"]


def test_prompt_longer_than_the_context(workdir, tmp_path, capsys):
  one_line_error(capsys, sample.main,
                 ["--workdir", workdir, "--prompt", "def f(x):\n    return x\n" * 32],
                 "prompt 1 has", "context is 64")
  (tmp_path / "p.jsonl").write_text('"def f():"\n""\n')
  one_line_error(capsys, sample.main,
                 ["--workdir", workdir, "--prompts_file", str(tmp_path / "p.jsonl")],
                 "line 2: empty prompt")


def test_json_output_and_trajectory_png(workdir, tmp_path, capsys):
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text(json.dumps("def main():\n    ") + "\n" + json.dumps({"prompt": "import"}))
  sample.main(["--workdir", workdir, "--policy", "evo", "--prompts_file", str(prompts),
               "--max_new_tokens", "6", "--json", "--trajectory", str(tmp_path / "t.png"),
               "--policy.window=4", "--temperature", "0.7", "--top_p", "0.9", "--seed", "3"])
  records = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
  assert [r["prompt"] for r in records] == ["def main():\n    ", "import"]
  for r in records:
    assert r["policy"] == "evo" and r["settings"]["window"] == 4
    assert 1 <= len(r["tokens"]) <= 6 and r["nfe"] >= 1 and isinstance(r["text"], str)
    assert r["tokens_per_forward"] == pytest.approx(len(r["tokens"]) / r["nfe"])
    assert r["tokens_per_sec"] > 0 and r["stop_reason"] in ("eos", "length")
  assert (tmp_path / "t-1.png").exists() and (tmp_path / "t-2.png").exists()


def test_bench_decode_table(workdir, tmp_path, capsys):
  rows = bench.main(["decode", "--workdir", workdir, "--policies",
                     "ar,ar_clean,verify:window=3", "--n_prompts", "3",
                     "--prompt_len", "8", "--max_new_tokens", "8", "--batch_sizes", "3",
                     "--repeats", "1", "--verify.steps=1",
                     "--json", str(tmp_path / "bench.json"), "--plot", str(tmp_path / "p.png")])
  out = capsys.readouterr().out
  assert "| policy" in out and "| ar " in out and "| verify " in out and "held-out text" in out
  assert "tok/s b=3" in out
  by_name = {r["policy"]: r for r in rows}
  assert by_name["ar"]["tokens_per_forward"] == by_name["ar_clean"]["tokens_per_forward"] == 1.0
  assert by_name["ar_clean"]["settings"] == "clean stream"
  assert by_name["ar"]["same_as_ar"] == by_name["ar_clean"]["same_as_ar_clean"] == 1.0
  [verify] = [r for r in rows if r["policy"] == "verify"]
  assert verify["policy_settings"]["window"] == 3 and verify["policy_settings"]["steps"] == 1
  assert verify["same_as_ar_clean"] == 1.0                # lossless: greedy verify is ar_clean's
  assert verify["tokens_per_forward"] == pytest.approx(1 + verify["drafts_per_pass"])
  for r in rows:
    assert r["nll"] > 0 and r["entropy"] >= 0
  assert json.loads((tmp_path / "bench.json").read_text())["rows"][1]["policy"] == "ar"
  assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
  one_line_error(capsys, bench.main, ["decode", "--workdir", workdir, "--nope=1"],
                 "unknown argument: --nope=1")
  one_line_error(capsys, bench.main, ["decode", "--workdir", workdir, "--prompt_len", "30"],
                 "--prompt_len + --max_new_tokens = 94", "context of 64 tokens")
