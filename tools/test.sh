#!/usr/bin/env bash
# Run the whole test suite: lint, type check, then every test (unit, integration, system, slow).
# Prints line + branch coverage of flux_edge/ (tests/ run the daemon as a subprocess too: those
# runs are not traced, so the figure counts what in-process tests reach).
# Extra arguments go to pytest, e.g. `tools/test.sh -m "not slow" -x` for a fast iteration loop.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh >/dev/null
echo "test: ruff"
.venv/bin/ruff check flux_edge tests bench
echo "test: mypy --strict flux_edge"
.venv/bin/mypy
echo "test: pytest"
set +e
.venv/bin/python -m pytest --cov --cov-report=term --durations=40 "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "test: pytest collected no tests: that is a failure" >&2
  exit 1
fi
exit "$rc"
