#!/usr/bin/env bash
# `make mutants`: mutation testing (cargo-mutants) of the modules where a wrong line is a
# security or correctness bug, one module at a time, each against only the unit tests that
# exercise it. Installs cargo-mutants (crates.io, `cargo install --locked`) when missing.
#
#   scripts/mutants.sh                      # every module below, fastest first
#   scripts/mutants.sh identity authz       # only these modules (make mutants MODULES="identity authz")
#   MUTANTS_TIMEOUT=120 scripts/mutants.sh  # seconds one mutant's tests may take (default 60)
#   ITERATE=1 scripts/mutants.sh table      # retest only what the last run of table did not catch
#
# Modules, in the order run (name: file, tests run for each mutant):
#   verified:  src/verified.rs          cargo test --lib verified::
#   identity:  src/identity.rs          cargo test --lib identity::
#   selectors: src/config/selectors.rs  cargo test --lib config::
#   authz:     src/authz.rs             cargo test --lib authz::
#   ratelimit: src/ratelimit.rs         cargo test --lib ratelimit::
#   admission: src/admission.rs         cargo test --lib admission::
#   table:     src/table.rs             cargo test --lib table::
#   health:    src/health.rs            cargo test --lib health::
#   validate:  src/config/validate.rs   cargo test --lib config::
# Output: target/mutants/MODULE/mutants.out/ (caught.txt, missed.txt, unviable.txt,
# timeout.txt, outcomes.json). Builds go to target/mutants/build (CARGO_TARGET_DIR), kept
# between runs so only lclb itself is rebuilt. The unmutated baseline is skipped (run the unit
# tests first: a failing test would count every mutant as caught). Prints one line per module,
# "MODULE: N caught, N missed, N unviable, N timeout", and exits 1 if any mutant was missed or
# timed out. Runs under nice, one mutant at a time (-j 1).
set -euo pipefail
# shellcheck source=scripts/lib/common.sh
source "$(dirname "$0")/lib/common.sh"
help_if_asked "$@"
cd "$REPO_ROOT"

declare -A FILE=(
  [verified]=src/verified.rs
  [identity]=src/identity.rs
  [selectors]=src/config/selectors.rs
  [authz]=src/authz.rs
  [ratelimit]=src/ratelimit.rs
  [admission]=src/admission.rs
  [table]=src/table.rs
  [health]=src/health.rs
  [validate]=src/config/validate.rs
)
declare -A FILTER=(
  [verified]=verified::
  [identity]=identity::
  [selectors]=config::
  [authz]=authz::
  [ratelimit]=ratelimit::
  [admission]=admission::
  [table]=table::
  [health]=health::
  [validate]=config::
)
ORDER=(verified identity selectors authz ratelimit admission table health validate)
TIMEOUT=${MUTANTS_TIMEOUT:-60}

modules=("$@")
((${#modules[@]})) || modules=("${ORDER[@]}")
for m in "${modules[@]}"; do
  [[ -n "${FILE[$m]:-}" ]] || die "unknown module '$m' (one of: ${ORDER[*]})"
done

if ! cargo mutants --version >/dev/null 2>&1; then
  echo "cargo-mutants is missing: installing it (cargo install --locked cargo-mutants)"
  nice cargo install --locked cargo-mutants
fi

export CARGO_TARGET_DIR="$REPO_ROOT/target/mutants/build"
# No debug info: each mutant relinks the lib test binary, and a smaller binary links faster.
export CARGO_PROFILE_DEV_DEBUG=0
count() { if [[ -f "$1" ]]; then grep -c . "$1" || true; else echo 0; fi; }
failed=0 summary=()
for m in "${modules[@]}"; do
  out="target/mutants/$m"
  mkdir -p "$out"
  echo "== $m: ${FILE[$m]}, cargo test --lib ${FILTER[$m]}"
  # Exit status 2 (missed) and 3 (timeout) are read from the files below.
  status=0
  # --cargo-arg=--lib: the build of each mutant is then the lib test binary alone, not the
  # binary and every integration test (three times the build time, and none of them is run).
  nice cargo mutants --file "${FILE[$m]}" --output "$out" --baseline skip \
    --timeout "$TIMEOUT" --jobs 1 --no-shuffle --cargo-arg=--lib ${ITERATE:+--iterate} \
    -- "${FILTER[$m]}" || status=$?
  case $status in 0 | 2 | 3) ;; *) die "cargo mutants failed on $m (exit $status)" ;; esac
  d="$out/mutants.out"
  line="$m: $(count "$d/caught.txt") caught, $(count "$d/missed.txt") missed, $(count "$d/unviable.txt") unviable, $(count "$d/timeout.txt") timeout"
  summary+=("$line")
  ((status == 0)) || failed=1
done
printf '%s\n' "${summary[@]}"
exit "$failed"
