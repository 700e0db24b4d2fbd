"""Importing and exporting Hugging Face LLaMA / Qwen checkpoints (evo_jax/convert.py).

Small randomly initialised models of each family are built with `transformers` (CPU torch) and
saved with a tiny byte-level tokenizer; nothing is downloaded."""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from conftest import REPO

from evo_jax import checkpoint, cli, config, convert, decoding, model as model_lib, sample
from evo_jax import run as run_lib, schedule, state as state_lib, train

VOCAB = 260   # 256 byte tokens + 2 special tokens, padded like real checkpoints' vocabularies
COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
              rms_norm_eps=1e-5)
FAMILIES = {
    # LLaMA-3 rope scaling (its three wavelength regimes all occur with head_dim 16), untied.
    "llama": (transformers.LlamaConfig, dict(
        rope_theta=500000.0, tie_word_embeddings=False,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=16))),
    # q/k/v biases, tied head, no bos token.
    "qwen2": (transformers.Qwen2Config, dict(rope_theta=1000000.0, tie_word_embeddings=True)),
    # q/k norms and a head_dim that is not hidden / heads.
    "qwen3": (transformers.Qwen3Config, dict(head_dim=32, tie_word_embeddings=False)),
}


def save_tokenizer(directory, family):
  """A byte-level BPE tokenizer.json with no merges (every byte one token), and its
  tokenizer_config.json naming the special tokens as the family does."""
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  vocab = {c: i for i, c in enumerate(alphabet)}
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens(["<s>", "</s>"])
  tok.save(str(directory / "tokenizer.json"))
  special = {"eos_token": "</s>"} if family == "qwen2" else {"bos_token": "<s>",
                                                             "eos_token": "</s>"}
  (directory / "tokenizer_config.json").write_text(json.dumps(special))


def make_checkpoint(directory, family, **save_kwargs):
  config_class, extra = FAMILIES[family]
  torch.manual_seed(0)
  hf_model = transformers.AutoModelForCausalLM.from_config(
      config_class(**COMMON, **extra), attn_implementation="eager").float().eval()
  directory.mkdir()
  hf_model.save_pretrained(directory, **save_kwargs)
  save_tokenizer(directory, family)
  return hf_model


def run_config(corpus):
  cfg = config.default_config()
  # The options an imported model gains leave its clean stream the original model's (tested
  # with them on: test_clean_stream_is_the_original_model).
  cfg.model.update(time_dim=32, fourier_dim=16, latent_dim=16, self_conditioning="e_hat")
  cfg.data.update(corpus=str(corpus), seq_len=32)
  return cfg


def clean_logits(model, params, tokens_BxT):
  """The clean-stream readout: every position clean, at t = 0, causal (method.md section 2)."""
  B, T = tokens_BxT.shape
  causal = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (B, T, T))
  logits, _ = model.apply(params, tokens_BxT, None, jnp.zeros((B, T), bool),
                          jnp.zeros((B, T)), jnp.broadcast_to(jnp.arange(T), (B, T)), causal)
  return np.asarray(logits)


def hf_logits(hf_model, tokens_BxT):
  with torch.no_grad():
    return hf_model(torch.as_tensor(np.array(tokens_BxT))).logits.numpy()   # a writable copy


def safetensors_of(directory):
  out = {}
  for name in sorted(os.listdir(directory)):
    if name.endswith(".safetensors"):
      with safe_open(str(directory / name), "np") as f:
        out.update({k: f.get_tensor(k) for k in f.keys()})
  return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
  path.write_text("".join(json.dumps({"text": f"def f{i}(x):\n  return x * {i}\n"}) + "\n"
                          for i in range(24)))
  return path


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def imported(request, tmp_path_factory, corpus):
  """(family, original HF model, its directory, the imported workdir)."""
  family = request.param
  root = tmp_path_factory.mktemp(family)
  # Qwen3's checkpoint is sharded: the index path of the reader.
  save_kwargs = dict(max_shard_size="40KB") if family == "qwen3" else {}
  hf_model = make_checkpoint(root / "hf", family, **save_kwargs)
  convert.import_checkpoint(str(root / "hf"), str(root / "evo"), run_config(corpus),
                            log=lambda _: None)
  return family, hf_model, root


def test_clean_stream_is_the_original_model(imported):
  family, hf_model, root = imported
  run = run_lib.load_run(str(root / "evo"))
  model, params, tokenizer, step = run.model, run.params, run.tokenizer, run.step
  assert step == 0 and tokenizer.vocab_size == 258
  assert tokenizer.bos_id == (257 if family == "qwen2" else 256) and tokenizer.eos_id == 257
  assert model.cfg.qkv_bias == (family == "qwen2") and model.cfg.qk_norm == (family == "qwen3")
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, VOCAB)
  np.testing.assert_allclose(clean_logits(model, params, tokens), hf_logits(hf_model, tokens),
                             rtol=0, atol=1e-4)
  text = "def g(y):\n  return y  # ünïcode"
  assert tokenizer.decode(tokenizer.encode(text)) == text


def test_export_and_reimport_round_trip_every_tensor(imported, corpus):
  family, hf_model, root = imported
  out = root / f"export-{len(os.listdir(root))}"
  convert.export_checkpoint(str(root / "evo"), str(out), log=lambda _: None)
  original, exported = safetensors_of(root / "hf"), safetensors_of(out)
  assert sorted(exported) == sorted(original)
  for name, array in original.items():
    np.testing.assert_array_equal(exported[name], array, err_msg=name)
  assert (json.loads((out / "tokenizer.json").read_text())
          == json.loads((root / "hf" / "tokenizer.json").read_text()))
  # transformers reads the exported config as the original model.
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
  tokens = np.arange(10)[None] * 7 % VOCAB
  np.testing.assert_array_equal(hf_logits(reloaded.float().eval(), tokens),
                                hf_logits(hf_model, tokens))

  again = root / f"evo-{len(os.listdir(root))}"
  convert.import_checkpoint(str(out), str(again), run_config(corpus), log=lambda _: None)
  first, second = run_lib.load_run(str(root / "evo")), run_lib.load_run(str(again))
  assert first.cfg.model.to_dict() == second.cfg.model.to_dict()
  a, b = (flax.traverse_util.flatten_dict(run.params) for run in (first, second))
  assert sorted(a) == sorted(b)
  for key in a:
    np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=str(key))


def test_scanned_layers_import_and_export(imported, corpus):
  """With model.scan_layers each layer's tensors land in slice i of the stacked parameters:
  the same logits, the same tensors on export."""
  family, hf_model, root = imported
  cfg = run_config(corpus)
  cfg.model.scan_layers = True
  scanned = root / f"evo-scan-{len(os.listdir(root))}"
  convert.import_checkpoint(str(root / "hf"), str(scanned), cfg, log=lambda _: None)
  run = run_lib.load_run(str(scanned))
  model, params = run.model, run.params
  assert model.cfg.scan_layers and "blocks" in params["params"]
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, VOCAB)
  np.testing.assert_allclose(clean_logits(model, params, tokens), hf_logits(hf_model, tokens),
                             rtol=0, atol=1e-4)
  out = root / f"export-scan-{len(os.listdir(root))}"
  convert.export_checkpoint(str(scanned), str(out), log=lambda _: None)
  original, exported = safetensors_of(root / "hf"), safetensors_of(out)
  assert sorted(exported) == sorted(original)
  for name, array in original.items():
    np.testing.assert_array_equal(exported[name], array, err_msg=name)


def adapt_config(hf_dir, corpus):
  """configs/adapt_llama.py as the README runs it, shrunk to this model and machine."""
  cfg = cli.load_config_file(f"{REPO}/configs/adapt_llama.py:{hf_dir}")
  cli.apply_overrides(cfg, [
      f"--config.data.corpus={corpus}", "--config.data.seq_len=32", "--config.data.batch_size=8",
      "--config.data.heldout_fraction=0.3", "--config.data.shuffle_rows=8",
      "--config.model.dtype=float32", "--config.model.time_dim=32",
      "--config.model.fourier_dim=16", "--config.model.time_rank=8", "--config.bound.windows=1",
      "--config.optim.pretrained_lr_scale=0.0", "--config.optim.warmup_steps=1",
      "--config.train.steps=2", "--config.train.log_every=2", "--config.train.eval_every=2",
      "--config.train.ckpt_every=2", "--config.train.eval_batches=1", "--config.train.samples=0"])
  return cfg


def test_imported_workdir_trains_and_decodes_with_every_policy(tmp_path, corpus, capsys):
  """The README's commands: import and train with configs/adapt_llama.py (FSDP over the 8
  simulated devices, low-rank adaLN), then decode."""
  hf_dir = tmp_path / "hf"
  make_checkpoint(hf_dir, "llama")
  workdir = str(tmp_path / "evo")
  cfg = adapt_config(hf_dir, corpus)
  convert.import_checkpoint(str(hf_dir), workdir, cfg, log=lambda _: None)
  # The config read from the imported workdir is the one read from the checkpoint.
  assert adapt_config(workdir, corpus).to_dict() == cfg.to_dict()
  before = run_lib.load_run(workdir).params
  logs = []
  train.Trainer(adapt_config(hf_dir, corpus), workdir).run(log=logs.append)
  assert logs[0].endswith("checkpoints/0")  # started from the imported weights, not resumed
  run = run_lib.load_run(workdir)
  cfg, model, after, tokenizer, step = run.cfg, run.model, run.params, run.tokenizer, run.step
  assert step == 2
  # optim.pretrained_lr_scale = 0: the backbone is frozen exactly, the time parameters learn.
  moved = set()
  for path, value in jax.tree_util.tree_leaves_with_path(before):
    new = dict(jax.tree_util.tree_leaves_with_path(after))[path]
    if not np.array_equal(np.asarray(value), np.asarray(new)):
      moved.add(path)
  assert moved and all(model_lib.is_time_param(path) for path in moved)
  prompt = [tokenizer.bos_id] + tokenizer.encode("def ")
  for policy in ("diffusion", "block", "evo"):
    (out,) = decoding.generate(model, after, schedule.from_config(cfg.schedule), [prompt],
                              decoding.POLICIES[policy], max_new_tokens=4, context=32,
                              eos_id=tokenizer.eos_id)
    assert 1 <= len(out.tokens) <= 4 and all(0 <= t < VOCAB for t in out.tokens)
  capsys.readouterr()
  sample.main(["--workdir", workdir, "--policy", "ar", "--prompt", "def ", "--max_new_tokens",
               "4", "--json"])   # the command line reads the imported tokenizer too
  record = json.loads(capsys.readouterr().out)
  assert record["policy"] == "ar" and 1 <= len(record["tokens"]) <= 4


def test_lr_groups_default_off_keeps_the_optimizer():
  """pretrained_lr_scale = 1 (the default) adds nothing to the optimizer's state, so runs and
  checkpoints from before the option are unchanged."""
  ocfg = config.default_config().optim
  params = {"block_0": {"w": jnp.ones((2, 2))}, "time_head": {"b": jnp.ones(2)}}
  assert len(state_lib.make_optimizer(ocfg, 10).init(params)) == 2
  ocfg.pretrained_lr_scale = 0.5
  assert len(state_lib.make_optimizer(ocfg, 10).init(params)) == 3


def _error(capsys, argv):
  capsys.readouterr()
  with pytest.raises(SystemExit) as e:
    convert.main(argv)
  assert e.value.code == 2
  message = capsys.readouterr().err
  assert message.count("\n") == 1 and message.startswith("error: ")
  return message[len("error: "):].strip()


def test_bad_checkpoints_are_one_line_errors(tmp_path, capsys):
  empty = tmp_path / "empty"
  empty.mkdir()
  out = str(tmp_path / "out")
  assert _error(capsys, ["import", "--from", str(empty), "--out", out]) == (
      f"{empty} is not a Hugging Face checkpoint: no config.json")

  gpt2 = tmp_path / "gpt2"
  gpt2.mkdir()
  (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
  assert _error(capsys, ["import", "--from", str(gpt2), "--out", out]) == (
      f"{gpt2}/config.json: model_type 'gpt2' is not supported (supported: llama, qwen2, qwen3)")

  hf = tmp_path / "hf"
  make_checkpoint(hf, "llama", max_shard_size="40KB")
  hf_config = json.loads((hf / "config.json").read_text())
  (hf / "config.json").write_text(json.dumps({**hf_config, "intermediate_size": 80}))
  index = json.loads((hf / convert.INDEX_FILE).read_text())["weight_map"]
  assert _error(capsys, ["import", "--from", str(hf), "--out", out]) == (
      f"{hf}/{index['model.layers.0.mlp.gate_proj.weight']}: tensor "
      f"model.layers.0.mlp.gate_proj.weight has shape [96, 64], but config.json implies [80, 64]")

  (hf / "config.json").write_text(json.dumps({**hf_config, "mlp_bias": True}))
  assert _error(capsys, ["import", "--from", str(hf), "--out", out]) == (
      "llama checkpoint uses mlp_bias, which evo_jax does not support")

  (hf / "config.json").write_text(json.dumps(hf_config))
  shard = index["lm_head.weight"]
  os.remove(hf / shard)
  assert _error(capsys, ["import", "--from", str(hf), "--out", out]) == (
      f"{hf}: shard {shard} named in {convert.INDEX_FILE} is missing")
  assert not os.path.exists(out)   # nothing was written by any failed import

  assert _error(capsys, ["export", "--workdir", str(empty), "--out", out]) == (
      f"no run in {empty}: {checkpoint.CONFIG_FILE} not found")
