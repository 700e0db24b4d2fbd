"""Adapting a pretrained LLaMA or Qwen model into an Evo (README, "Starting from a pretrained AR
model"). The argument is the Hugging Face checkpoint directory, or the workdir imported from it:

    python -m evo_jax.convert import --from HF_DIR --out DIR --config configs/adapt_llama.py:HF_DIR
    python -m evo_jax.train --config configs/adapt_llama.py:HF_DIR --workdir DIR

Give both commands the same --config (and --config.x=v overrides, e.g. the corpus): the workdir
is one run, and its settings are fixed at import. Sized for an 8B model on one 8-accelerator
host; every field and its meaning: evo_jax/config.py.
"""
from evo_jax import config
from evo_jax import convert
from evo_jax.errors import ConfigError


def get_config(checkpoint=""):
  if not checkpoint:
    raise ConfigError("configs/adapt_llama.py needs the checkpoint: "
                      "--config configs/adapt_llama.py:HF_DIR")
  c = config.default_config()
  c.model.update(convert.checkpoint_model_fields(checkpoint))
  # Cheaper time conditioning at 8B (method.md section 2); bf16 compute, recompute activations.
  c.model.update(time_cond="adaln_lowrank", time_rank=64, time_dim=256, fourier_dim=256,
                 dtype="bfloat16", remat="full")
  # Learning-rate groups: the new time conditioning and time head learn at optim.lr, the
  # pretrained backbone at pretrained_lr_scale x that, so that adaptation does not wash out
  # what pre-training learnt.
  c.optim.update(lr=3e-4, pretrained_lr_scale=0.1, warmup_steps=500, decay_steps=0,
                 weight_decay=0.0, min_lr_ratio=0.1)
  # Start AR-heavy: mostly W = 1 windows, the regime closest to the pretrained model, and
  # anneal to the balanced mixture over the curriculum; the clean-stream next-token loss keeps
  # the original AR readout trained throughout.
  c.progression.update(window_sizes=(1, 4, 16, -1), window_probs=(0.4, 0.2, 0.2, 0.2),
                       window_probs_start=(0.85, 0.05, 0.05, 0.05), curriculum_steps=4000)
  c.loss.clean_ar_weight = 1.0
  # The data mixture: data.corpus is a comma-separated list of files/globs (JSONL text fields
  # or plain files), whose documents are shuffled together, so each source counts by its size.
  # Adapt on text like the pre-training data (web text plus code), e.g.
  #   --config.data.corpus='/data/web/*.jsonl,/data/code/*.jsonl'
  # The default ("") is the Python standard library: enough to check the set-up, not to adapt.
  c.data.update(tokenizer="", seq_len=2048, batch_size=256, shuffle_rows=4096)
  c.mesh.update(data=1, fsdp=-1, tensor=1)   # FSDP: parameters and moments split over devices
  c.train.update(steps=20000, log_every=50, eval_every=1000, ckpt_every=1000, eval_batches=16,
                 sample_prompt="def fibonacci(n):")
  return c
