#!/usr/bin/env bash
# One command from a fresh clone to a running service on http://127.0.0.1:8000
#   - installs the project into .venv (skipped when nothing changed since the last run)
#   - refuses to start when the port is taken (a second Ray proxy would share it with the first)
#   - data/images + data/model, when empty: COCO 128 and openai/clip-vit-base-patch32 when the internet is
#     reachable, otherwise generated demo pictures and a random CLIP (labelled as such on the page and
#     /info); a later run that finds the internet replaces that demo data (only if unchanged) with the real
#     one. Folders the user filled are never touched.
#   - brings data/index up to date (incremental), starts `serve run serve_config.yaml`, says when it is ready
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=${EXTRAS:-dev} bash scripts/setup.sh
PY=.venv/bin/python
read -r HOST PORT < <($PY -c 'import yaml; h = yaml.safe_load(open("serve_config.yaml"))["http_options"]; print(h.get("host", "127.0.0.1"), h.get("port", 8000))')

# A second `serve run` would bind the same port without an error (Ray's proxy uses SO_REUSEPORT) and
# the two would split the requests: refuse instead (scripts/check_port.py says what to do).
$PY scripts/check_port.py serve_config.yaml || exit 1

# data/images and data/model: filled only when empty (COCO 128 and the real CLIP online, demo data
# offline); run.sh's own demo data is replaced by the real one once online; a folder the user filled
# is never written to, moved or deleted (scripts/data_dirs.py; it exits 1 saying what to do when the
# user's data/model holds no checkpoint). It prints the builder's extra flags.
BUILD_FLAGS=$($PY scripts/data_dirs.py data) || exit 1
# Incremental: embeds only what changed in data/images since the last run (nothing: no new version),
# and rebuilds in full, saying why, when the model or preprocessing changed.
# shellcheck disable=SC2086  # the flags are words (none, or --allow-mass-removal)
$PY -m index_builder --images data/images --out data/index --model data/model $BUILD_FLAGS

# Ray settings for an idle service that stays idle (serve_app/ray_env.py says what each costs); a value
# already in the environment wins. Ray reads them when its processes start, so before `serve run`.
eval "$($PY -m serve_app.ray_env)"

# serve run stays in the foreground (this shell becomes it), so Ctrl-C stops it the usual way; the
# watcher beside it prints the Ready line once /healthz answers, then exits.
$PY scripts/say_when_ready.py "$HOST" "$PORT" $$ &
exec .venv/bin/serve run serve_config.yaml
