#!/usr/bin/env bash
# On a GPU machine, in under 8 minutes: the `gpu` tests, then the training, input-pipeline and AMP benchmarks at
# 224 px (PneumoniaMNIST from ../shared/data, else generated images), each printing its ratios.
#   bash bench/device_check.sh            (from the repository root, with the package installed)
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python -m pytest -q -m gpu tests -p no:cacheprovider
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
python -c "import sys; sys.path.insert(0, 'bench'); from pathlib import Path; from train_bench import prepared_dataset; prepared_dataset(Path('$scratch'), 224)"
for model in resnet18 resnet50; do
  python bench/train_bench.py "$scratch/prepared" --model "$model" --augment light --batch-size 128 --epochs 1 --rounds 1
done
python bench/amp_bench.py --model resnet50 --size 224 --batch-size 128
