#!/bin/sh
# Runs the command from docker-compose.yml; adds `--app-name $MLFLOW_APP_NAME` only when it is set
# (basic-auth needs MLFLOW_FLASK_SERVER_SECRET_KEY and MLFLOW_AUTH_ADMIN_PASSWORD too).
set -eu
if [ -n "${MLFLOW_APP_NAME:-}" ]; then
    : "${MLFLOW_FLASK_SERVER_SECRET_KEY:?MLFLOW_APP_NAME is set: set MLFLOW_FLASK_SERVER_SECRET_KEY in .env}"
    : "${MLFLOW_AUTH_ADMIN_PASSWORD:?MLFLOW_APP_NAME is set: set MLFLOW_AUTH_ADMIN_PASSWORD in .env}"
    set -- "$@" --app-name "$MLFLOW_APP_NAME"
else
    # Empty values would otherwise count as "set" for MLflow.
    unset MLFLOW_APP_NAME MLFLOW_FLASK_SERVER_SECRET_KEY MLFLOW_AUTH_ADMIN_PASSWORD
fi
exec "$@"
