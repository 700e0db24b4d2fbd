#!/bin/bash
# Everything we measure on a GPU, in one command on a machine with a fresh environment and no
# network beyond the package registry (about 8 minutes on one H100/H200):
#
#     launch/gpu_check.sh OUT_DIR
#
# It installs the repository with the CUDA extra into OUT_DIR/venv, runs the tests that
# exercise the model, attention, loss and decoding on the GPU, and writes into OUT_DIR:
#   tests.txt                 the pytest summary
#   attention.json            every model.attention kind against dense (equality, time), bf16
#   train_tiny.json           bench train of configs/tiny.py: Evo vs causal step, MFU, and
#                             block_sparse attention against dense
#   train_evo_1b_slice.json   the same for evo_1b's width at 4 layers, vocabulary 128k,
#                             vocabulary-chunked loss against the whole readout
#   decode.json               bench decode of a 300-step tiny run at batch 1 and 16
# Paste the figures into docs/scaling.md with the machine and date. Steps that fail are
# logged in OUT_DIR/failed.txt and the rest still run.
set -uo pipefail
OUT=${1:?usage: launch/gpu_check.sh OUT_DIR}
REPO=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$REPO"

step() {   # step NAME TIMEOUT_S COMMAND...: run it, log it, carry on if it fails
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*"
  if ! timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; then
    echo "$name failed (exit $?): see $OUT/$name.log" | tee -a "$OUT/failed.txt"
  fi
  tail -n 5 "$OUT/$name.log"
}

python3 -m venv "$OUT/venv" && source "$OUT/venv/bin/activate"
step install 300 pip install -q -e ".[test,cuda]"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python -c "import jax; print(jax.devices())" | tee "$OUT/devices.txt"

step tests 120 python -m pytest -q -p no:xdist tests/test_attention.py tests/test_model.py \
    tests/test_loss.py -k "not sharded"
cp "$OUT/tests.log" "$OUT/tests.txt"
step attention 90 python -m evo_jax.bench attention --seq_len 2048 --batch_size 8 \
    --heads 16 --kv_heads 8 --head_dim 128 --chunk 512 --dtype bfloat16 \
    --kinds dense,chunked,block_sparse,cudnn --json "$OUT/attention.json"
step train_tiny 120 python -m evo_jax.train --config configs/tiny.py --workdir "$OUT/tiny" \
    --config.train.steps=300 --config.train.samples=0
step bench_train_tiny 90 python -m evo_jax.bench train --config configs/tiny.py --steps 20 \
    --config.model.dtype=bfloat16 --against model.attention=block_sparse \
    --json "$OUT/train_tiny.json"
step bench_train_evo_1b_slice 150 python -m evo_jax.bench train --config configs/evo_1b.py \
    --steps 10 --config.model.n_layers=4 --config.data.batch_size=8 \
    --config.train.grad_accum_steps=1 --config.data.tokenizer="$OUT/tiny/tokenizer.model" \
    --config.mesh.fsdp=1 --config.mesh.data=1 --against loss.vocab_chunk=16032 \
    --json "$OUT/train_evo_1b_slice.json"
step decode 90 python -m evo_jax.bench decode --workdir "$OUT/tiny" --batch_sizes 1,16 \
    --repeats 2 --json "$OUT/decode.json"
echo "results in $OUT"
