"""Evo 8B: a LLaMA-3-8B / Qwen3-8B shaped backbone (32 layers, width 4096, 32 query and 8 KV
heads of 128, SwiGLU 14336, vocabulary 128256, untied head) plus the time conditioning, for
pretraining on TPU pods (v5p-128 and up) or GPU clusters. Every field: evo_jax/config.py.

Tokenizer: `data.tokenizer` must be set to a tokenizer with exactly `model.vocab_size` pieces
(128256, LLaMA-3's vocabulary). A real run imports the tokenizer and weights of a pretrained
model (issue 6, `evo_jax.convert`); left empty, a SentencePiece model of that size would be
trained on the corpus, which is rarely what one wants at this scale.

Memory and speed per topology: `python -m evo_jax.aot --config configs/evo_8b.py --topology
v5p-128` (docs/scaling.md, "TPU topologies, compiled ahead of time").
"""
from evo_jax import config


def get_config():
  c = config.default_config()
  c.model.update(
      vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
      d_ff=14336, rope_theta=500000.0, norm_eps=1e-5, tie_embeddings=False,
      time_dim=256, fourier_dim=256,
      dtype="bfloat16",
      remat="full",          # keep only each block's input: 8B activations do not fit otherwise
      scan_layers=True,      # one block compiled, its parameters stacked over the 32 layers
      attention="chunked",   # the 8192-long two-stream attention a block of queries at a time
      attention_chunk=1024,
  )
  # 1024 x 4096 tokens (4M, LLaMA's batch) per step. Pure FSDP over every chip in 4
  # micro-batches: on a v5p-128 (64 chips) each chip holds 1/64 of the state and 4 rows per
  # micro-batch; `python -m evo_jax.aot` measures 47.8 of 95 GiB per chip (docs/scaling.md).
  # On N chips keep batch_size divisible by grad_accum_steps x N (check_batch_size says so
  # when it is not); more micro-batches trade speed for memory (16: 14.9 GiB).
  c.data.update(seq_len=4096, batch_size=1024, tokenizer="", shuffle_rows=16384)
  c.train.grad_accum_steps = 4
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  # 250k steps x 4M tokens = 1T tokens; LLaMA-style AdamW.
  c.optim.update(lr=3e-4, warmup_steps=2000, decay_steps=0, min_lr_ratio=0.1,
                 weight_decay=0.1, b1=0.9, b2=0.95, clip_norm=1.0)
  c.train.update(steps=250_000, log_every=50, eval_every=2000, ckpt_every=1000,
                 keep_checkpoints=3, eval_batches=16, samples=3, sample_tokens=64,
                 sample_prompt="The ")
  return c
