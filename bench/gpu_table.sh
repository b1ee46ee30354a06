#!/usr/bin/env bash
# The GPU table: agejax against PyTorch on one GPU (bf16, batch 32 and 256; PyTorch with
# channels_last + autocast + torch.compile), and the 32-image forward at 224 px beside DLDL-v2's
# published M40 figures. Needs a python3 with jax (CUDA), flax, optax and torch, and the PyTorch
# side's reference script (bench/compare_torch.py runs it): put it at ../shared/bench/ or
# .bench_ref/torch_reference.py (.bench_ref/ is git-ignored).
#   bash bench/gpu_table.sh
#   bash bench/gpu_table.sh --only thin:224:train:256,resnet34:112:train:256   # a subset
# Prints the JSON lines and the markdown table; with $OUT set also writes $OUT/gpu_table.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
ref=../shared/bench/torch_reference.py
[ -f "$ref" ] || ref=.bench_ref/torch_reference.py
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import jax, torch; print('jax', jax.__version__, jax.devices(), '| torch', torch.__version__)"
export PYTHONUNBUFFERED=1
python3 bench/compare_torch.py --torch_python python3 --torch_ref "$ref" --gpu --rounds 2 --steps 10 "$@" \
  | tee "${OUT:-/tmp}/gpu_table.txt"
