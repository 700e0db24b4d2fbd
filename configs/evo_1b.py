"""Evo 1B: a LLaMA-3.2-1B sized backbone (16 layers, width 2048, 16 query and 8 KV heads of
128, SwiGLU 8192, vocabulary 128256, tied embeddings) plus the time conditioning: the size to
try recipes on before the 8B, on a v5p-32 / v5e-64 or one 8-GPU node. Every field:
evo_jax/config.py.

Tokenizer: as in configs/evo_8b.py, `data.tokenizer` must name a tokenizer with exactly
`model.vocab_size` (128256) pieces; a real run imports one (issue 6).
"""
from evo_jax import config


def get_config():
  c = config.default_config()
  c.model.update(
      vocab_size=128256, d_model=2048, n_layers=16, n_heads=16, n_kv_heads=8, head_dim=128,
      d_ff=8192, rope_theta=500000.0, norm_eps=1e-5, tie_embeddings=True,
      time_dim=256, fourier_dim=256,
      dtype="bfloat16",
      remat="dots",          # keep the matmul outputs: cheaper than full recompute at 1B
      scan_layers=True,      # one block compiled, its parameters stacked over the layers
      attention="chunked",   # the 4096-long two-stream attention a block of queries at a time
      attention_chunk=1024,
  )
  # 2048-token rows (the two-stream step attends over 4096 positions); 1024 rows = 2M tokens
  # per step in 16 micro-batches: 4 rows per chip per micro-batch on 16 chips (v5p-32), pure
  # FSDP (docs/scaling.md: `python -m evo_jax.aot` measures it; 8 micro-batches need
  # 85.2 of 95 GiB per chip, too close to the limit).
  c.data.update(seq_len=2048, batch_size=1024, tokenizer="", shuffle_rows=16384)
  c.train.grad_accum_steps = 16
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  # 250k steps x 2M tokens = 500B tokens.
  c.optim.update(lr=4e-4, warmup_steps=2000, decay_steps=0, min_lr_ratio=0.1,
                 weight_decay=0.1, b1=0.9, b2=0.95, clip_norm=1.0)
  c.train.update(steps=250_000, log_every=50, eval_every=2000, ckpt_every=1000,
                 keep_checkpoints=3, eval_batches=16, samples=3, sample_tokens=64,
                 sample_prompt="The ")
  return c
