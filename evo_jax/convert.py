"""Pretrained AR models in and out: Hugging Face LLaMA-2/3 and Qwen2/2.5/3 checkpoints.

    python -m evo_jax.convert import --from HF_DIR --out DIR [--config FILE[:ARG]] [--config.x=v]
    python -m evo_jax.convert export --workdir DIR --out HF_DIR [--dtype float32|bfloat16]

`import` writes a workdir whose checkpoint at step 0 holds the backbone weights, fresh time
conditioning and time head (zero-initialised modulations, so the clean stream computes exactly
the original next-token logits, method.md section 2) and fresh optimizer state, with no data
position: `python -m evo_jax.train` with the same --config continues it from step 0, and
`python -m evo_jax.sample` decodes from it. The tensors are streamed one at a time from the
safetensors shards and each is placed straight into its sharding on the mesh.

`export` writes the backbone back in the Hugging Face layout (config.json, safetensors, the
tokenizer files), for the AR path.

Both layouts rotate the two halves of each head in RoPE (evo_jax.model.apply_rope is HF's
rotate_half), so q and k need no permutation; HF Linear weights are [out, in] and ours
[in..., out...], so those are transposed and reshaped. `tensor_table` is the one place that
knows both layouts.
"""
import json
import os
import shutil
import sys

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from evo_jax import checkpoint
from evo_jax import cli
from evo_jax import config as config_lib
from evo_jax import data
from evo_jax import model as model_lib
from evo_jax import progression
from evo_jax import run as run_lib
from evo_jax import sharding
from evo_jax import state as state_lib
from evo_jax.progress import Progress
from evo_jax.errors import UserError

FAMILIES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM"}
ROPE_TYPES = {"default": "none", "linear": "linear", "llama3": "llama3"}
HF_CONFIG = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SOURCE_CONFIG = "hf_config.json"   # the imported checkpoint's config.json, kept for export
TOKENIZER_FILES = (data.HF_TOKENIZER_FILE, data.HF_TOKENIZER_CONFIG)
EXPORT_DTYPES = {"float32": np.float32, "bfloat16": jnp.bfloat16}
MAX_SHARD_BYTES = 4 << 30
# Tensors of some checkpoints that the model computes instead of storing.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class ConvertError(UserError):
  pass


def read_json(path, what):
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except ValueError:
    raise ConvertError(f"{path}: {what} is not valid JSON") from None


def read_hf_config(hf_dir, file_name=HF_CONFIG):
  """config.json of a supported checkpoint, or a one-line ConvertError."""
  path = os.path.join(hf_dir, file_name)
  if not os.path.isfile(path):
    raise ConvertError(f"{hf_dir} is not a Hugging Face checkpoint: no {file_name}")
  hf = read_json(path, "the model config")
  family = hf.get("model_type")
  if family not in FAMILIES:
    raise ConvertError(f"{path}: model_type {family!r} is not supported "
                       f"(supported: {', '.join(FAMILIES)})")
  return hf


def model_fields(hf):
  """The ModelConfig fields of a Hugging Face config.json; features evo_jax does not model are
  one-line errors."""
  family = hf["model_type"]
  unsupported = [k for k in ("attention_bias", "mlp_bias", "use_sliding_window") if hf.get(k)]
  if family == "qwen2":  # Qwen2 always has q/k/v biases (and no attention_bias key)
    unsupported = [k for k in unsupported if k != "attention_bias"]
  if hf.get("hidden_act", "silu") != "silu":
    unsupported.append(f"hidden_act={hf['hidden_act']}")
  rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type not in ROPE_TYPES:
    unsupported.append(f"rope type {rope_type}")
  if unsupported:
    raise ConvertError(f"{family} checkpoint uses {', '.join(unsupported)}, which evo_jax does "
                       f"not support")
  n_heads = hf["num_attention_heads"]
  return dict(
      vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
      n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
      d_ff=hf["intermediate_size"], norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      rope_theta=float(hf.get("rope_theta", rope.get("rope_theta", 10000.0))),
      rope_scaling=ROPE_TYPES[rope_type], rope_factor=float(rope.get("factor", 1.0)),
      rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
      rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
      rope_original_max_position=int(rope.get("original_max_position_embeddings", 8192)),
      qkv_bias=family == "qwen2", qk_norm=family == "qwen3",
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)))


def checkpoint_model_fields(path):
  """Model fields of a Hugging Face checkpoint directory, or of a workdir imported from one
  (its copy of the checkpoint's config.json): what configs/adapt_*.py read their model from."""
  imported = os.path.isfile(os.path.join(path, SOURCE_CONFIG))
  return model_fields(read_hf_config(path, SOURCE_CONFIG if imported else HF_CONFIG))


def hf_config(mcfg, base):
  """The Hugging Face config.json of a model: `base` (the imported checkpoint's, or a few
  defaults) with every field that the model determines written from it."""
  family = "qwen3" if mcfg.qk_norm else "qwen2" if mcfg.qkv_bias else "llama"
  rope_scaling = None
  if mcfg.rope_scaling == "linear":
    rope_scaling = {"rope_type": "linear", "factor": mcfg.rope_factor}
  elif mcfg.rope_scaling == "llama3":
    rope_scaling = {"rope_type": "llama3", "factor": mcfg.rope_factor,
                    "low_freq_factor": mcfg.rope_low_freq_factor,
                    "high_freq_factor": mcfg.rope_high_freq_factor,
                    "original_max_position_embeddings": mcfg.rope_original_max_position}
  out = {k: v for k, v in base.items() if k != "rope_parameters"}
  out.update(
      model_type=family, architectures=[FAMILIES[family]], vocab_size=mcfg.vocab_size,
      hidden_size=mcfg.d_model, num_hidden_layers=mcfg.n_layers,
      num_attention_heads=mcfg.n_heads, num_key_value_heads=mcfg.n_kv_heads,
      head_dim=mcfg.head_size, intermediate_size=mcfg.d_ff, rms_norm_eps=mcfg.norm_eps,
      hidden_act="silu", rope_theta=mcfg.rope_theta, rope_scaling=rope_scaling,
      tie_word_embeddings=mcfg.tie_embeddings)
  if family != "qwen2":
    out["attention_bias"] = False
  return out


def tensor_table(mcfg):
  """[(HF name, evo param path, HF shape, transposed)] for every backbone tensor.

  An evo tensor is the HF one transposed (HF Linear weights are [out, in]) when `transposed`,
  and then reshaped to the evo shape (heads split out of the flat HF dimension)."""
  D, F, V = mcfg.d_model, mcfg.d_ff, mcfg.vocab_size
  H, N, K = mcfg.head_size, mcfg.n_heads, mcfg.n_kv_heads
  rows = [("model.embed_tokens.weight", ("embedding",), (V, D), False)]
  for i in range(mcfg.n_layers):
    hf, evo = f"model.layers.{i}.", (f"block_{i}",)
    rows.append((hf + "input_layernorm.weight", evo + ("attn_norm", "scale"), (D,), False))
    for name, heads in (("q", N), ("k", K), ("v", K)):
      rows.append((hf + f"self_attn.{name}_proj.weight", evo + ("attn", name, "kernel"),
                   (heads * H, D), True))
      if mcfg.qkv_bias:
        rows.append((hf + f"self_attn.{name}_proj.bias", evo + ("attn", name, "bias"),
                     (heads * H,), False))
    if mcfg.qk_norm:
      for name in ("q", "k"):
        rows.append((hf + f"self_attn.{name}_norm.weight", evo + ("attn", f"{name}_norm", "scale"),
                     (H,), False))
    rows.append((hf + "self_attn.o_proj.weight", evo + ("attn", "o", "kernel"), (D, N * H), True))
    rows.append((hf + "post_attention_layernorm.weight", evo + ("mlp_norm", "scale"), (D,),
                 False))
    for name, shape in (("gate", (F, D)), ("up", (F, D)), ("down", (D, F))):
      rows.append((hf + f"mlp.{name}_proj.weight", evo + ("mlp", name, "kernel"), shape, True))
  rows.append(("model.norm.weight", ("final_norm", "scale"), (D,), False))
  if not mcfg.tie_embeddings:
    rows.append(("lm_head.weight", ("head", "kernel"), (V, D), True))
  return rows


def scanned_path(path, scan_layers):
  """(param path, layer index or None): with model.scan_layers, block_i's tensors are slice i
  of the stacked `blocks/block` parameters (model.stack_layers)."""
  if scan_layers and path[0].startswith("block_"):
    return ("blocks", "block") + path[1:], int(path[0][len("block_"):])
  return path, None


def to_evo(hf_array, evo_shape, transposed):
  return (hf_array.T if transposed else hf_array).reshape(evo_shape)


def to_hf(evo_array, hf_shape, transposed):
  if transposed:
    return evo_array.reshape(hf_shape[::-1]).T
  return evo_array.reshape(hf_shape)


def shard_files(hf_dir):
  """{tensor name: safetensors file} of a checkpoint, from its index or its single file."""
  from safetensors import safe_open   # the `convert` extra
  index = os.path.join(hf_dir, INDEX_FILE)
  if os.path.isfile(index):
    weight_map = read_json(index, "the shard index").get("weight_map", {})
    for name in sorted(set(weight_map.values())):
      if not os.path.isfile(os.path.join(hf_dir, name)):
        raise ConvertError(f"{hf_dir}: shard {name} named in {INDEX_FILE} is missing")
    return {k: os.path.join(hf_dir, v) for k, v in weight_map.items()}
  single = os.path.join(hf_dir, SINGLE_FILE)
  if not os.path.isfile(single):
    raise ConvertError(f"{hf_dir}: no {SINGLE_FILE} or {INDEX_FILE}")
  with safe_open(single, "pt") as f:
    return {k: single for k in f.keys()}


def read_tensors(hf_dir, table):
  """Yields (row, float32 numpy array) for each row of the table, one tensor in memory at a
  time; a missing, unexpected or misshapen tensor is a one-line error."""
  from safetensors import safe_open   # the `convert` extra
  files = shard_files(hf_dir)
  wanted = {row[0] for row in table}
  extra = sorted(k for k in files if k not in wanted and not k.endswith(IGNORED_SUFFIXES)
                 and k != "lm_head.weight")   # a tied head may be stored too; it is unused
  if extra:
    raise ConvertError(f"{hf_dir}: tensor {extra[0]} has no place in the model of its "
                       f"{HF_CONFIG} ({len(extra)} such tensors)")
  for row in table:
    name, _, shape, _ = row
    if name not in files:
      raise ConvertError(f"{hf_dir}: tensor {name} is missing from the checkpoint")
    with safe_open(files[name], "pt") as f:
      array = f.get_tensor(name).float().numpy()
    if array.shape != shape:
      raise ConvertError(f"{files[name]}: tensor {name} has shape {list(array.shape)}, but "
                         f"{HF_CONFIG} implies {list(shape)}")
    yield row, array


def import_checkpoint(hf_dir, out, cfg, log=print):
  """Writes the workdir `out` (see the module docstring) from the checkpoint in hf_dir; cfg
  gives every setting but the model, which comes from the checkpoint."""
  hf = read_hf_config(hf_dir)
  if os.path.isdir(out) and os.listdir(out):
    raise ConvertError(f"{out} is not empty: import writes a new workdir")
  tokenizer_path = os.path.join(hf_dir, data.HF_TOKENIZER_FILE)
  if not os.path.isfile(tokenizer_path):
    raise ConvertError(f"{hf_dir}: no {data.HF_TOKENIZER_FILE}")
  with cfg.unlocked():
    cfg.model.update(model_fields(hf))
    cfg.data.tokenizer = ""   # the workdir's own copy of the checkpoint's tokenizer
  mcfg = model_lib.from_config(cfg.model)
  tokenizer = data.HFTokenizer(tokenizer_path)
  if tokenizer.vocab_size > mcfg.vocab_size:
    raise ConvertError(f"{tokenizer_path} has {tokenizer.vocab_size} tokens, more than the "
                       f"model's vocab_size {mcfg.vocab_size}")

  layout = state_lib.state_layout(cfg, sharding.make_mesh(cfg.mesh))
  model, tx, shardings = layout.model, layout.tx, layout.shardings
  where = flax.traverse_util.flatten_dict(shardings.params)
  shapes = flax.traverse_util.flatten_dict(
      jax.eval_shape(lambda r: state_lib.init_params(model, r), jax.random.key(0)))
  table = tensor_table(mcfg)
  backbone = {("params",) + scanned_path(row[1], mcfg.scan_layers)[0] for row in table}
  fresh_sharding = {k: v for k, v in where.items() if k not in backbone}
  # Only the new parameters are computed (jit drops the rest of the initialisation).
  fresh = jax.jit(lambda r: {k: v for k, v in flax.traverse_util.flatten_dict(
      state_lib.init_params(model, r)).items() if k not in backbone},
                  out_shardings=fresh_sharding)(jax.random.key(cfg.seed))
  params = dict(fresh)
  # A stacked (scanned) parameter is allocated in place and filled a layer at a time.
  set_layer = jax.jit(lambda full, x, i: full.at[i].set(x), donate_argnums=0)
  progress = Progress("importing", len(table), "tensors")
  for (_, path, _, transposed), array in read_tensors(hf_dir, table):
    progress.advance()
    path, layer = scanned_path(path, mcfg.scan_layers)
    key = ("params",) + path
    if layer is None:
      params[key] = jax.device_put(to_evo(array, shapes[key].shape, transposed), where[key])
      continue
    if key not in params:
      params[key] = jax.jit(lambda s=shapes[key]: jnp.zeros(s.shape, s.dtype),
                            out_shardings=where[key])()
    params[key] = set_layer(params[key], to_evo(array, shapes[key].shape[1:], transposed), layer)
  progress.done()
  params = flax.traverse_util.unflatten_dict(params)
  state = state_lib.make_state(
      jax.device_put(jnp.zeros((), jnp.int32), shardings.step), params,
      jax.jit(tx.init, out_shardings=shardings.opt_state)(params),
      progression.adaptive_bins(cfg.progression))

  os.makedirs(out, exist_ok=True)
  for name in TOKENIZER_FILES:
    if os.path.isfile(os.path.join(hf_dir, name)):
      shutil.copy(os.path.join(hf_dir, name), os.path.join(out, name))
  shutil.copy(os.path.join(hf_dir, HF_CONFIG), os.path.join(out, SOURCE_CONFIG))
  ckpts = checkpoint.RunCheckpoints(out, async_save=False)
  ckpts.save(0, state, None, cfg.to_dict())
  ckpts.close()
  checkpoint.write_config(out, cfg.to_dict())
  data.check_tokenizer(data.HFTokenizer(os.path.join(out, data.HF_TOKENIZER_FILE)), out,
                       record=True)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  log(f"{out}: {hf['model_type']} checkpoint {hf_dir} imported at step 0 ({n_params:,} "
      f"parameters, {len(table)} tensors from the checkpoint)")


def export_checkpoint(workdir, out, dtype="float32", log=print):
  """Writes the backbone of the run in workdir as a Hugging Face checkpoint in out."""
  import safetensors.numpy       # the `convert` extra
  if dtype not in EXPORT_DTYPES:
    raise ConvertError(f"--dtype must be one of {tuple(EXPORT_DTYPES)}, got {dtype!r}")
  if os.path.isdir(out) and os.listdir(out):
    raise ConvertError(f"{out} is not empty: export writes a new checkpoint directory")
  run = run_lib.load_run(workdir)
  cfg, params, tokenizer, step = run.cfg, run.params, run.tokenizer, run.step
  mcfg = model_lib.from_config(cfg.model)
  source = os.path.join(workdir, SOURCE_CONFIG)
  base = (read_json(source, "the imported model config") if os.path.isfile(source) else
          dict(max_position_embeddings=cfg.data.seq_len, bos_token_id=tokenizer.bos_id,
               eos_token_id=tokenizer.eos_id))
  config = hf_config(mcfg, base)
  config["dtype" if "dtype" in base else "torch_dtype"] = dtype   # transformers >= 5: dtype
  flat = flax.traverse_util.flatten_dict(params)

  # Shards of at most MAX_SHARD_BYTES, so that only one shard is ever on the host.
  shards, current, size = [], {}, 0
  table = tensor_table(mcfg)
  progress = Progress("exporting", len(table), "tensors")
  for name, path, shape, transposed in table:
    progress.advance()
    path, layer = scanned_path(path, mcfg.scan_layers)
    array = flat[("params",) + path]
    array = to_hf(np.asarray(jax.device_get(array if layer is None else array[layer])), shape,
                  transposed)
    array = np.ascontiguousarray(array.astype(EXPORT_DTYPES[dtype]))
    if current and size + array.nbytes > MAX_SHARD_BYTES:
      shards.append(current)
      current, size = {}, 0
    current[name] = array
    size += array.nbytes
  shards.append(current)
  progress.done()
  os.makedirs(out, exist_ok=True)
  names = ([SINGLE_FILE] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  weight_map, total = {}, 0
  for file_name, tensors in zip(names, shards):
    safetensors.numpy.save_file(tensors, os.path.join(out, file_name), metadata={"format": "pt"})
    weight_map.update({k: file_name for k in tensors})
    total += sum(a.nbytes for a in tensors.values())
  if len(shards) > 1:
    with open(os.path.join(out, INDEX_FILE), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  for name in TOKENIZER_FILES + (data.TOKENIZER_FILE,):
    if os.path.isfile(os.path.join(workdir, name)):
      shutil.copy(os.path.join(workdir, name), os.path.join(out, name))
  with open(os.path.join(out, HF_CONFIG), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  log(f"{out}: {config['model_type']} checkpoint ({len(weight_map)} tensors, {dtype}) from "
      f"{workdir} at step {step}")


def main(argv=None):
  with cli.command():
    parser = cli.OneLineParser(description=__doc__.strip().splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    imp = commands.add_parser("import", help="a Hugging Face checkpoint -> an evo_jax workdir")
    imp.add_argument("--from", dest="hf_dir", required=True, help="the checkpoint directory")
    imp.add_argument("--out", required=True, help="the new workdir")
    imp.add_argument("--config", help="the run's settings, e.g. configs/adapt_llama.py:HF_DIR "
                     "(default: evo_jax/config.py's defaults)")
    exp = commands.add_parser("export", help="an evo_jax workdir -> a Hugging Face checkpoint")
    exp.add_argument("--workdir", required=True)
    exp.add_argument("--out", required=True, help="the new checkpoint directory")
    exp.add_argument("--dtype", default="float32", help="float32 | bfloat16")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.command == "export":
      if rest:
        raise UserError(f"unknown argument: {rest[0]}")
      export_checkpoint(args.workdir, args.out, args.dtype)
      return
    cfg = cli.load_config_file(args.config) if args.config else config_lib.default_config()
    cli.apply_overrides(cfg, rest)
    import_checkpoint(args.hf_dir, args.out, cfg)


if __name__ == "__main__":
  main()
