#!/usr/bin/env bash
# Every GPU figure that README.md (Speed) and RESULTS.md ask for, in one command:
#
#   bash scripts/gpu_results.sh ARCHIVE [OUT] [PARTS]
#   bash scripts/gpu_results.sh ../shared/data/cifar10-jpeg.tar.gz outputs/gpu bench,recipe,seeds
#
# ARCHIVE  what data.source accepts (the JPEG archive, cifar-10-python.tar.gz, or `download`)
# OUT      where logs, bench.json and the sweep directories go (default outputs/gpu_results)
# PARTS    comma-separated, in this order (default all):
#            bench   the (a)/(b)/(c) benchmark with fp32, bf16 and torch.compile'd (c); on a GPU first the
#                    CUDA tests and scripts/step_overhead.py (per-step cost, where the host waits for the GPU)
#            recipe  the whole default recipe, process start to exit (caches warm if bench ran first)
#            seeds   3-seed multiruns of the reproduction, experiment=next and experiment=best
# TRAINER=cpu and EXTRA="data.root=... trainer.max_epochs=1" let a CPU machine try the script small.
set -euo pipefail
archive=${1:?usage: bash scripts/gpu_results.sh ARCHIVE [OUT] [bench,recipe,seeds]}
out=${2:-outputs/gpu_results}
parts=${3:-bench,recipe,seeds}
trainer=${TRAINER:-gpu}
read -r -a extra <<<"${EXTRA:-}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
has() { [[ ",$parts," == *",$1,"* ]]; }

python -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')" | tee "$out/device.txt"
python -m cifar_lightning.prepare data.source="$archive" "${extra[@]}" hydra.run.dir="$out/prepare"

if has bench && [[ $trainer == gpu ]]; then  # a failure here is logged, and the figures below still run
  python -m pytest -q tests/test_speed_options.py -k gpu 2>&1 | tee "$out/gpu_tests.log" || true  # the CUDA tests only
  python scripts/step_overhead.py --size 32 --batch 64 --device cuda --sync-debug 2>&1 | tee "$out/step_overhead.log" || true
fi
if has bench; then  # also builds the caches, so the recipe below starts warm
  python -m cifar_lightning.bench trainer="$trainer" compile_c=[false,true] "${extra[@]}" \
    hydra.run.dir="$out/bench" 2>&1 | tee "$out/bench.log"
fi
if has recipe; then  # the README's "whole recipe" figure: wall seconds from process start to exit
  start=$(date +%s.%N)
  python -m cifar_lightning.train trainer="$trainer" "${extra[@]}" hydra.run.dir="$out/recipe" 2>&1 | tee "$out/recipe.log"
  echo "whole default recipe: $(python -c "print(f'{$(date +%s.%N) - $start:.1f}')") s wall" | tee -a "$out/recipe.log"
fi
if has seeds; then  # one sweep per RESULTS.md row; each sweep directory holds summary.md and seeds.csv
  for recipe in "" experiment=next experiment=best; do
    name=${recipe#experiment=}
    python -m cifar_lightning.train -m $recipe trainer="$trainer" seed=0,1,2 "${extra[@]}" \
      hydra.sweep.dir="$out/seeds_${name:-repro}" 2>&1 | tee "$out/seeds_${name:-repro}.log"
  done
fi
echo "results in $out"
