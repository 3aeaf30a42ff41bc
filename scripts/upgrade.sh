#!/usr/bin/env bash
# Upgrades the running lclb OLD_PID to NEW_BINARY with CONFIG, without refusing or resetting a
# connection.
#
#   scripts/upgrade.sh OLD_PID NEW_BINARY CONFIG
#   UPGRADE_TIMEOUT=60 scripts/upgrade.sh "$(pidof lclb)" /usr/local/bin/lclb /etc/lclb/lclb.toml
#
# Checks CONFIG with NEW_BINARY --check-config first. Then asks OLD_PID (through
# `NEW_BINARY upgrade`) to start NEW_BINARY --config CONFIG on its own listening sockets, the
# very sockets it accepts on, so no connection waiting in their queue is lost. Once the new
# process is ready, the old one stops accepting, finishes the connections it has (up to its
# limits.drain_timeout) and exits 0; the new one is its child, logs where it logged, and, under
# systemd, becomes the service's main process. Prints "upgraded: new lclb PID NEW_PID" and exits
# 0. If the new process exits or is not ready within UPGRADE_TIMEOUT seconds (default 30), it
# is stopped, OLD_PID keeps serving as before, and the script exits 1 saying why.
# WAIT_OLD=1 also waits (up to the old one's drain) for OLD_PID to exit before returning.
set -euo pipefail

# shellcheck source=scripts/lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
help_if_asked "$@"

if (($# != 3)); then
  script_help "$0" >&2
  exit 2
fi
old_pid=$1 new_binary=$2 config=$3
timeout=${UPGRADE_TIMEOUT:-30}

[[ "$old_pid" =~ ^[0-9]+$ ]] || die "OLD_PID '$old_pid' is not a pid"
kill -0 "$old_pid" 2>/dev/null || die "no process $old_pid (or not ours to signal)"
[[ -x "$new_binary" ]] || die "NEW_BINARY '$new_binary' is not an executable file"
[[ -r "$config" ]] || die "CONFIG '$config' cannot be read"
[[ "$timeout" =~ ^[0-9]+$ ]] || die "UPGRADE_TIMEOUT '$timeout' is not a number of seconds"

"$new_binary" --check-config --config "$config" >/dev/null ||
  die "$new_binary refuses $config (see above); process $old_pid keeps serving"

new_binary=$(realpath "$new_binary")
if ! new_pid=$("$new_binary" upgrade --pid "$old_pid" --config "$config" \
  --binary "$new_binary" --timeout "${timeout}s"); then
  die "upgrade failed (see above); process $old_pid keeps serving"
fi
echo "upgraded: new lclb PID $new_pid (process $old_pid drains and exits)"

if [[ "${WAIT_OLD:-0}" == 1 ]]; then
  # An exited process its parent has not reaped yet (state Z) is gone too.
  while kill -0 "$old_pid" 2>/dev/null && [[ "$(ps -o stat= -p "$old_pid" 2>/dev/null)" != Z* ]]; do
    sleep 0.1
  done
  echo "process $old_pid has exited"
fi
