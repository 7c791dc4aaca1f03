# optuna-dashboard on the cluster's PostgreSQL study storage (build context: the repository root).
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
RUN pip install "optuna==5.0.0" "optuna-dashboard==0.21.0" "psycopg2-binary==2.9.13" \
 && useradd --create-home --uid 1000 optuna
COPY docker/optuna-dashboard-entrypoint.sh /usr/local/bin/optuna-dashboard-entrypoint
USER optuna
WORKDIR /home/optuna
EXPOSE 8080
ENTRYPOINT ["optuna-dashboard-entrypoint"]
# docker-compose.yml gives the command (optuna-dashboard postgresql+psycopg2://... --host 0.0.0.0).
CMD ["optuna-dashboard", "--help"]
