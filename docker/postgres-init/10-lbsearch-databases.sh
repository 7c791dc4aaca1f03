#!/bin/bash
# Creates the two lbsearch databases and their owners from the environment:
#   optuna  owned by $OPTUNA_DB_USER (password $OPTUNA_DB_PASSWORD)   - the Optuna study storage
#   mlflow  owned by $MLFLOW_DB_USER (password $MLFLOW_DB_PASSWORD)   - the MLflow backend store
# The postgres image runs it once, on an empty data volume (/docker-entrypoint-initdb.d);
# tests/stack.py runs it against its own server. Connection: psql's defaults / PG* variables.
set -euo pipefail
: "${OPTUNA_DB_PASSWORD:?}" "${MLFLOW_DB_PASSWORD:?}"

psql -v ON_ERROR_STOP=1 --username "${POSTGRES_USER:-postgres}" --dbname "${POSTGRES_DB:-postgres}" \
    -v optuna_user="${OPTUNA_DB_USER:-optuna}" -v optuna_password="$OPTUNA_DB_PASSWORD" \
    -v mlflow_user="${MLFLOW_DB_USER:-mlflow}" -v mlflow_password="$MLFLOW_DB_PASSWORD" <<'SQL'
CREATE ROLE :"optuna_user" LOGIN PASSWORD :'optuna_password';
CREATE DATABASE optuna OWNER :"optuna_user";
CREATE ROLE :"mlflow_user" LOGIN PASSWORD :'mlflow_password';
CREATE DATABASE mlflow OWNER :"mlflow_user";
SQL
