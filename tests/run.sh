#!/usr/bin/env bash
# Runs wharf's whole test suite: unit tests, in-process integration tests
# against a fake upstream, and end-to-end tests with the real programs
# (distribution registry, containerd/ctr, dockerd, skopeo, a moto S3 server).
# Installs the Debian packages it needs first (as root, or through sudo).
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(docker-registry containerd docker.io skopeo openssl apache2-utils ca-certificates python3-yaml procps util-linux)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  echo "installing: ${missing[*]}"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}"
fi

# moto: a real S3-compatible server for the fleet tests (tests/fleet.rs).
if ! python3 -c 'import moto.server' 2>/dev/null; then
  echo "installing: moto[server] (PyPI)"
  python3 -m pip install -q 'moto[server]'
fi

cargo test --release "$@"
