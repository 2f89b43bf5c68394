#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (or K slices) from this machine, surviving preemption:
#
#   1. create the capacity: a TPU VM, or a queued resource (--queued, --num-slices > 1) that is
#      waited on until ACTIVE and given up at once if it turns FAILED or SUSPENDED;
#   2. copy tpu_vm_worker.sh (and this checkout, unless --install) to every worker and start
#      training there detached, so a dropped ssh connection does not end it;
#   3. follow worker 0's log, reconnecting when ssh drops, and take the exit status of every
#      worker;
#   4. when the capacity is lost (spot preemption, maintenance), delete it, create it again and
#      start again: training resumes from the last checkpoint in the gs:// workdir; at most
#      MAX_RESTARTS times;
#   5. delete the capacity on every exit, failures and Ctrl-C included (trap), unless KEEP=1.
#
# `t5x-like launch tpu-vm ... --dry-run` prints this file with the settings filled in.
set -euo pipefail

# --- settings (`t5x-like launch tpu-vm` fills these in) ------------------------------------
NAME=@NAME@
PROJECT=@PROJECT@
ZONE=@ZONE@
ACCELERATOR_TYPE=@ACCELERATOR_TYPE@
RUNTIME_VERSION=@RUNTIME_VERSION@
NUM_SLICES=@NUM_SLICES@
QUEUED=@QUEUED@                # 1: a queued resource (always for NUM_SLICES > 1)
SPOT=@SPOT@
MAX_RESTARTS=@MAX_RESTARTS@    # recreations after lost capacity
KEEP=@KEEP@                    # 1: do not delete the capacity at the end
CHECKOUT=@CHECKOUT@            # packed and copied to the workers; "" when they pip-install
SOURCES=(@SOURCES@)
POLL_SECONDS=30
# --------------------------------------------------------------------------------------------

WHERE=(--zone="$ZONE" --project="$PROJECT")
EXTRA=()
if [ "$SPOT" = 1 ]; then
  EXTRA+=(--spot)
fi
NODES=("$NAME")
if [ "$NUM_SLICES" -gt 1 ]; then
  NODES=()
  for ((i = 0; i < NUM_SLICES; i++)); do
    NODES+=("$NAME-$i")
  done
fi
LOST=75  # status of a run whose capacity went away

STAGE=$(mktemp -d)
cat >"$STAGE/t5x_like_worker.sh" <<'T5X_LIKE_WORKER_EOF'
@WORKER_SCRIPT@
T5X_LIKE_WORKER_EOF
if [ -n "$CHECKOUT" ]; then
  tar czf "$STAGE/t5x_like.tgz" -C "$CHECKOUT" --exclude=__pycache__ "${SOURCES[@]}"
fi

create() {
  if [ "$QUEUED" != 1 ]; then
    gcloud compute tpus tpu-vm create "$NAME" --accelerator-type="$ACCELERATOR_TYPE" \
      --version="$RUNTIME_VERSION" "${WHERE[@]}" "${EXTRA[@]}"
    return
  fi
  local count=(--node-id="$NAME")
  if [ "$NUM_SLICES" -gt 1 ]; then
    count=(--node-count="$NUM_SLICES" --node-prefix="$NAME")
  fi
  gcloud compute tpus queued-resources create "$NAME" "${count[@]}" \
    --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" \
    "${WHERE[@]}" "${EXTRA[@]}" || return
  local state
  while :; do
    state=$(gcloud compute tpus queued-resources describe "$NAME" "${WHERE[@]}" \
      --format='value(state.state)') || return
    case "$state" in
      ACTIVE) return 0 ;;
      FAILED | SUSPENDED)
        echo "queued resource $NAME is $state; giving up (see: gcloud compute tpus" \
          "queued-resources describe $NAME --zone=$ZONE --project=$PROJECT)" >&2
        return 1
        ;;
    esac
    echo "queued resource $NAME: $state; waiting"
    sleep "$POLL_SECONDS"
  done
}

capacity_ok() {
  local state
  if [ "$QUEUED" = 1 ]; then
    state=$(gcloud compute tpus queued-resources describe "$NAME" "${WHERE[@]}" \
      --format='value(state.state)') || return 1
    [ "$state" = ACTIVE ]
  else
    state=$(gcloud compute tpus tpu-vm describe "$NAME" "${WHERE[@]}" \
      --format='value(state)') || return 1
    [ "$state" = READY ]
  fi
}

delete() {
  if [ "$QUEUED" = 1 ]; then
    gcloud compute tpus queued-resources delete "$NAME" "${WHERE[@]}" --force --quiet
  else
    gcloud compute tpus tpu-vm delete "$NAME" "${WHERE[@]}" --quiet
  fi
}

start() {  # copy and start on every worker of every slice, the slices in parallel
  local node pids=() status=0 files=("$STAGE/t5x_like_worker.sh")
  if [ -n "$CHECKOUT" ]; then
    files+=("$STAGE/t5x_like.tgz")
  fi
  for node in "${NODES[@]}"; do
    {
      gcloud compute tpus tpu-vm scp "${files[@]}" "$node:" --worker=all "${WHERE[@]}" &&
        gcloud compute tpus tpu-vm ssh "$node" --worker=all "${WHERE[@]}" \
          --command='bash ~/t5x_like_worker.sh start'
    } &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do
    wait "$pid" || status=$?
  done
  return "$status"
}

follow() {  # 0 when every worker's training succeeded, LOST, or a worker's failed status
  local node rc
  while :; do
    rc=0
    gcloud compute tpus tpu-vm ssh "${NODES[0]}" --worker=0 "${WHERE[@]}" \
      --command='bash ~/t5x_like_worker.sh follow' || rc=$?
    if [ "$rc" -eq 0 ]; then  # worker 0's training succeeded
      break
    fi
    if ! capacity_ok; then
      return "$LOST"
    fi
    if [ "$rc" -ne 255 ]; then  # 255: ssh itself failed; otherwise training's status
      return "$rc"
    fi
    echo "lost the ssh connection; training goes on detached: following again" >&2
    sleep "$POLL_SECONDS"
  done
  for node in "${NODES[@]}"; do  # and every other worker's
    rc=0
    gcloud compute tpus tpu-vm ssh "$node" --worker=all "${WHERE[@]}" \
      --command='bash ~/t5x_like_worker.sh status' || rc=$?
    if [ "$rc" -ne 0 ]; then
      capacity_ok || return "$LOST"
      return "$rc"
    fi
  done
}

run_once() {
  create || return
  if ! start; then
    capacity_ok || return "$LOST"
    return 1
  fi
  follow
}

cleanup() {
  local status=$?
  trap - EXIT INT TERM
  if [ "$KEEP" = 1 ]; then
    echo "kept $NAME (delete it yourself when done)"
  else
    delete || echo "could not delete $NAME: delete it by hand" >&2
  fi
  rm -rf "$STAGE"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

restarts=0
while :; do
  status=0
  run_once || status=$?
  if [ "$status" -eq 0 ]; then
    echo "training finished on $NAME"
    exit 0
  fi
  if [ "$status" -ne "$LOST" ] || [ "$restarts" -ge "$MAX_RESTARTS" ]; then
    echo "training on $NAME ended with status $status after $restarts restart(s)" >&2
    exit "$status"
  fi
  restarts=$((restarts + 1))
  echo "capacity lost (preempted?): recreating $NAME, restart $restarts of $MAX_RESTARTS;" \
    "training resumes from the last checkpoint" >&2
  delete || true
done
