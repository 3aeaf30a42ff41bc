#!/usr/bin/env bash
# `make static`: a statically linked, stripped lclb for Linux (musl libc), to copy to any Linux
# machine of the same architecture, or into a FROM scratch image; and the demo upstream
# (examples/upstream.rs) built the same way, for the demo image (make docker-build).
#
#   scripts/build-static.sh                 # target: <this machine's arch>-unknown-linux-musl
#   TARGET=x86_64-unknown-linux-musl scripts/build-static.sh
#
# Needs: the Rust target (installed with `rustup target add` if missing) and a C compiler for
# musl, since aws-lc-sys (rustls' crypto provider) compiles C: Debian's musl-tools provides
# musl-gcc (installed with apt-get when missing and run as root). aws-lc-sys ships generated
# bindings and its own cc-based build for x86_64/aarch64 musl: neither cmake, bindgen nor nasm
# is needed.
set -euo pipefail

# shellcheck source=scripts/lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
help_if_asked "$@"

cd "$REPO_ROOT"

TARGET=${TARGET:-$(uname -m)-unknown-linux-musl}

if ! command -v rustup >/dev/null 2>&1; then
  die "rustup is needed to add the $TARGET target"
fi
if ! rustup target list --installed | grep -qx "$TARGET"; then
  echo "adding the Rust target $TARGET"
  rustup target add "$TARGET"
fi
if ! command -v musl-gcc >/dev/null 2>&1; then
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "installing musl-tools (musl-gcc)"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq musl-tools
  else
    die "musl-gcc is missing: install Debian's musl-tools (sudo apt-get install musl-tools)"
  fi
fi

# The C compiler for the target, as cc-rs (used by aws-lc-sys) reads it: CC_<target>.
cc_var="CC_${TARGET//-/_}"
export "$cc_var=${!cc_var:-musl-gcc}"
echo "building lclb and the demo upstream for $TARGET ($cc_var=${!cc_var})"
cargo build --release --locked --target "$TARGET" --bin lclb --example upstream

target_dir=${CARGO_TARGET_DIR:-$REPO_ROOT/target}
status=0

# check_static BIN ARGS...: strips BIN, checks with file and ldd that it is static and that it
# runs (BIN ARGS... must exit 0).
check_static() {
  local bin=$1 kind linkage
  shift
  strip "$bin"
  kind=$(file -b "$bin" 2>/dev/null || echo "unknown (the file command is missing)")
  linkage=$(ldd "$bin" 2>&1 || true)
  if [[ "$kind" == *"statically linked"* || "$kind" == *"static-pie linked"* ]]; then
    echo "file: $kind"
  else
    echo "error: file says $bin is not static: $kind" >&2
    status=1
  fi
  if [[ "$linkage" == *"not a dynamic executable"* || "$linkage" == *"statically linked"* ]]; then
    echo "ldd:  $linkage"
  else
    echo "error: ldd lists shared libraries of $bin:" >&2
    echo "$linkage" >&2
    status=1
  fi
  "$bin" "$@" >/dev/null || {
    echo "error: $bin does not run ($bin $*)" >&2
    status=1
  }
  echo "static binary: $bin ($(du -h "$bin" | cut -f1), $(stat -c %s "$bin") bytes)"
}

check_static "$target_dir/$TARGET/release/lclb" --version
check_static "$target_dir/$TARGET/release/examples/upstream" --help
exit $status
