#!/usr/bin/env bash
# Fresh machine -> trained and evaluated UTKFace model:
#   sets up .venv, installs agejax, trains TinyAgeNet (DLDL-v2) at 64x64 on UTKFace
#   and evaluates it on the test split; writes runs/utk_cpu/results.md.
# UTKFace is read from ../shared/data/utkface/UTKFace.tar.gz (or set UTKFACE_DIR to the
# folder holding UTKFace.tar.gz). Non-commercial research use only.
set -euo pipefail
cd "$(dirname "$0")"
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -e ".[faces]"
UTKFACE_DIR=${UTKFACE_DIR:-../shared/data/utkface}
if [ ! -f "$UTKFACE_DIR/UTKFace.tar.gz" ]; then
  echo "UTKFace not found: put the official UTKFace.tar.gz (aligned & cropped faces) into $UTKFACE_DIR," >&2
  echo "or run UTKFACE_DIR=/folder/with/the/archive bash run.sh" >&2
  exit 1
fi
export AGEJAX_DATA_DIR=${AGEJAX_DATA_DIR:-$PWD/runs/tensorflow_datasets}
python -m agejax.experiments utkface_cpu --workdir runs/utk_cpu --only dldl_v2 --seeds 1 \
  --manual_dir "$UTKFACE_DIR"
