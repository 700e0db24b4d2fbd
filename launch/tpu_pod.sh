#!/usr/bin/env bash
# Train on a Cloud TPU slice: create the TPU VM (or reuse one of that name), put this
# repository on every worker, install it, and start the same training command on all workers.
# jax.distributed initialises itself on TPU VMs (the coordinator and process ids come from the
# TPU metadata), so every worker runs the identical command.
#
#   TPU_NAME=evo-8b ZONE=us-east5-a ACCELERATOR_TYPE=v5p-128 CONFIG=configs/evo_8b.py \
#     WORKDIR=/mnt/shared/runs/evo_8b launch/tpu_pod.sh [--config.train.steps=1000 ...]
#
# Extra arguments go to `python -m evo_jax.train`. DRY_RUN=1 prints the commands instead of
# running them. See launch/README.md for every variable.
set -euo pipefail

TPU_NAME="${TPU_NAME:-evo}"
ZONE="${ZONE:-us-east5-a}"
PROJECT="${PROJECT:-}"                     # empty: gcloud's configured project
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v5p-128}"
case "$ACCELERATOR_TYPE" in                # the TPU VM image for the generation
  v5litepod-*|v5e-*) default_runtime=v2-alpha-tpuv5-lite ;;
  v5p-*) default_runtime=v2-alpha-tpuv5 ;;
  v6e-*) default_runtime=v2-alpha-tpuv6e ;;
  *) default_runtime=tpu-ubuntu2204-base ;;
esac
RUNTIME_VERSION="${RUNTIME_VERSION:-$default_runtime}"
SPOT="${SPOT:-0}"                          # 1: a spot (preemptible) slice
CONFIG="${CONFIG:-configs/evo_8b.py}"
# Checkpoints are written by every worker: WORKDIR must be one directory all workers see
# (a Filestore/NFS or gcsfuse mount at the same path on each).
WORKDIR="${WORKDIR:?set WORKDIR to a directory every worker shares}"
REPO_URL="${REPO_URL:-}"                   # empty: copy this checkout (git archive HEAD)
REPO_REF="${REPO_REF:-main}"               # with REPO_URL: the branch, tag or commit
REMOTE_DIR="${REMOTE_DIR:-evo_jax}"        # on the workers, relative to the home directory
LOG="${LOG:-train.log}"                    # in REMOTE_DIR on each worker
DRY_RUN="${DRY_RUN:-0}"

run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

where=(--zone "$ZONE")
if [[ -n "$PROJECT" ]]; then
  where+=(--project "$PROJECT")
fi
on_all_workers() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${where[@]}" --worker=all --command "$1"
}

# 1. The slice: reuse it when it exists (a restarted run resumes from WORKDIR's checkpoint).
if [[ "$DRY_RUN" != 1 ]] && gcloud compute tpus tpu-vm describe "$TPU_NAME" "${where[@]}" \
    >/dev/null 2>&1; then
  echo "reusing TPU VM $TPU_NAME"
else
  create=(gcloud compute tpus tpu-vm create "$TPU_NAME" "${where[@]}"
          --accelerator-type "$ACCELERATOR_TYPE" --version "$RUNTIME_VERSION")
  if [[ "$SPOT" == 1 ]]; then
    create+=(--spot)
  fi
  run "${create[@]}"
fi

# 2. The code, identical on every worker.
if [[ -n "$REPO_URL" ]]; then
  on_all_workers "{ [ -d $REMOTE_DIR/.git ] || git clone -q $(printf '%q' "$REPO_URL") \
$REMOTE_DIR; } && git -C $REMOTE_DIR fetch -q origin $(printf '%q' "$REPO_REF") && \
git -C $REMOTE_DIR checkout -q FETCH_HEAD"
else
  repo_root="$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"
  archive="$(mktemp --suffix=.tar.gz)"
  trap 'rm -f "$archive"' EXIT
  git -C "$repo_root" archive --format=tar.gz -o "$archive" HEAD
  run gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:evo_jax.tar.gz" "${where[@]}" \
    --worker=all
  on_all_workers "mkdir -p $REMOTE_DIR && tar -xzf evo_jax.tar.gz -C $REMOTE_DIR"
fi

# 3. Install (jax with libtpu), then 4. start the run on all workers, detached from ssh.
on_all_workers "cd $REMOTE_DIR && python3 -m pip install -q -e '.[tpu]'"
train_args="$(printf ' %q' --config "$CONFIG" --workdir "$WORKDIR" "$@")"
on_all_workers "cd $REMOTE_DIR && nohup python3 -m evo_jax.train$train_args > $LOG 2>&1 &"
echo "started on all workers of $TPU_NAME; follow worker 0 with:"
echo "  gcloud compute tpus tpu-vm ssh $TPU_NAME ${where[*]} --worker=0 --command 'tail -f $REMOTE_DIR/$LOG'"
