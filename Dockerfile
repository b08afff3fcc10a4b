# The project image that every Kubeflow component runs on. It installs this package from the same
# pyproject.toml as the README's `make setup` (one dependency spec), plus the kubeflow extra. On
# x86_64, PyPI's torch wheel is a CUDA build, so the train step uses the node's GPU (the NVIDIA
# driver comes from the node); on a CPU node the same image trains on the CPU.
#
#   docker build -t REGISTRY/deepfake-detector:TAG .
#   docker push REGISTRY/deepfake-detector:TAG
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DVC_NO_ANALYTICS=1

# git: DVC needs it to fetch `data.source: dvc:REPO@REV` data.
RUN apt-get update \
    && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
COPY components ./components
COPY pipeline ./pipeline
RUN pip install '.[kubeflow]'
COPY params.yaml dvc.yaml MLproject ./

# Components set their own command; this is for `docker run IMAGE deepfake --help`.
CMD ["deepfake", "--help"]
