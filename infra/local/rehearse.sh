#!/usr/bin/env bash
# Rehearse a cluster's setup on this machine: an S3 object store (SeaweedFS), PostgreSQL and an
# MLflow server with basic auth (PostgreSQL backend store, artifacts proxied to S3), a Ray head
# whose processes get the storage and tracking settings only from their environment (as a
# cluster's nodes do), and the pipeline with every output on s3://. Everything it started stops
# when it ends (Ctrl-C included). Each rehearsal starts from empty services.
#
#   ./infra/local/rehearse.sh                                 # the smoke pipeline
#   TOKENFLOW_CONFIG=configs/pipelines/ci.yaml ./infra/local/rehearse.sh --set train_tokenizer.steps=50
#   KEEP_SERVICES=1 ./infra/local/rehearse.sh                 # leave them up to browse the MLflow UI
#
# Extra arguments go to pipelines/full.py. Services' data and logs: outputs/rehearsal/services.
set -euo pipefail
cd "$(dirname "$0")/../.."
./infra/local/setup.sh
source infra/local/env.sh
export PATH="$PWD/.venv/bin:$PATH"

CONFIG="${TOKENFLOW_CONFIG:-configs/pipelines/smoke.yaml}"
DIR="$PWD/outputs/rehearsal/services"
DASHBOARD="http://127.0.0.1:8265"
COMMIT="$(git rev-parse HEAD 2>/dev/null || echo unknown)"

if ray status >/dev/null 2>&1; then
  echo "stopping the running local Ray cluster: the rehearsal starts its own with the services' settings"
  ray stop >/dev/null
fi
rm -rf "$DIR" && mkdir -p "$DIR"
python -m tokenflow.services --dir "$DIR" &
services=$!
stop_all() {
  ray stop >/dev/null 2>&1 || true
  if [ -z "${KEEP_SERVICES:-}" ]; then kill "$services" 2>/dev/null && wait "$services" || true; fi
}
trap stop_all EXIT
until [ -f "$DIR/client.env" ]; do
  kill -0 "$services" 2>/dev/null || { echo "the services did not start; logs under $DIR" >&2; exit 1; }
  sleep 1
done

# The variables a cluster's nodes carry (S3 endpoint and key, tracking URI, user and password):
# `ray start` passes them to the job's driver and every worker; nothing secret goes on a command line.
set -a; source "$DIR/client.env"; set +a
ray start --head --num-cpus "${TOKENFLOW_NUM_CPUS:-$(nproc)}" --dashboard-host 127.0.0.1 --disable-usage-stats >/dev/null
STORAGE="s3://tokenflow/rehearsal"
ray job submit --address "$DASHBOARD" --working-dir . \
  --runtime-env-json "{\"env_vars\": {\"TOKENFLOW_GIT_COMMIT\": \"$COMMIT\", \"DS_ACCELERATOR\": \"$DS_ACCELERATOR\"}}" \
  -- python pipelines/full.py --config "$CONFIG" --storage "$STORAGE" "$@"

echo
echo "outputs: $STORAGE/<stage>/<hash>/ (endpoint $AWS_ENDPOINT_URL)"
echo "MLflow:  $MLFLOW_TRACKING_URI (user $MLFLOW_TRACKING_USERNAME; password in $DIR/client.env)"
if [ -n "${KEEP_SERVICES:-}" ]; then
  echo "services left running (pid $services); stop them with: kill $services"
  trap - EXIT
  ray stop >/dev/null 2>&1 || true
fi
