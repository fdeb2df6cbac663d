#!/usr/bin/env bash
# Creates .venv and installs the project with its extras. Idempotent; used by run.sh and test.sh.
# The install is skipped when nothing it depends on changed since the last one (a stamp in .venv),
# so starting the service again takes no install time.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
EXTRAS=${EXTRAS:-dev}
TORCH_PIN="torch==2.13.0"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.image-search-installed
wanted="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1) extras=$EXTRAS $TORCH_PIN"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ]; then
  exit 0
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch first and pinned: 2.13.0 resolves to the CPU build; an unpinned torch pulls a multi-GB CUDA build.
.venv/bin/python -m pip install --quiet "$TORCH_PIN"
# The editable install's build prints setuptools' notices on stderr; keep them for a failure only.
if ! .venv/bin/python -m pip install --quiet -e ".[$EXTRAS]" 2>.venv/.install-log; then
  cat .venv/.install-log >&2
  exit 1
fi
echo "$wanted" >"$stamp"
