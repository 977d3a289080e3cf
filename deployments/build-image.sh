#!/usr/bin/env bash
# Build ctdiff's image (the Dockerfile at the project root) and print its size and torch/CUDA:
#
#   deployments/build-image.sh [--base debian|IMAGE] [--wheels DIR] [--torch VERSION] [--mirror URL] [TAG]
#
#   (no --base)     the Dockerfile's default base: CUDA PyTorch, for GPU pools
#   --base IMAGE    any image with Python and torch, e.g. an NGC PyTorch image
#   --base debian   a CPU base made here from Debian's packages, for machines that reach no image
#                   registry: debootstrap (as root) makes a Debian root filesystem from the
#                   mirror of this host's apt sources (or --mirror) with a venv holding
#                   torch==VERSION (default 2.13.0) from the Python registry, and `docker import`
#                   loads it; --wheels DIR lets pip take wheels from DIR first (e.g. a CPU torch
#                   wheel, where the registry's default build is the multi-GB CUDA one).
#                   The base is built once and reused (--rebuild-base to make it again).
#
# TAG defaults to ctdiff:<version in pyproject.toml>. Builds use the host's network (--network
# host) and the classic builder or BuildKit alike; nothing is pulled from Docker Hub with
# --base debian.
set -euo pipefail
cd "$(dirname "$0")/.."

base="" wheels="" torch_version="2.13.0" mirror="" rebuild_base=0 tag=""
while [ $# -gt 0 ]; do
    case "$1" in
        --base) base="$2"; shift 2 ;;
        --wheels) wheels="$2"; shift 2 ;;
        --torch) torch_version="$2"; shift 2 ;;
        --mirror) mirror="$2"; shift 2 ;;
        --rebuild-base) rebuild_base=1; shift ;;
        -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "build-image.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) tag="$1"; shift ;;
    esac
done
version="$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -n 1)"
tag="${tag:-ctdiff:$version}"

docker info >/dev/null 2>&1 || { echo "build-image.sh: no Docker daemon answers (docker info)" >&2; exit 1; }

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

debian_mirror() {
    # The first Debian mirror this host's apt uses (deb822 .sources files, then sources.list).
    local found
    found="$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)"
    [ -n "$found" ] || found="$(awk '$1 == "deb" {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)"
    echo "$found"
}

build_debian_base() {
    # One layer: the Debian root filesystem with a venv at /opt/venv holding torch, installed
    # in a chroot before `docker import` (a wheel copied in by a Dockerfile would stay in a layer).
    local base_image="ctdiff-base:debian-torch$torch_version"
    if image_exists "$base_image" && [ "$rebuild_base" = 0 ]; then
        echo "base: $base_image (built before; --rebuild-base to make it again)" >&2
        base="$base_image"
        return
    fi
    [ "$(id -u)" = 0 ] || { echo "build-image.sh: --base debian runs debootstrap and chroot, which need root" >&2; exit 1; }
    command -v debootstrap >/dev/null || { echo "build-image.sh: --base debian needs debootstrap (apt-get install debootstrap)" >&2; exit 1; }
    mirror="${mirror:-$(debian_mirror)}"
    [ -n "$mirror" ] || { echo "build-image.sh: no Debian mirror in this host's apt sources; pass --mirror URL" >&2; exit 1; }
    rootfs="$(mktemp -d /var/tmp/ctdiff-rootfs.XXXXXX)"
    trap 'rm -rf "$rootfs"' EXIT
    echo "base: debootstrap bookworm from $mirror ..." >&2
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" "$mirror" >&2
    # The host's CA bundle and resolver: pip in the chroot, and in the image's build, then reach
    # the Python registry as the host does.
    cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
    cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
    mkdir "$rootfs/tmp/wheels"
    if [ -n "$wheels" ]; then
        find "$wheels" -maxdepth 1 -name 'torch-*.whl' -exec cp {} "$rootfs/tmp/wheels/" \;
    fi
    echo "base: venv with torch==$torch_version ..." >&2
    chroot "$rootfs" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
        PIP_CERT=/etc/ssl/certs/ca-certificates.crt PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
        sh -c "python3 -m venv /opt/venv && /opt/venv/bin/pip install -q --find-links /tmp/wheels 'torch==$torch_version'" >&2
    rm -rf "$rootfs"/tmp/wheels "$rootfs"/root/.cache "$rootfs"/var/cache/apt/archives/*.deb \
        "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/locale/*
    : > "$rootfs/etc/resolv.conf"  # a container gets its own
    # pip's own certificate bundle would not know a site's proxy CA; Debian's (with the host's) does.
    tar -C "$rootfs" -c . | docker import \
        --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
        --change 'CMD ["python3"]' - "$base_image" >/dev/null
    rm -rf "$rootfs"
    trap - EXIT
    base="$base_image"
}

if [ "$base" = debian ]; then
    build_debian_base
fi

build_args=()
[ -n "$base" ] && build_args+=(--build-arg "BASE_IMAGE=$base")
echo "image: $tag${base:+ on $base} ..." >&2
docker build --network host "${build_args[@]}" -t "$tag" . >&2

size_mb=$(( $(docker image inspect -f '{{.Size}}' "$tag") / 1000000 ))
versions="$(docker run --rm --network host --entrypoint python "$tag" -c \
    "import torch; print(f'torch {torch.__version__}, CUDA {torch.version.cuda or \"none (CPU build)\"}')")"
echo "$tag: ${size_mb} MB; $versions"
