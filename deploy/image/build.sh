#!/bin/bash
# `make image`: build deploy/Dockerfile with buildah and tag it as the Kubernetes
# manifests name it (deploy/k8s/base/kustomization.yaml, `images:` entry "penaltyd":
# newName:newTag, e.g. registry.example.com/penaltyd:0.1.0).
#
#   deploy/image/build.sh            # on BASE_IMAGE (default the local Debian stand-in)
#   BASE_IMAGE=python:3.11-slim-bookworm deploy/image/build.sh   # where a registry is reachable
#
# Runs from the repository root, as root (buildah's storage in /var/lib/containers).
# RUN steps use --isolation chroot (no user namespace or rlimit changes are needed, which
# this kind of sandbox refuses) and the host's network (pip reaches PyPI). The host's CA
# bundle (HOST_CA; empty: none) is mounted over the build containers' for those steps
# only, so a TLS-inspecting proxy the host trusts is trusted by pip too; it is not part of
# any layer.
set -euo pipefail
cd "$(dirname "$0")/../.."

BASE_IMAGE=${BASE_IMAGE:-localhost/penaltyd-base:bookworm}
HOST_CA=${HOST_CA-/etc/ssl/certs/ca-certificates.crt}
PY=${PY:-.venv/bin/python}
IMAGE=$("$PY" - <<'PYEOF'
import yaml
spec = yaml.safe_load(open("deploy/k8s/base/kustomization.yaml"))
entry = next(i for i in spec["images"] if i["name"] == "penaltyd")
print(f"{entry['newName']}:{entry['newTag']}")
PYEOF
)
VERSION=$("$PY" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')

command -v buildah >/dev/null || { echo "build.sh: buildah is missing (make image installs it)" >&2; exit 1; }
buildah inspect --type image "$BASE_IMAGE" >/dev/null 2>&1 || case "$BASE_IMAGE" in
  localhost/*) echo "build.sh: no local image $BASE_IMAGE: run make image-base" >&2; exit 1 ;;
esac

volumes=()
[ -z "$HOST_CA" ] || [ ! -r "$HOST_CA" ] || volumes=(--volume "$HOST_CA:/etc/ssl/certs/ca-certificates.crt:ro")

start=$SECONDS
echo "image: building deploy/Dockerfile FROM $BASE_IMAGE as $IMAGE"
buildah bud --quiet --isolation chroot --layers --force-rm \
  --file deploy/Dockerfile --ignorefile deploy/Dockerfile.dockerignore \
  --build-arg PYTHON_IMAGE="$BASE_IMAGE" "${volumes[@]}" \
  --label org.opencontainers.image.version="$VERSION" \
  --label org.opencontainers.image.base.name="$BASE_IMAGE" \
  --tag "$IMAGE" --tag "localhost/penaltyd:$VERSION" . >/dev/null
size=$(buildah inspect --type image --format '{{.Docker.Size}}' "$IMAGE" 2>/dev/null || true)
echo "image: $IMAGE (also localhost/penaltyd:$VERSION) in $((SECONDS - start)) s"
buildah images --noheading --format '{{.Name}}:{{.Tag}} {{.ID}} {{.Size}}' "$IMAGE" 2>/dev/null || true
