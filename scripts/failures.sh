#!/usr/bin/env bash
# Runs a command (a go test run), its output passed through as it comes, and,
# when it fails, says again at the end which tests failed and why (testify's
# error blocks, with the test and the line that failed). CI keeps
# only a part of a long log; this puts the reasons where that part is.
set -uo pipefail
log=$(mktemp "${TMPDIR:-/tmp}/qmigrate-test-log.XXXXXX")
trap 'rm -f "$log"' EXIT
"$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
if [ "$rc" -ne 0 ]; then
	echo
	echo "== failures again (exit $rc): $*"
	grep -E -- '--- FAIL|^(FAIL|panic:)|timed out' "$log" | head -40
	# testify's blocks: Error Trace to Test/Messages, 12 lines at most each.
	grep -E -A12 -- 'Error Trace:' "$log" | cut -c1-400 | head -150
fi
exit "$rc"
