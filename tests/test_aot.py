"""The scale-out configs and ahead-of-time compilation for topologies this machine lacks."""
import math
import pathlib

import jax
import pytest

from evo_jax import aot
from evo_jax import cli
from evo_jax import model as model_lib
from evo_jax import train
from evo_jax import state as state_lib

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
LLAMA3_8B_PARAMS = 8_030_261_248   # Meta's published count for Llama-3-8B


def expected_params(m):
  """Parameter count from the shapes model.py declares (adaLN time conditioning)."""
  D, H, Td = m.d_model, m.head_dim or m.d_model // m.n_heads, m.time_dim
  attention = D * m.n_heads * H * 2 + D * m.n_kv_heads * H * 2
  layer = attention + 3 * D * m.d_ff + 2 * D
  embeddings = m.vocab_size * D * (1 if m.tie_embeddings else 2)
  backbone = embeddings + m.n_layers * layer + D           # + the final norm
  time = (m.fourier_dim * Td + Td + Td * Td + Td           # time embedding MLP
          + m.n_layers * (Td * 6 * D + 6 * D)              # per-block modulation
          + Td * 2 * D + 2 * D + D + 1)                    # final modulation, time head
  return backbone, backbone + time


@pytest.mark.parametrize("path", ["evo_1b.py", "evo_8b.py"])
def test_scale_configs_build_abstract_models_of_the_expected_size(path):
  cfg = cli.load_config_file(str(CONFIGS / path))
  model = model_lib.EvoTransformer(model_lib.from_config(cfg.model))
  tx = state_lib.make_optimizer(cfg.optim, cfg.train.steps)
  state = jax.eval_shape(lambda r: state_lib.init_state(model, tx, r), jax.random.key(0))
  n = sum(x.size for x in jax.tree.leaves(state.params))
  backbone, total = expected_params(cfg.model)
  print(f"{path}: {n:,} parameters, backbone {backbone:,}")
  assert n == total
  if path.endswith("8b.py"):
    assert backbone == LLAMA3_8B_PARAMS
  else:
    assert 1.0e9 < backbone < 1.5e9
  assert cfg.model.dtype == "bfloat16" and cfg.model.remat != "none"
  assert cfg.data.batch_size % cfg.train.grad_accum_steps == 0


@pytest.mark.parametrize("name, grid", [
    ("v5p-8", (2, 2, 1)), ("v5p-128", (4, 4, 4)), ("v5p-256", (4, 4, 8)), ("v4-64", (2, 4, 4)),
    ("v5e-256", (16, 16)), ("v5litepod-16", (4, 4)), ("v6e-64", (8, 8)), ("v5p:4x4x12", (4, 4, 12)),
])
def test_topology_names_give_cloud_tpu_slice_shapes(name, grid):
  target = aot.parse_topology(name)
  assert target.grid == grid and target.n_devices == math.prod(grid)


def tiny(small_cfg, **mesh):
  small_cfg.model.n_layers = 1
  small_cfg.data.update(seq_len=32, batch_size=8)
  small_cfg.mesh.update(mesh)
  return small_cfg


def test_aot_compiles_for_a_tpu_slice_and_reports_memory_and_flops(small_cfg):
  """One compile (the slow part, ~20 s) of a one-layer model for a 4-chip v5e slice."""
  report, text = aot.run(tiny(small_cfg, data=2, fsdp=2), "v5e-4")
  n = report.n_params
  assert report.compiled and report.target.n_devices == 4
  assert report.mesh_shape == {"data": 2, "fsdp": 2, "tensor": 1}
  # float32 parameters and two Adam moments: at least the FSDP shard of them on each chip,
  # at most all of them plus the batch.
  assert 12 * n / 2 <= report.arguments <= 12 * n + 3 * 8 * 32 * 4 + 2 ** 20
  assert report.temporaries > 0 and report.code > 0
  assert 0 < report.total < report.target.chip.hbm_bytes and report.fits
  # The step's matmuls are the analytic count up to the loss's extra products; XLA's count
  # (one micro-batch here, so no loop) adds the elementwise work on top.
  assert 0.9 < report.flops_traced / report.flops_model < 1.2
  assert 1.0 < report.flops_compiled / report.flops_traced < 1.5
  assert "FITS" in text and "libtpu" in text and "DOES NOT FIT" not in text


def test_a_step_too_big_for_the_chip_is_reported_as_not_fitting(small_cfg):
  """libtpu refuses such a program; the report quotes the temporaries it would have needed."""
  cfg = tiny(small_cfg)
  cfg.data.update(seq_len=32768, batch_size=4)
  report, text = aot.run(cfg, "v5e-4")
  hbm = report.target.chip.hbm_bytes
  # One row per chip; its float32 attention scores alone are 4 heads x (2 x 32768)^2 x 4 bytes.
  assert report.temporaries >= 4 * (2 * 32768) ** 2 * 4 > hbm
  assert 0.9 * hbm < report.oom_limit <= hbm
  assert not report.fits and "DOES NOT FIT" in text


def test_gpu_topologies_get_a_labelled_analytic_estimate(small_cfg):
  cfg = tiny(small_cfg)
  report, text = aot.run(cfg, "gpu:h100x8")
  assert not report.compiled and report.mesh_shape == {"data": 8, "fsdp": 1, "tensor": 1}
  assert report.arguments >= 12 * report.n_params and report.total < report.target.chip.hbm_bytes
  assert "ANALYTIC ESTIMATE, not a compile" in text


def test_real_devices_compile_and_time_the_step(small_cfg):
  """The path a GPU node takes (`--topology gpu:h100xN` with N local GPUs), run here on four
  CPU devices standing in for them: XLA's buffer assignment, then timed steps."""
  cfg = tiny(small_cfg, data=2, fsdp=2)
  target = aot.Target("stand-in", aot.GPU_CHIPS["h100"], 4)
  step = train.build_step(cfg, jax.devices()[:4])
  report = aot.compile_step(cfg, target, jax.devices()[:4], time_steps=2)
  assert report.compiled and report.mesh_shape == {"data": 2, "fsdp": 2, "tensor": 1}
  assert report.arguments >= aot.shard_bytes((step.state, step.batch))
  assert report.aliased >= aot.shard_bytes(step.state) and report.temporaries > 0
  assert report.step_seconds > 0
  text = aot.format_report(cfg, report)
  assert "compiled by XLA for this machine's GPUs" in text and "measured here: median step" in text
  assert "model FLOPs utilisation" in text
  # Where the machine has no such GPUs, the same request is the labelled estimate.
  assert aot.local_gpus(aot.parse_topology("gpu:h100x4")) is None


@pytest.mark.parametrize("args, message", [
    (["--topology", "v9z-8"], "unknown TPU generation 'v9z'"),
    (["--topology", "banana"], "expected e.g. v5p-128"),
    (["--topology", "gpu:b300x8"], "unknown GPU 'b300'"),
    (["--topology", "v5p-7"], "count TensorCores, 2 per chip"),
    (["--topology", "v5e-12"], "no standard 2-D slice has 12 chips"),
    (["--topology", "v5e-4", "--config.mesh.tensor=3"], "does not divide the 4 devices"),
    (["--topology", "v5e-4", "--config.data.batch_size=6"], "not divisible"),
    (["--gpus", "8", "--config.data.batch_size=12"], "not divisible"),
    (["--topology", "v5e-4", "--config.mesh.bogus=1"], "unknown config key"),
])
def test_bad_input_is_a_one_line_error(capsys, args, message):
  with pytest.raises(SystemExit) as exit_info:
    aot.main(["--config", str(CONFIGS / "tiny.py"), *args])
  err = capsys.readouterr().err
  assert exit_info.value.code == 2
  assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
