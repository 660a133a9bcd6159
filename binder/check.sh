#!/bin/bash
# Reproduce Binder's install in a fresh virtualenv and a fresh HOME, then run every notebook there
# with nbval. Usage: bash binder/check.sh   (from anywhere; takes a minute or two)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
cd "$repo"  # repo2docker installs binder/requirements.txt from the repository root
"$work/venv/bin/pip" install --quiet -r binder/requirements.txt
"$work/venv/bin/pip" install --quiet nbval pytest  # the checker's own tools, not part of Binder's image
mkdir -p "$work/home"
HOME="$work/home" bash binder/postBuild
# run the notebooks from a copy, so this check cannot touch the repository's files
cp -r notebooks "$work/notebooks"
cd "$work"
HOME="$work/home" DSPEX_NONINTERACTIVE=1 "$work/venv/bin/python" -m pytest -q -p no:cacheprovider \
    --rootdir "$work" -o addopts="" --nbval --nbval-current-env \
    --nbval-sanitize-with notebooks/sanitize.cfg notebooks
