# Environment for running the pipeline on one machine without GPUs (sourced by the scripts).
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
export RAY_USAGE_STATS_ENABLED=0
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
export PYTHONUNBUFFERED=1
