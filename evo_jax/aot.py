"""Will a config fit a machine one does not have? Compile its train step ahead of time:

  python -m evo_jax.aot --config configs/evo_8b.py --topology v5p-128 [--config.x.y=v]

TPU topologies (`v5p-128`, `v4-64`, `v5e-256`, `v6e-64`, or a chip grid such as `v5p:4x4x8`)
are compiled by libtpu's compiler for compile-only devices of that topology: the exact program
the run would execute, on the mesh `sharding.make_mesh` builds from the config. The report is
XLA's per-device buffer assignment (arguments, outputs, temporaries, code) against the chip's
HBM, and the FLOPs per step from XLA's cost analysis beside the analytic 6 N tokens estimate.

GPU forms (`--topology gpu:h100x8`, `--gpus 8`) are compiled by XLA for this machine's GPUs
when it has at least that many of that kind (run it on one node of the cluster), and then
`--time_steps N` also runs the step N times on random tokens and reports the median step time
and the MFU. Elsewhere XLA's GPU compiler cannot run (it needs the CUDA plugin and the GPU), so
the report is an analytic estimate, and says so.
"""
import dataclasses
import math
import os
import re
import resource
import statistics
import sys
import time
import types

import jax
import jax.numpy as jnp
from jax.experimental import topologies

from evo_jax import attention
from evo_jax import cli
from evo_jax import flops
from evo_jax import model as model_lib
from evo_jax import progress
from evo_jax import sharding
from evo_jax import state as state_lib
from evo_jax import train
from evo_jax.errors import UserError

GiB = 1024 ** 3


class TopologyError(UserError):
  pass


@dataclasses.dataclass(frozen=True)
class Chip:
  kind: str               # "tpu" or "gpu"
  name: str
  hbm_bytes: float
  peak_flops: float       # dense bfloat16 FLOP/s per chip (per device)
  grid_dims: int = 0      # TPU: 2 (v5e, v6e) or 3 (v4, v5p) torus dimensions
  cores_per_chip: int = 1  # TPU: the count in a `v5p-N` name is TensorCores


# Published per-chip numbers (Cloud TPU system architecture pages; NVIDIA data sheets).
TPU_CHIPS = {
    "v4": Chip("tpu", "TPU v4", 32 * GiB, 275e12, grid_dims=3, cores_per_chip=2),
    "v5p": Chip("tpu", "TPU v5p", 95 * GiB, 459e12, grid_dims=3, cores_per_chip=2),
    "v5e": Chip("tpu", "TPU v5e", 16 * GiB, 197e12, grid_dims=2),
    "v6e": Chip("tpu", "TPU v6e", 32 * GiB, 918e12, grid_dims=2),
}
TPU_ALIASES = {"v5litepod": "v5e", "v5": "v5p", "v6litepod": "v6e"}
GPU_CHIPS = {
    "h100": Chip("gpu", "NVIDIA H100 80GB", 80e9, 989e12),
    "h200": Chip("gpu", "NVIDIA H200", 141e9, 989e12),
    "a100": Chip("gpu", "NVIDIA A100 80GB", 80e9, 312e12),
}


@dataclasses.dataclass(frozen=True)
class Target:
  name: str
  chip: Chip
  n_devices: int
  grid: tuple = ()        # TPU chip grid, e.g. (4, 4, 4)

  @property
  def libtpu_name(self):
    family = "v5p" if self.chip.name == "TPU v5p" else self.chip.name.split()[-1]
    return f"{family}:" + "x".join(map(str, self.grid))


def default_grid(chips: int, dims: int) -> tuple:
  """The slice shape Cloud TPU gives `chips` chips: double the smallest side (the last of
  equals) from 2x2x1 (v4, v5p) or 1x1 (v5e, v6e): v5p-128 -> 4x4x4, v5e-256 -> 16x16."""
  grid = [2, 2, 1] if dims == 3 else [1, 1]
  if dims == 3 and chips < 4:
    grid = [1, 1, 1]
  while math.prod(grid) < chips:
    smallest = min(grid)
    i = max(j for j, s in enumerate(grid) if s == smallest)
    grid[i] *= 2
  if math.prod(grid) != chips:
    raise TopologyError(f"no standard {dims}-D slice has {chips} chips; name the chip grid "
                        f"instead, e.g. v5p:4x4x12")
  return tuple(grid)


def parse_topology(text: str) -> Target:
  """`v5p-128` (TensorCores for v4/v5p, chips for v5e/v6e, as Cloud TPU names them),
  `v5p:4x4x8` (a chip grid), or `gpu:h100x8`."""
  text = text.strip().lower()
  gpu = re.fullmatch(r"gpu:([a-z0-9]+)x(\d+)", text)
  if gpu:
    if gpu.group(1) not in GPU_CHIPS:
      raise TopologyError(f"unknown GPU {gpu.group(1)!r} in --topology {text} "
                          f"(known: {', '.join(GPU_CHIPS)})")
    return Target(text, GPU_CHIPS[gpu.group(1)], int(gpu.group(2)))
  named = re.fullmatch(r"([a-z0-9]+)-(\d+)", text)
  gridded = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)*)", text)
  if not (named or gridded):
    raise TopologyError(f"--topology {text!r}: expected e.g. v5p-128, v5e:16x16 or gpu:h100x8")
  family = (named or gridded).group(1)
  family = TPU_ALIASES.get(family, family)
  if family not in TPU_CHIPS:
    raise TopologyError(f"unknown TPU generation {family!r} in --topology {text} "
                        f"(known: {', '.join(TPU_CHIPS)})")
  chip = TPU_CHIPS[family]
  if named:
    count = int(named.group(2))
    if count % chip.cores_per_chip:
      raise TopologyError(f"--topology {text}: {family} slices count TensorCores, "
                          f"{chip.cores_per_chip} per chip")
    grid = default_grid(count // chip.cores_per_chip, chip.grid_dims)
  else:
    grid = tuple(int(s) for s in gridded.group(2).split("x"))
    if len(grid) != chip.grid_dims or min(grid) < 1:
      raise TopologyError(f"--topology {text}: a {family} chip grid has {chip.grid_dims} "
                          f"positive sides")
  return Target(text, chip, math.prod(grid), grid)


def tpu_devices(target: Target):
  """Compile-only devices of the topology, from libtpu (no TPU needed)."""
  # libtpu asks the cloud metadata server who it is unless told; there is no server here.
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-1")
  # Compiling touches no chip, so another JAX process holding libtpu's lock is no obstacle.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  # Which sides are tori (wrap around), as on Cloud TPU: on v4/v5p every side of slices of 64
  # chips and more; on v5e/v6e a side of 16 (the full pod's).
  grid3 = (*target.grid, 1, 1)[:3]
  if target.chip.grid_dims == 3:
    wrap = tuple(side >= 4 and target.n_devices >= 64 for side in grid3)
  else:
    wrap = tuple(side == 16 for side in grid3)
  try:
    topo = topologies.get_topology_desc(target.libtpu_name, "tpu", wrap=wrap)
  except Exception as e:  # libtpu missing or refusing the name: say which, in one line
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise TopologyError(f"libtpu cannot describe {target.libtpu_name}: {reason}") from None
  return topo.devices


def host_peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB  # Linux: KiB


@dataclasses.dataclass
class Report:
  """Per-device numbers of one compiled (or estimated) train step."""
  target: Target
  mesh_shape: dict
  n_params: int
  compiled: bool
  arguments: float = 0.0
  outputs: float = 0.0
  aliased: float = 0.0
  temporaries: float = 0.0
  code: float = 0.0
  flops_compiled: float = 0.0      # per device, XLA's cost analysis (a loop body once)
  flops_traced: float = 0.0        # per device, matmul_flops of the step / devices
  flops_model: float = 0.0         # per device, model_flops / devices
  compile_seconds: float = 0.0
  host_rss_gib: float = 0.0
  step_seconds: float = 0.0        # > 0: the median of steps run on this machine's devices
  oom_limit: float = 0.0           # > 0: libtpu refused the program, the HBM it had

  @property
  def total(self):
    return self.arguments + self.outputs - self.aliased + self.temporaries + self.code

  @property
  def fits(self):
    return not self.oom_limit and self.total <= self.target.chip.hbm_bytes


# libtpu refuses to finish a program that cannot fit and says by how much.
HBM_OOM = re.compile(r"memory required for HLO temporaries \(([\d.]+)([KMGT])\) exceeds "
                     r"available HBM \(([\d.]+)([KMGT])\)")
UNITS = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def shard_bytes(tree) -> float:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
             for x in jax.tree.leaves(tree))


def local_gpus(target: Target):
  """The first n_devices GPUs of this machine if it has that many of the target's kind."""
  try:
    gpus = jax.devices("gpu")
  except RuntimeError:                  # no GPU backend here
    return None
  key = next(k for k, chip in GPU_CHIPS.items() if chip is target.chip)
  if len(gpus) < target.n_devices or key.upper() not in gpus[0].device_kind.upper():
    return None
  return gpus[:target.n_devices]


def compile_step(cfg, target: Target, devices, time_steps=0) -> Report:
  """XLA's buffer assignment and cost analysis of the step compiled for devices; with
  time_steps > 0 (real devices only) also the median time of that many steps."""
  step = train.build_step(cfg, devices)
  report = Report(target, dict(step.mesh.shape), step.n_params, True,
                  flops_traced=flops.traced_flops(step.fn, step.state, step.batch)
                  / target.n_devices,
                  flops_model=flops.model_flops(cfg, step.n_params) / target.n_devices)
  start = time.perf_counter()
  # The one long phase (minutes for evo_8b): say so, since it prints nothing until it ends.
  print(f"compiling the train step for {target.name} ({target.n_devices} devices)...",
        file=sys.stderr, flush=True)
  try:
    compiled = step.fn.lower(step.state, step.batch).compile()
  except jax.errors.JaxRuntimeError as e:
    oom = HBM_OOM.search(str(e))
    if not oom:
      raise
    # No buffer assignment to read: the state shard is computed, the temporaries quoted.
    report.oom_limit = float(oom.group(3)) * UNITS[oom.group(4)]
    report.arguments = shard_bytes((step.state, step.batch))
    report.outputs = report.aliased = shard_bytes(step.state)
    report.temporaries = float(oom.group(1)) * UNITS[oom.group(2)]
  else:
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    report.arguments, report.outputs = mem.argument_size_in_bytes, mem.output_size_in_bytes
    report.aliased, report.temporaries = mem.alias_size_in_bytes, mem.temp_size_in_bytes
    report.code, report.flops_compiled = mem.generated_code_size_in_bytes, cost.get("flops", 0.0)
  report.compile_seconds = time.perf_counter() - start
  print(f"compiled in {progress.duration(report.compile_seconds)}", file=sys.stderr, flush=True)
  report.host_rss_gib = host_peak_rss_gib()
  if time_steps and not report.oom_limit:
    report.step_seconds = median_step_seconds(cfg, step, compiled, time_steps)
  return report


def median_step_seconds(cfg, step: train.Step, compiled, n: int) -> float:
  """Runs the compiled step n times (after one warm-up) on random tokens, as one document a
  row: the work of a real step, whose cost does not depend on the token values."""
  state = step.init(jax.random.key(cfg.seed))
  shape = (cfg.data.batch_size, cfg.data.seq_len)
  sh = step.batch["tokens"].sharding
  tokens = jax.random.randint(jax.random.key(1), shape, 0, cfg.model.vocab_size, jnp.int32)
  batch = {"tokens": jax.device_put(tokens, sh),
           "segment_ids": jax.device_put(jnp.ones(shape, jnp.int32), sh),
           "positions": jax.device_put(jnp.broadcast_to(jnp.arange(shape[1]), shape), sh)}
  seconds = []
  for i in range(n + 1):
    start = time.perf_counter()
    state, aux = compiled(state, batch)
    jax.block_until_ready((state, aux))
    if i:                                # the first run pays for allocation and autotuning
      seconds.append(time.perf_counter() - start)
  return statistics.median(seconds)


def estimate_gpu(cfg, target: Target) -> Report:
  """Analytic per-device memory for a GPU cluster (no compiler involved): the sharded train
  state (float32 parameters and two Adam moments) and batch as arguments; as temporaries the
  float32 gradients, what the backward pass keeps per layer under the remat policy, one
  layer's float32 attention scores and probabilities and MLP activations, and the float32
  logits with their gradient."""
  sizes = sharding.mesh_shape(cfg.mesh, target.n_devices)
  shapes = jax.eval_shape(lambda r: state_lib.init_params(
      model_lib.EvoTransformer(model_lib.from_config(cfg.model)), r), jax.random.key(0))
  n_params = sum(x.size for x in jax.tree.leaves(shapes))
  # check_batch_size reads only the mesh's axis sizes.
  sharding.check_batch_size(types.SimpleNamespace(shape=sizes), cfg.data.batch_size,
                            cfg.train.grad_accum_steps)
  data_parallel = sizes["data"] * sizes["fsdp"]
  m, tp = cfg.model, sizes["tensor"]
  rows = cfg.data.batch_size // (cfg.train.grad_accum_steps * data_parallel)
  P = 2 * cfg.data.seq_len
  H = m.head_dim or m.d_model // m.n_heads
  act = 2  # bytes, bfloat16 activations
  matmul_outputs = (2 * m.n_heads * H + 2 * m.n_kv_heads * H) / tp + 3 * m.d_ff / tp + m.d_model
  scores = rows * m.n_heads / tp * P * P * 4 * 2
  kept_per_layer = {"full": rows * P * m.d_model * act,
                    "dots": rows * P * matmul_outputs * act,
                    "none": rows * P * matmul_outputs * act + scores}[m.remat]
  working = scores + rows * P * 3 * m.d_ff / tp * act
  logits = rows * P * m.vocab_size / tp * 4 * 3
  shards = sizes["fsdp"] * tp
  state, grads = 12 * n_params / shards, 4 * n_params / shards
  batch = 3 * cfg.data.batch_size // data_parallel * cfg.data.seq_len * 4
  return Report(target, sizes, n_params, False, arguments=state + batch,
                outputs=state, aliased=state,
                temporaries=grads + m.n_layers * kept_per_layer + working + logits,
                flops_model=flops.model_flops(cfg, n_params) / target.n_devices)


def format_report(cfg, r: Report, step_time=None) -> str:
  t, chip = r.target, r.target.chip
  gib = lambda b: f"{b / GiB:8.2f} GiB" if b >= GiB / 10 else f"{b / 2 ** 20:8.2f} MiB"
  if r.compiled:
    how = ("compiled by libtpu for compile-only devices" if chip.kind == "tpu" else
           "compiled by XLA for this machine's GPUs")
  else:
    how = ("ANALYTIC ESTIMATE, not a compile: XLA's GPU compiler needs the GPUs, and this "
           f"machine lacks {t.n_devices} x {chip.name} (run it on a node that has them). It "
           "assumes the ideal layout (activations split over the batch, one layer's attention "
           "live at a time)")
  lines = [
      f"{t.name}: {t.n_devices} x {chip.name} ({chip.hbm_bytes / GiB:.1f} GiB HBM each), "
      f"mesh {r.mesh_shape}",
      f"  {r.n_params:,} parameters; {cfg.data.batch_size} rows x {cfg.data.seq_len} tokens "
      f"per step (two streams: {2 * cfg.data.seq_len} positions a row) in "
      f"{cfg.train.grad_accum_steps} micro-batch(es); remat {cfg.model.remat}; "
      f"dtype {cfg.model.dtype}",
      f"  {how}",
  ]
  if r.compiled:
    lines.append(f"  compile time {r.compile_seconds:.1f} s, host peak RSS "
                 f"{r.host_rss_gib:.1f} GiB")
  if r.oom_limit:
    lines.append(f"  libtpu refused the program: its temporaries exceed the "
                 f"{r.oom_limit / GiB:.2f} GiB it may use (arguments below are computed from "
                 f"the shardings; no buffer assignment exists)")
  lines += [
      "per-device memory:",
      f"  arguments      {gib(r.arguments)}  (train state shard + batch shard)",
      f"  outputs        {gib(r.outputs)}  ({gib(r.aliased).strip()} of it aliased with the "
      f"donated state)",
      f"  temporaries    {gib(r.temporaries)}",
      f"  generated code {gib(r.code)}",
      f"  total          {gib(r.total)}  of {chip.hbm_bytes / GiB:.1f} GiB HBM "
      f"({100 * r.total / chip.hbm_bytes:.0f}%): "
      + ("FITS" if r.fits else "DOES NOT FIT"),
      "FLOPs per step, per device:",
  ]
  if r.flops_compiled:
    lines.append(f"  XLA cost analysis          {r.flops_compiled:.3e}  (counts each loop body "
              f"once: the micro-batch scan runs {cfg.train.grad_accum_steps} x)")
  if r.compiled:
    lines.append(f"  matmuls of the traced step {r.flops_traced:.3e}  (loops unrolled, remat "
              f"recomputation included: {r.flops_traced / r.flops_model:.2f} x the analytic)")
  lines.append(f"  analytic 6*N*tokens + attention {r.flops_model:.3e}  "
               f"(global {r.flops_model * t.n_devices:.3e})")
  ideal = r.flops_model / chip.peak_flops
  lines.append(f"  step time at 100% of the {chip.peak_flops / 1e12:.0f} TFLOP/s peak: "
               f"{ideal:.2f} s ({cfg.data.batch_size * cfg.data.seq_len / ideal:,.0f} "
               f"tokens/s over the slice)")
  if r.step_seconds:
    lines.append(f"  measured here: median step {r.step_seconds:.3f} s "
                 f"({cfg.data.batch_size * cfg.data.seq_len / r.step_seconds:,.0f} tokens/s)")
  step_time = step_time or r.step_seconds
  if step_time:
    lines.append(f"  at {step_time:g} s a step: model FLOPs utilisation "
                 f"{100 * ideal / step_time:.1f}%")
  return "\n".join(lines)


def run(cfg, topology: str, step_time=None, time_steps=0) -> tuple[Report, str]:
  target = parse_topology(topology)
  attention.check_backend(cfg.model.attention, target.chip.kind)
  if target.chip.kind == "tpu":
    report = compile_step(cfg, target, tpu_devices(target))
  elif gpus := local_gpus(target):
    report = compile_step(cfg, target, gpus, time_steps)
  else:
    report = estimate_gpu(cfg, target)
  if time_steps and not report.step_seconds:
    print(f"--time_steps: no {target.n_devices} x {target.chip.name} here to run steps on",
          file=sys.stderr)
  return report, format_report(cfg, report, step_time)


def main(argv=None):
  with cli.command():
    parser = cli.OneLineParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--config", required=True, help="config file, e.g. configs/evo_8b.py")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--topology", help="v5p-128, v4-64, v5e-256, v5p:4x4x8, gpu:h100x8")
    target.add_argument("--gpus", type=int, help="N: shorthand for --topology gpu:h100xN")
    parser.add_argument("--step_time", type=float, help="seconds a step; reports the MFU")
    parser.add_argument("--time_steps", type=int, default=0,
                        help="GPU topologies this machine has: run N steps, report the median")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    cfg = cli.load_config_file(args.config)
    cli.apply_overrides(cfg, rest)
    topology = args.topology or f"gpu:h100x{args.gpus}"
    print(f"{args.config}:")
    print(run(cfg, topology, args.step_time, args.time_steps)[1])


if __name__ == "__main__":
  main()
