# The image of ctdiff's work pools (Kubernetes: docs/kubernetes.md; Docker: README). Build it with
#   deployments/build-image.sh [--base debian|IMAGE] [TAG]
# or `docker build -t ctdiff:0.1.0 .` (classic builder or BuildKit; no frontend image is pulled).
# Flows start in /opt/ctdiff as uid 10001; the pools mount the shared volume over
# /opt/ctdiff/data, so config paths such as data/store.zarr mean the same in a pod as locally.
# The root filesystem may be read-only: runs write only to the volume and to /tmp.

# Any image with Python and torch: CUDA PyTorch by default, an NGC image, or the Debian CPU base
# of build-image.sh --base debian.
ARG BASE_IMAGE=pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PREFECT_HOME=/tmp/prefect \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    MPLCONFIGDIR=/tmp/matplotlib

# uid/gid 10001: the pools' pod securityContext (runAsUser, fsGroup) uses the same numbers,
# which makes the shared volume writable for it.
RUN groupadd --gid 10001 ctdiff \
    && useradd --no-log-init --create-home --uid 10001 --gid 10001 ctdiff

WORKDIR /opt/ctdiff
# Dependencies first, from pyproject.toml alone, so that a change to the code reuses this layer.
# The constraint keeps the base's torch: pip must not swap in another build to satisfy a
# dependency. It is the version pip sees (package metadata: 2.13.0), not torch.__version__
# (2.13.0+cu130), which pip cannot resolve.
COPY pyproject.toml ./
RUN python -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" > /tmp/torch-constraint.txt \
    && python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['k8s'] + p['optional-dependencies']['docker']))" \
        > /tmp/requirements.txt \
    && pip install --constraint /tmp/torch-constraint.txt --requirement /tmp/requirements.txt \
    && rm -f /tmp/requirements.txt
COPY README.md ./
COPY ctdiff ctdiff
COPY tasks tasks
COPY flows flows
COPY deployments deployments
RUN pip install --no-deps --constraint /tmp/torch-constraint.txt . \
    && rm -rf /tmp/torch-constraint.txt build ./*.egg-info
COPY config config
COPY prefect.yaml ./
# The mount point of the data volume, owned by the image's user: a new Docker named volume takes
# this ownership, so the Docker pool's default volume is writable without a chown.
RUN install -d -o 10001 -g 10001 /opt/ctdiff/data
# A container is one command: Prefect's temporary per-run server, not a background one
# (flows/local_server.py). Pools set PREFECT_API_URL, which wins anyway.
ENV CTDIFF_SERVER=embedded

# Numeric, so Kubernetes can check runAsNonRoot against it.
USER 10001:10001
