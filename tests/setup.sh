#!/usr/bin/env bash
# What `cargo test --workspace` needs beyond Rust, installed once (re-running changes
# nothing): iptables, iproute2 and util-linux's setpriv for the network-namespace tests
# (tests/tests/e2e/{init_netns,transparent,pods}.rs, run as root), kubectl for
# `kubectl patch --local` in control-plane/tests/inject.rs (Debian's kubernetes-client
# where no `kubectl` package is configured), a Python venv with the Helm engine for
# the chart tests (control-plane/tests/chart.rs, charts/check.py), and a test venv with
# kosoku for the Autobahn WebSocket cases (tests/src/autobahn.rs), Chromium with its
# WebDriver for the admin pages (tests/tests/e2e/admin_pages.rs), and redis-server for
# the fleet rate-limit tests (tests/tests/e2e/fleet_limits.rs; the harness starts one per
# test on an ephemeral port).
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v iptables >/dev/null || missing+=(iptables)
command -v ip >/dev/null || missing+=(iproute2)
command -v setpriv >/dev/null || missing+=(util-linux)
command -v kubectl >/dev/null || missing+=(kubectl)
# the admin pages driven in headless Chromium (tests/tests/e2e/admin_pages.rs)
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
command -v redis-server >/dev/null || missing+=(redis-server)
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

# A venv is rebuilt only when its requirements file changed.
make_venv() {
  local venv=$1 reqs=$2
  if ! cmp -s "$reqs" "$venv/requirements.txt"; then
    rm -rf "$venv"
    python3 -m venv "$venv" || {
      apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null && python3 -m venv "$venv"
    }
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$reqs"
    cp "$reqs" "$venv/requirements.txt"
  fi
}

CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/sluice-ci"
# chart.rs finds this one; autobahn.rs finds the test venv's kosoku.
VENV="$CACHE/venv"
make_venv "$VENV" charts/requirements.txt
make_venv "$CACHE/test-venv" tests/requirements.txt
echo "tests/setup.sh: ready (venvs: $VENV, $CACHE/test-venv)"
