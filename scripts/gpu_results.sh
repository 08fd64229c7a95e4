#!/usr/bin/env bash
# Every GPU figure that README.md (Speed) and RESULTS.md ask for, in one command:
#
#   bash scripts/gpu_results.sh ARCHIVE [OUT] [PARTS]
#   bash scripts/gpu_results.sh ../shared/data/cifar10-jpeg.tar.gz outputs/gpu recipe,bench,seeds
#
# ARCHIVE  what data.source accepts (the JPEG archive, cifar-10-python.tar.gz, or `download`)
# OUT      where logs, bench.json and the sweep directories go (default outputs/gpu_results)
# PARTS    comma-separated; they run in this order, most wanted first (default all):
#            recipe  the whole default recipe, process start to exit, caches warm (prepare builds them)
#            bench   the (a)/(b)/(c) benchmark with fp32, bf16 and torch.compile'd (c); then, on a GPU, the
#                    CUDA tests and scripts/step_overhead.py (per-step cost, where the host waits for the GPU)
#            seeds   3-seed multiruns of the reproduction, experiment=next and experiment=best
# A part that fails is logged and the next one still runs; the exit status says whether any failed.
# TRAINER=cpu and EXTRA="data.root=... trainer.max_epochs=1" let a CPU machine try the script small.
set -uo pipefail
archive=${1:?usage: bash scripts/gpu_results.sh ARCHIVE [OUT] [recipe,bench,seeds]}
out=${2:-outputs/gpu_results}
parts=${3:-recipe,bench,seeds}
trainer=${TRAINER:-gpu}
read -r -a extra <<<"${EXTRA:-}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # scripts/*.py import the package without an install
has() { [[ ",$parts," == *",$1,"* ]]; }
failed=()
step() {  # step NAME LOG COMMAND...: run, tee the log, remember a failure and go on
  local name=$1 log=$2; shift 2
  "$@" 2>&1 | tee "$log" || { failed+=("$name"); echo "** $name failed (see $log)"; }
}

python -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')" | tee "$out/device.txt"
python -m cifar_lightning.prepare data.source="$archive" "${extra[@]}" hydra.run.dir="$out/prepare" 2>&1 \
  | tee "$out/prepare.log" || { echo "** prepare failed (see $out/prepare.log)"; exit 1; }

if has recipe; then  # the README's "whole recipe" figure: wall seconds from process start to exit
  start=$(date +%s.%N)
  step recipe "$out/recipe.log" python -m cifar_lightning.train trainer="$trainer" "${extra[@]}" hydra.run.dir="$out/recipe"
  echo "whole default recipe: $(python -c "print(f'{$(date +%s.%N) - $start:.1f}')") s wall" | tee -a "$out/recipe.log"
fi
if has bench; then
  step bench "$out/bench.log" python -m cifar_lightning.bench trainer="$trainer" 'compile_c=[false,true]' "${extra[@]}" \
    hydra.run.dir="$out/bench"
  if [[ $trainer == gpu ]]; then
    step gpu_tests "$out/gpu_tests.log" python -m pytest -q tests/test_speed_options.py -k gpu  # the CUDA tests only
    step step_overhead "$out/step_overhead.log" python scripts/step_overhead.py --size 32 --batch 64 --device cuda --sync-debug
  fi
fi
if has seeds; then  # one sweep per RESULTS.md row; each sweep directory holds summary.md and seeds.csv
  for recipe in "" experiment=next experiment=best; do
    name=${recipe#experiment=}
    step "seeds_${name:-repro}" "$out/seeds_${name:-repro}.log" python -m cifar_lightning.train -m $recipe \
      trainer="$trainer" seed=0,1,2 "${extra[@]}" hydra.sweep.dir="$out/seeds_${name:-repro}"
  done
fi
echo "results in $out${failed[*]:+; failed: ${failed[*]}}"
[[ ${#failed[@]} -eq 0 ]]
