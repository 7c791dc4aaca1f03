#!/bin/sh
# Runs the command from docker-compose.yml (optuna-dashboard STORAGE_URL ...). optuna-dashboard opens
# an RDB storage with skip_table_creation=True, so on a fresh database it would fail until the first
# `lbsearch run` created Optuna's tables: create them first (idempotent; RDBStorage does it).
set -eu
if [ "$(basename "${1:-}")" = "optuna-dashboard" ] && [ -n "${2:-}" ]; then
    python -c 'import sys, optuna; optuna.storages.RDBStorage(sys.argv[1])' "$2"
fi
exec "$@"
