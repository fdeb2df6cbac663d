#!/usr/bin/env bash
# One command from a fresh clone to a running service on http://127.0.0.1:8000
#   - installs the project into .venv
#   - data/images + data/model: COCO 128 and openai/clip-vit-base-patch32 when the internet is reachable,
#     otherwise generated demo pictures and a random CLIP (clearly labelled; results are not meaningful)
#   - builds data/index if it is missing, checks that the port is free, then `serve run serve_config.yaml`
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=${EXTRAS:-dev} bash scripts/setup.sh
PY=.venv/bin/python
if [ ! -f data/model/config.json ] || [ -z "$(ls -A data/images 2>/dev/null)" ]; then
  $PY scripts/fetch_coco128.py || $PY scripts/make_demo_data.py
fi
if [ ! -f data/index/CURRENT ]; then
  $PY -m index_builder --images data/images --out data/index --model data/model
fi
# A second `serve run` would share the port with the first without an error: refuse instead.
$PY scripts/check_port.py serve_config.yaml
exec .venv/bin/serve run serve_config.yaml
