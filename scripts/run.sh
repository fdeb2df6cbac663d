#!/usr/bin/env bash
# One command from a fresh clone to a running service on http://127.0.0.1:8000
#   - installs the project into .venv (skipped when nothing changed since the last run)
#   - refuses to start when the port is taken (a second Ray proxy would share it with the first)
#   - data/images + data/model: COCO 128 and openai/clip-vit-base-patch32 when the internet is reachable,
#     otherwise generated demo pictures and a random CLIP (labelled as such on the page and /info); a later
#     run that finds the internet replaces the demo data with the real one
#   - brings data/index up to date (incremental), starts `serve run serve_config.yaml`, says when it is ready
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=${EXTRAS:-dev} bash scripts/setup.sh
PY=.venv/bin/python
read -r HOST PORT < <($PY -c 'import yaml; h = yaml.safe_load(open("serve_config.yaml"))["http_options"]; print(h.get("host", "127.0.0.1"), h.get("port", 8000))')

# A second `serve run` would bind the same port without an error (Ray's proxy uses SO_REUSEPORT) and
# the two would split the requests: refuse instead (scripts/check_port.py says what to do).
$PY scripts/check_port.py serve_config.yaml || exit 1

fetch_real_data() {
  # Into fresh folders first: a failed download never leaves half of it beside the old data.
  rm -rf data/.fetch && mkdir -p data/.fetch
  if $PY scripts/fetch_coco128.py --images data/.fetch/images --model-dir data/.fetch/model; then
    rm -rf data/images data/model data/index
    mv data/.fetch/images data/images && mv data/.fetch/model data/model
    rm -rf data/.fetch
    return 0
  fi
  rm -rf data/.fetch
  return 1
}

if [ -f data/model/DEMO_RANDOM_WEIGHTS ]; then
  echo "run.sh: data/ holds demo data (random model); trying to fetch COCO 128 and the real CLIP instead..."
  fetch_real_data || echo "run.sh: still offline: keeping the demo data (the page says so)."
elif [ ! -f data/model/config.json ] || [ -z "$(ls -A data/images 2>/dev/null)" ]; then
  fetch_real_data || $PY scripts/make_demo_data.py
fi
# Incremental: embeds only what changed in data/images since the last run (nothing: no new version),
# and rebuilds in full, saying why, when the model or preprocessing changed.
$PY -m index_builder --images data/images --out data/index --model data/model

# serve run stays in the foreground (this shell becomes it), so Ctrl-C stops it the usual way; the
# watcher beside it prints the Ready line once /healthz answers, then exits.
$PY scripts/say_when_ready.py "$HOST" "$PORT" $$ &
exec .venv/bin/serve run serve_config.yaml
