#!/usr/bin/env bash
# A profile-guided build of sluice-proxy: an instrumented release build serves the
# bench's own load (run.sh's plain route and full governance stack, HTTP/1.1 and HTTP/2),
# its counters are merged, and the release build is made again with them, so that the
# compiler lays out and inlines the request path the way requests take it.
#
#   examples/bench/pgo.sh            # prints the optimised binary's path at the end
#   BASELINE_BIN=target/release/sluice-proxy PROXY_BIN=target/pgo-use/release/sluice-proxy \
#       SYSTEMS="sluice-full sluice-full-base" examples/bench/count.sh   # then compare
#
# Each build is a full release build (fat LTO) in a target directory of its own
# (target/pgo-gen, target/pgo-use), as RUSTFLAGS differ: on two cores, about 15 to 20
# minutes each. Needs the `llvm-tools` rustup component (llvm-profdata of rustc's LLVM);
# it is added if missing.
#
# Knobs: DURATION (5, seconds per load in the training run)  PGO_DIR (target/pgo)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# Absolute, as cargo reads a relative CARGO_TARGET_DIR from the caller's directory.
TARGET_DIR=$(realpath -m "${CARGO_TARGET_DIR:-$REPO/target}")
PGO_DIR=${PGO_DIR:-$TARGET_DIR/pgo}
DURATION=${DURATION:-5}
export PATH="$HOME/.cargo/bin:$PATH"

log() { printf '== %s\n' "$*" >&2; }

sysroot=$(rustc --print sysroot)
host=$(rustc -vV | sed -n 's/^host: //p')
PROFDATA=$sysroot/lib/rustlib/$host/bin/llvm-profdata
if [ ! -x "$PROFDATA" ]; then
    rustup component add llvm-tools
fi

# The bench upstream and plot come from the ordinary release build (built as run.sh
# builds them: together with the proxy, so that features unify the same way).
if [ ! -x "$TARGET_DIR/release/bench-upstream" ] || [ ! -x "$TARGET_DIR/release/bench-plot" ]; then
    (cd "$REPO" && cargo build --release -p sluice-proxy -p sluice-bench)
fi

log "instrumented build (target/pgo-gen)"
mkdir -p "$PGO_DIR/raw"
(cd "$REPO" && RUSTFLAGS="-Cprofile-generate=$PGO_DIR/raw" CARGO_TARGET_DIR="$TARGET_DIR/pgo-gen" \
    cargo build --release -p sluice-proxy)

log "training: run.sh's sluice and sluice-full paths, fixed rate and maximum, both protocols"
rm -f "$PGO_DIR"/raw/*.profraw
QUICK=1 ROUNDS=1 DURATION="$DURATION" RATES=5000 TESTS="5000 max" SYSTEMS="sluice sluice-full" \
    SKIP_BUILD=1 PROXY_BIN="$TARGET_DIR/pgo-gen/release/sluice-proxy" \
    OUT_DIR="$PGO_DIR/training" RECORD=0 "$REPO/examples/bench/run.sh"
ls "$PGO_DIR"/raw/*.profraw >/dev/null
"$PROFDATA" merge -o "$PGO_DIR/merged.profdata" "$PGO_DIR"/raw/*.profraw

log "optimised build with the profile (target/pgo-use)"
# Cargo does not see a new profile behind the same flags: build afresh, or the link
# would keep code optimised for the previous one.
rm -rf "$TARGET_DIR/pgo-use/release"
(cd "$REPO" && RUSTFLAGS="-Cprofile-use=$PGO_DIR/merged.profdata" \
    CARGO_TARGET_DIR="$TARGET_DIR/pgo-use" cargo build --release -p sluice-proxy)
echo "$TARGET_DIR/pgo-use/release/sluice-proxy"
