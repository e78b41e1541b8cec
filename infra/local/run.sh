#!/usr/bin/env bash
# README command 1: set up .venv if needed, start a local Ray cluster (`ray start --head`), and
# submit the smoke pipeline to it with `ray job submit` (shapes corpus, tiny models, CPUs).
# Extra arguments go to pipelines/full.py (e.g. --dry-run, --set train_generator.steps=100).
set -euo pipefail
cd "$(dirname "$0")/../.."
./infra/local/setup.sh
source infra/local/env.sh
export PATH="$PWD/.venv/bin:$PATH"

STORAGE="${TOKENFLOW_STORAGE:-$PWD/outputs/smoke}"
CONFIG="${TOKENFLOW_CONFIG:-configs/pipelines/smoke.yaml}"
DASHBOARD="http://127.0.0.1:8265"
COMMIT="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
mkdir -p "$STORAGE"

if ! ray status >/dev/null 2>&1; then
  ray start --head --num-cpus "${TOKENFLOW_NUM_CPUS:-$(nproc)}" --dashboard-host 127.0.0.1 \
    --disable-usage-stats >/dev/null
  echo "started a local Ray cluster (dashboard $DASHBOARD; stop it with: .venv/bin/ray stop)"
fi

ray job submit --address "$DASHBOARD" --working-dir . \
  --runtime-env-json "{\"env_vars\": {\"TOKENFLOW_GIT_COMMIT\": \"$COMMIT\", \"DS_ACCELERATOR\": \"$DS_ACCELERATOR\"}}" \
  -- python pipelines/full.py --config "$CONFIG" --storage "$STORAGE" "$@"

echo
echo "outputs:   $STORAGE/<stage>/<hash>/"
echo "MLflow UI: .venv/bin/mlflow ui --backend-store-uri sqlite:///$STORAGE/mlflow.db --port 5000  (http://127.0.0.1:5000)"
