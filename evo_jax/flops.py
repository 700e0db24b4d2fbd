"""FLOPs of a train step, and what the chip can do: the figures behind MFU.

model_flops counts a step from the config (the convention of MaxText and PaLM's MFU: what the
model needs, not what the program happens to compute); matmul_flops counts what a traced
program computes, masked attention scores included. peak_flops is the chip's dense bf16 peak
(GPU, TPU) or, on a CPU, None: `bench train` measures the CPU's with a large matmul instead.
"""
import math
import time

import jax
import numpy as np

# Dense bf16 peak FLOP/s per chip, by a substring of jax's device_kind (first match wins).
BF16_PEAKS = (
    ("H200", 989e12), ("H100", 989e12), ("H800", 989e12), ("B200", 2250e12),
    ("A100", 312e12), ("L4", 121e12),
    ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5", 197e12),   # v5 lite = v5e
    ("TPU v4", 275e12),
)


def peak_flops(device):
  """The chip's dense bf16 peak in FLOP/s, or None (a CPU, or a chip not in BF16_PEAKS)."""
  if device.platform == "cpu":
    return None
  kind = device.device_kind
  return next((peak for name, peak in BF16_PEAKS if name in kind), None)


def measured_matmul_peak(n=2048, repeats=5):
  """FLOP/s of an n x n float32 matmul on the default device, the median of `repeats`: the
  practical peak of a CPU, which has no published figure worth quoting."""
  a = jax.random.normal(jax.random.key(0), (n, n))
  matmul = jax.jit(lambda x: x @ x)
  jax.block_until_ready(matmul(a))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(matmul(a))
    times.append(time.perf_counter() - start)
  return 2 * n ** 3 / float(np.median(times))


def model_flops(cfg, n_params: int, streams: int = 2) -> float:
  """Training FLOPs of one step without recomputation: 6 x (parameters used in matmuls) x
  positions, plus the attention scores and mixing (4 per score element forward, x3 with the
  backward), every score of the [T, T] matrix counted. A training row of the Evo step is two
  streams (T = 2 x seq_len); streams=1 is the plain causal LM of the same backbone
  (T = seq_len). What the loss adds (the posterior term, e_hat, self-conditioning's first
  pass) is the objective's, not the model's: matmul_flops of the traced step counts it."""
  m = cfg.model
  matmul_params = n_params - (0 if m.tie_embeddings else m.vocab_size * m.d_model)
  rows, seq = cfg.data.batch_size, cfg.data.seq_len
  positions = rows * streams * seq
  head_size = m.head_dim or m.d_model // m.n_heads
  attention = 12 * m.n_layers * m.n_heads * head_size * positions * streams * seq
  return 6 * matmul_params * positions + attention


def _subjaxprs(value):
  if isinstance(value, (tuple, list)):
    for v in value:
      yield from _subjaxprs(v)
  elif hasattr(value, "eqns"):
    yield value
  elif hasattr(getattr(value, "jaxpr", None), "eqns"):   # a ClosedJaxpr
    yield value.jaxpr


def matmul_flops(jaxpr) -> float:
  """FLOPs (2 per multiply-add) of every dot_general of a traced program, scan bodies counted
  as often as they run (XLA's cost analysis counts a loop body once), the recomputation of
  rematerialised blocks included, the larger branch of a cond."""
  total = 0.0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (contracting, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contracting)
    inner = [matmul_flops(j) for v in eqn.params.values() for j in _subjaxprs(v)]
    if inner:
      times = eqn.params["length"] if eqn.primitive.name == "scan" else 1
      total += times * (max(inner) if eqn.primitive.name == "cond" else sum(inner))
  return total


def traced_flops(fn, *args) -> float:
  """matmul_flops of fn(*args), traced from shapes only."""
  return matmul_flops(jax.make_jaxpr(fn)(*args).jaxpr)
