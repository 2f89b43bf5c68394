#!/usr/bin/env bash
# Run a JobSet on GKE and exit with its outcome: apply the manifest, stream the pods' logs
# while they run, wait for the JobSet's own terminal condition (Completed -> 0, Failed -> 1;
# the JobSet controller restarts every pod up to spec.failurePolicy.maxRestarts times first),
# and delete the JobSet on every exit (trap) unless KEEP=1.
#
# `t5x-like launch gke ... --dry-run` prints this file with the settings and the manifest
# (rendered from launch/jobset.yaml) filled in.
set -euo pipefail

# --- settings (`t5x-like launch gke` fills these in) ---------------------------------------
NAME=@NAME@
NAMESPACE=@NAMESPACE@
MANIFEST=@MANIFEST@
PODS=@PODS@                    # pods per attempt, for kubectl logs
KEEP=@KEEP@
POLL_SECONDS=30
# --------------------------------------------------------------------------------------------

NS=(--namespace="$NAMESPACE")
SELECTOR="jobset.sigs.k8s.io/jobset-name=$NAME"
cat >"$MANIFEST" <<'T5X_LIKE_JOBSET_EOF'
@JOBSET@
T5X_LIKE_JOBSET_EOF

logs_pid=""
cleanup() {
  local status=$?
  trap - EXIT INT TERM
  if [ -n "$logs_pid" ]; then
    kill "$logs_pid" 2>/dev/null || true
  fi
  if [ "$KEEP" = 1 ]; then
    echo "kept JobSet $NAME (kubectl delete jobset $NAME --namespace=$NAMESPACE)"
  else
    kubectl delete jobset "$NAME" "${NS[@]}" --ignore-not-found || true
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

kubectl apply -f "$MANIFEST"

# The pods' logs while they exist, again after each restart recreates them (best effort:
# the outcome comes from the JobSet below; a reconnect may repeat up to a minute of lines).
(
  while :; do
    until kubectl get pods "${NS[@]}" --selector="$SELECTOR" --output=name | grep -q .; do
      sleep 10
    done
    kubectl logs "${NS[@]}" --selector="$SELECTOR" --follow --prefix --since=60s \
      --max-log-requests="$PODS" --ignore-errors || true
    sleep 10
  done
) &
logs_pid=$!

while :; do
  conditions=$(kubectl get jobset "$NAME" "${NS[@]}" \
    --output='jsonpath={.status.conditions[?(@.status=="True")].type}') || conditions=""
  case " $conditions " in
    *" Completed "*)
      echo "JobSet $NAME completed"
      exit 0
      ;;
    *" Failed "*)
      echo "JobSet $NAME failed: $(kubectl get jobset "$NAME" "${NS[@]}" \
        --output='jsonpath={.status.conditions[?(@.type=="Failed")].message}')" >&2
      exit 1
      ;;
  esac
  sleep "$POLL_SECONDS"
done
