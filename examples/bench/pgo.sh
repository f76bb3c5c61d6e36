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
# With BOLT=1 the optimised binary is then laid out again after linking by LLVM's BOLT
# (as rustc's own Linux builds are): the profile-guided build is linked keeping its
# relocations, an instrumented copy of it serves the same training load, and BOLT orders
# the functions and blocks the requests ran next to each other and moves the rest out of
# the way (target/pgo-use/release/sluice-proxy-bolt, line tables rewritten to match). No
# rebuild: the instrumented run and the layout take a few minutes. Debian's `bolt-15` is
# installed when no `llvm-bolt` is found. Off by default, and release images do not use
# it: against the profile-guided build alone it read 0.94x the user-space CPU per
# HTTP/1.1 request in two sets of paired rounds, but no difference in CPU per request or
# throughput that the rounds' noise lets through (BENCHMARKS.md, "A post-link layout").
#
# Knobs: DURATION (5, seconds per load in the training run)  PGO_DIR (target/pgo)
#   BOLT (0; 1 adds the post-link layout)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# Absolute, as cargo reads a relative CARGO_TARGET_DIR from the caller's directory.
TARGET_DIR=$(realpath -m "${CARGO_TARGET_DIR:-$REPO/target}")
PGO_DIR=${PGO_DIR:-$TARGET_DIR/pgo}
DURATION=${DURATION:-5}
BOLT=${BOLT:-0}
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

# train BINARY: run.sh's sluice and sluice-full paths, fixed rate and maximum, both
# protocols; the binary writes its profile as each proxy exits (the BOLT copy: every second).
train() {
    QUICK=1 ROUNDS=1 DURATION="$DURATION" RATES=5000 TESTS="5000 max" SYSTEMS="sluice sluice-full" \
        SKIP_BUILD=1 PROXY_BIN="$1" OUT_DIR="$PGO_DIR/training" RECORD=0 \
        "$REPO/examples/bench/run.sh"
}

log "training: run.sh's sluice and sluice-full paths, fixed rate and maximum, both protocols"
rm -f "$PGO_DIR"/raw/*.profraw
train "$TARGET_DIR/pgo-gen/release/sluice-proxy"
ls "$PGO_DIR"/raw/*.profraw >/dev/null
"$PROFDATA" merge -o "$PGO_DIR/merged.profdata" "$PGO_DIR"/raw/*.profraw

log "optimised build with the profile (target/pgo-use)"
# Cargo does not see a new profile behind the same flags: build afresh, or the link
# would keep code optimised for the previous one.
rm -rf "$TARGET_DIR/pgo-use/release"
use_flags="-Cprofile-use=$PGO_DIR/merged.profdata"
# BOLT moves functions only in a binary that kept its relocations; the code is the same.
[ "$BOLT" = 1 ] && use_flags="$use_flags -Clink-arg=-Wl,--emit-relocs"
(cd "$REPO" && RUSTFLAGS="$use_flags" \
    CARGO_TARGET_DIR="$TARGET_DIR/pgo-use" cargo build --release -p sluice-proxy)
USE_BIN=$TARGET_DIR/pgo-use/release/sluice-proxy
if [ "$BOLT" != 1 ]; then
    echo "$USE_BIN"
    exit 0
fi

BOLT_BIN=$(command -v llvm-bolt || ls /usr/lib/llvm-*/bin/llvm-bolt 2>/dev/null | sort -V | tail -1 || true)
if [ -z "$BOLT_BIN" ]; then
    log "installing bolt-15"
    if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq bolt-15 >/dev/null
    BOLT_BIN=/usr/lib/llvm-15/bin/llvm-bolt
fi
MERGE_FDATA=$(dirname "$BOLT_BIN")/merge-fdata

log "BOLT: instrumented copy of the profile-guided build"
rm -rf "$PGO_DIR/bolt"
mkdir -p "$PGO_DIR/bolt"
# One profile per process (run.sh starts a proxy per path), merged below. Written every
# second, whole each time, by the runtime's watcher process: BOLT 15's own dump at exit
# crashes in this binary (the instrumented copy ends with SIGSEGV after its last write;
# the laid-out binary carries no runtime and exits cleanly).
"$BOLT_BIN" "$USE_BIN" -instrument -instrumentation-file="$PGO_DIR/bolt/prof" \
    -instrumentation-file-append-pid -instrumentation-sleep-time=1 \
    -instrumentation-no-counters-clear \
    -o "$PGO_DIR/sluice-proxy-instrumented" >"$PGO_DIR/bolt.log" 2>&1 \
    || { cat "$PGO_DIR/bolt.log" >&2; exit 1; }
log "BOLT: training the instrumented copy"
train "$PGO_DIR/sluice-proxy-instrumented"
# The watchers outlive their proxies by up to a second, writing: read only after them.
for _ in $(seq 50); do
    pgrep -f sluice-proxy-instrumented >/dev/null || break
    sleep 0.2
done
"$MERGE_FDATA" "$PGO_DIR"/bolt/prof.* >"$PGO_DIR/merged.fdata" 2>>"$PGO_DIR/bolt.log"
[ -s "$PGO_DIR/merged.fdata" ] || { echo "BOLT: the training wrote no profile" >&2; exit 1; }

log "BOLT: laying out target/pgo-use/release/sluice-proxy-bolt"
# ext-tsp orders each function's blocks by the branches taken, hfsort+ the functions by
# who calls whom; the cold blocks go to a section of their own; identical functions
# (monomorphised copies) are folded; calls into libc (memcpy) skip the PLT (the binary
# is linked with BIND_NOW, as rustc links by default).
"$BOLT_BIN" "$USE_BIN" -o "$USE_BIN-bolt" -data="$PGO_DIR/merged.fdata" \
    -reorder-blocks=ext-tsp -reorder-functions=hfsort+ -split-functions -split-all-cold \
    -split-eh -icf=1 -plt=hot -use-gnu-stack -update-debug-sections -dyno-stats >>"$PGO_DIR/bolt.log" 2>&1 \
    || { cat "$PGO_DIR/bolt.log" >&2; exit 1; }
echo "$USE_BIN-bolt"
