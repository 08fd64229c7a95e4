#!/usr/bin/env bash
# Wheels for an offline machine that already has torch and torchvision (a GPU node with no internet):
#
#   bash scripts/offline_wheels.sh [DIR] [PYTHON_VERSION]       # defaults: .whl (gitignored), 3.12
#   # there, from this project's root:
#   python3 -m pip install --no-index --no-deps --target /tmp/site DIR/*.whl && export PYTHONPATH=/tmp/site
#
# It fetches the versions installed here (the ones the tests passed with): lightning, torchmetrics,
# hydra-core, omegaconf, pytest-xdist and execnet (the tests' workers), and antlr4-python3-runtime
# (Hydra's parser; published only as a source archive, so it is built into a wheel here). Their
# own needs (PyYAML, packaging, tqdm, fsspec, lightning-utilities, typing-extensions, matplotlib,
# tensorboard) are in most PyTorch images; add any that is missing to NAMES below.
set -euo pipefail
dir=${1:-.whl}
py=${2:-3.12}
names=(lightning torchmetrics hydra-core omegaconf pytest-xdist execnet)
pins=()
for name in "${names[@]}"; do
  pins+=("$name==$(python -m pip show "$name" | sed -n 's/^Version: //p')")
done
mkdir -p "$dir"
# Pure-Python wheels (py3-none-any), so one set serves any Linux and CPU architecture.
python -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
  --platform any --platform manylinux2014_x86_64 -d "$dir" "${pins[@]}"
python -m pip wheel -q --no-deps -w "$dir" "antlr4-python3-runtime==$(python -m pip show antlr4-python3-runtime | sed -n 's/^Version: //p')"
ls -1 "$dir"
