#!/usr/bin/env bash
# The TPU VM startup script: `t5x-like launch tpu-vm` copies it (settings filled in) to every
# worker of every slice and runs `bash ~/t5x_like_worker.sh start` there.
#
#   start   install, then detach
#   install uv, and with it a Python 3.11 venv in ~/t5x_like_venv whatever the image's python3
#           is, holding this code (the unpacked ~/t5x_like.tgz, or the pip spec) and jax[tpu]
#   detach  run the training command detached (nohup + setsid: it survives the ssh
#           connection), its output in ~/t5x_like.log and its exit status in ~/t5x_like.status
#   follow  print the log as it grows until the status exists, then exit with that status
#   status  wait for the recorded status, then exit with it
#
# Copy it to change how workers install or run; the launcher renders its copy from this file.
set -euo pipefail

# --- settings (`t5x-like launch tpu-vm` fills these in) ------------------------------------
INSTALL=@INSTALL@          # a pip spec (e.g. git+https://...), or "" = the unpacked checkout
PYTHON_VERSION=@PYTHON_VERSION@
JAX_TPU=@JAX_TPU@
RUN=(@RUN@)                # the t5x-like command every worker runs
ENV_VARS=(@ENV_VARS@)      # --env K=V pairs
# --------------------------------------------------------------------------------------------

SRC="$HOME/t5x_like"
VENV="$HOME/t5x_like_venv"
LOG="$HOME/t5x_like.log"
STATUS="$HOME/t5x_like.status"

install() {
  if ! command -v uv >/dev/null 2>&1 && [ ! -x "$HOME/.local/bin/uv" ]; then
    curl -LsSf https://astral.sh/uv/install.sh | sh
  fi
  local uv
  uv=$(command -v uv || echo "$HOME/.local/bin/uv")
  "$uv" venv --allow-existing --python "$PYTHON_VERSION" "$VENV"
  if [ -n "$INSTALL" ]; then
    "$uv" pip install --python "$VENV/bin/python" "$INSTALL" "$JAX_TPU"
  else
    mkdir -p "$SRC"
    tar xzf "$HOME/t5x_like.tgz" -C "$SRC"
    "$uv" pip install --python "$VENV/bin/python" "$SRC" "$JAX_TPU"
  fi
}

run() {
  local kv status=0
  for kv in "${ENV_VARS[@]}"; do
    export "${kv?}"
  done
  export T5X_LIKE_DISTRIBUTED=auto PYTHONUNBUFFERED=1 PATH="$VENV/bin:$PATH"
  if [ -z "$INSTALL" ]; then
    cd "$SRC"
  fi
  "${RUN[@]}" || status=$?
  echo "$status" >"$STATUS.tmp"
  mv "$STATUS.tmp" "$STATUS"
}

detach() {
  rm -f "$STATUS"
  nohup setsid bash "$0" run >>"$LOG" 2>&1 </dev/null &
  echo "started on $(hostname): log $LOG"
}

case "${1:-}" in
  start)
    install
    detach
    ;;
  install)
    install
    ;;
  detach)
    detach
    ;;
  run)
    run
    ;;
  follow)
    touch "$LOG"
    tail -n +1 -F "$LOG" &
    tail_pid=$!
    until [ -f "$STATUS" ]; do
      sleep 5
    done
    sleep 2
    kill "$tail_pid" 2>/dev/null || true
    exit "$(cat "$STATUS")"
    ;;
  status)
    until [ -f "$STATUS" ]; do
      sleep 5
    done
    exit "$(cat "$STATUS")"
    ;;
  *)
    echo "usage: $0 start|install|detach|follow|status" >&2
    exit 2
    ;;
esac
