# syntax=docker/dockerfile:1
# The image of ctdiff's Kubernetes work pools (docs/kubernetes.md):
#   docker build -t registry.example.com/ctdiff:0.1.0 .
# Flows start in /opt/ctdiff as a non-root user; the pools mount the shared volume over
# /opt/ctdiff/data, so config paths such as data/store.zarr mean the same in a pod as locally.

# CUDA PyTorch inside pyproject's torch>=2.4 range; another release only changes this tag.
ARG BASE_IMAGE=pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# uid/gid 10001: the pools' pod securityContext (runAsUser, fsGroup) uses the same numbers,
# which makes the shared volume writable for it.
RUN groupadd --gid 10001 ctdiff \
    && useradd --no-log-init --create-home --uid 10001 --gid 10001 ctdiff

WORKDIR /opt/ctdiff
COPY pyproject.toml README.md ./
COPY ctdiff ctdiff
COPY tasks tasks
COPY flows flows
COPY deployments deployments
# The constraint keeps the base's CUDA torch: pip must not swap in another build to satisfy a
# dependency. The pip cache is a build-time mount and the build's leftovers are removed, so
# neither becomes part of the image.
RUN --mount=type=cache,target=/root/.cache/pip \
    python -c "import torch; print(f'torch=={torch.__version__}')" > /tmp/torch-constraint.txt \
    && pip install --constraint /tmp/torch-constraint.txt ".[k8s]" \
    && rm -rf /tmp/torch-constraint.txt build ./*.egg-info
COPY config config
COPY prefect.yaml ./

# Numeric, so Kubernetes can check runAsNonRoot against it.
USER 10001:10001
