#!/usr/bin/env bash
# Create ctdiff's work pools on the Prefect server that PREFECT_API_URL names, then deploy every
# flow in prefect.yaml:
#
#   PREFECT_API_URL=http://127.0.0.1:4200/api deployments/setup.sh [VARIABLE=VALUE ...]
#
# ctdiff-gpu and ctdiff-cpu are Kubernetes pools made from deployments/{gpu,cpu}-job-template.json;
# VARIABLE=VALUE sets a default of both (e.g. image=registry.example.com/ctdiff:0.1.0, see
# deployments/pool_template.py). ctdiff-docker is a Docker pool (deployments/docker-job-template.json)
# for one GPU server: docker.VARIABLE=VALUE sets its defaults (e.g. docker.data_volume=/srv/ctdiff).
# ctdiff-local is a `process` pool for a worker on this machine.
# Re-running replaces the pools' templates and updates the deployments: the files here are the
# source of truth, so edits made in the UI are overwritten.
#
# Run it with the project's environment active (`prefect deploy` imports every flow).
set -euo pipefail
cd "$(dirname "$0")/.."

: "${PREFECT_API_URL:?names the Prefect server to set up, e.g. export PREFECT_API_URL=http://127.0.0.1:4200/api}"
PYTHON="${PYTHON:-python}"

templates="$(mktemp -d)"
trap 'rm -rf "$templates"' EXIT

kubernetes_defaults=() docker_defaults=()
for assignment in "$@"; do
    case "$assignment" in
        docker.*) docker_defaults+=("${assignment#docker.}") ;;
        *) kubernetes_defaults+=("$assignment") ;;
    esac
done

echo "Prefect server: $PREFECT_API_URL"
for kind in gpu cpu; do
    "$PYTHON" -m deployments.pool_template "deployments/$kind-job-template.json" ${kubernetes_defaults[@]+"${kubernetes_defaults[@]}"} \
        > "$templates/$kind.json"
    prefect work-pool create "ctdiff-$kind" --type kubernetes \
        --base-job-template "$templates/$kind.json" --overwrite
done
"$PYTHON" -m deployments.pool_template deployments/docker-job-template.json ${docker_defaults[@]+"${docker_defaults[@]}"} \
    > "$templates/docker.json"
prefect work-pool create ctdiff-docker --type docker --base-job-template "$templates/docker.json" --overwrite
prefect work-pool create ctdiff-local --type process --overwrite

# Non-interactive: every deployment's pull steps and parameters come from prefect.yaml.
prefect deploy --all --no-prompt
