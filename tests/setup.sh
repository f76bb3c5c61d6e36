#!/usr/bin/env bash
# What `cargo test --workspace` needs beyond Rust, installed once (re-running changes
# nothing): iptables, iproute2 and util-linux's setpriv for the network-namespace tests
# (tests/tests/e2e/{init_netns,transparent,pods}.rs, run as root), kubectl for
# `kubectl patch --local` in control-plane/tests/inject.rs (Debian's kubernetes-client
# where no `kubectl` package is configured), and a Python venv with the Helm engine for
# the chart tests (control-plane/tests/chart.rs, charts/check.py).
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v iptables >/dev/null || missing+=(iptables)
command -v ip >/dev/null || missing+=(iproute2)
command -v setpriv >/dev/null || missing+=(util-linux)
command -v kubectl >/dev/null || missing+=(kubectl)
if ((${#missing[@]})); then
  if [ "$(id -u)" -ne 0 ]; then
    echo "tests/setup.sh: missing ${missing[*]}; install them as root (apt-get install -y ${missing[*]})" >&2
    exit 1
  fi
  apt-get update -qq
  # `kubectl` is a package only where a Kubernetes or cloud SDK repository is
  # configured; Debian itself ships it as kubernetes-client.
  if [[ " ${missing[*]} " == *" kubectl "* ]] && ! apt-cache show kubectl >/dev/null 2>&1; then
    missing=("${missing[@]/kubectl/kubernetes-client}")
  fi
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# The venv is reused while charts/requirements.txt is unchanged; chart.rs finds it here.
VENV="${XDG_CACHE_HOME:-$HOME/.cache}/sluice-ci/venv"
if ! cmp -s charts/requirements.txt "$VENV/requirements.txt"; then
  rm -rf "$VENV"
  python3 -m venv "$VENV" || {
    apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null && python3 -m venv "$VENV"
  }
  "$VENV/bin/pip" install --quiet --disable-pip-version-check -r charts/requirements.txt
  cp charts/requirements.txt "$VENV/requirements.txt"
fi
echo "tests/setup.sh: ready (venv: $VENV)"
