#!/usr/bin/env bash
# The project's test command: sets up .venv (with the test extras) on first use, then runs pytest.
#   ./test.sh [pytest args]
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
"$root/scripts/bootstrap.sh" test
venv=${DINOSEG_VENV:-$root/.venv}
cd "$root"
exec "$venv/bin/python" -m pytest "$@"
