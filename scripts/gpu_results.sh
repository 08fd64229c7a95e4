#!/usr/bin/env bash
# Every GPU figure that README.md (Speed) and RESULTS.md ask for, in one command:
#
#   bash scripts/gpu_results.sh ARCHIVE [OUT] [PARTS]
#   bash scripts/gpu_results.sh PATH/TO/cifar10-jpeg.tar.gz outputs/gpu graph,recipe,bench,seeds
#
# ARCHIVE  what data.source accepts (the JPEG archive, cifar-10-python.tar.gz, or `download`)
# OUT      where logs, bench.json and the sweep directories go (default outputs/gpu_results)
# PARTS    comma-separated; they run in this order, most wanted first (default all):
#            graph   CUDA graphs through torch.compile (speed.compile=true speed.compile_mode=reduce-overhead):
#                    (a) against eager and compiled (c) at fp32 and bf16, the whole default recipe compiled so,
#                    timed as `recipe` is, and one such epoch under Lightning's profiler
#                    (profile_graph/fit-profile.txt)
#            recipe  the whole default recipe, process start to exit, caches warm (prepare builds them)
#            bench   the (a)/(b)/(c) benchmark with fp32 and bf16 (c); then eager against torch.compile'd (c)
#                    at fp32 (does compiling pay off?); then, on a GPU, the CUDA tests and
#                    benchmarks/step_overhead.py (per-step cost, where the host waits for the GPU)
#            seeds   3-seed multiruns of the reproduction and experiment=next
#            accuracy  experiment=teacher, then 3-seed multiruns of experiment=fast_distilled (from that
#                    teacher) and fast, each as planned and one epoch shorter (its N and N-1), then of
#                    best_distilled and best (RESULTS.md's accuracy rows)
# A part that fails is logged and the next one still runs; the exit status says whether any failed.
# Run it from a clone: it installs the clone (editable, no dependencies, no network) unless it is installed.
# TRAINER=cpu and EXTRA="data.root=... trainer.max_epochs=1" let a CPU machine try the script small.
# For a time-limited job (a batch slot that may end midway), three settings:
#   PYTHON=python3     the interpreter (default python3: on GPU images the one that holds torch)
#   STEP_LIMIT_S=240   each step is killed after this many seconds (then the next one runs); 0 = none
#   SNAPSHOT=$OUT/gpu.tgz  every 20 s, and at exit, OUT's logs and small files (no checkpoints or
#                      TensorBoard) are re-packed here, with a monitor.log of host and GPU memory, so a
#                      call cut off midway still brings back what was done.
set -uo pipefail
archive=${1:?usage: bash scripts/gpu_results.sh ARCHIVE [OUT] [graph,recipe,bench,seeds,accuracy]}
out=${2:-outputs/gpu_results}
parts=${3:-graph,recipe,bench,seeds,accuracy}
trainer=${TRAINER:-gpu}
py=${PYTHON:-python3}
read -r -a extra <<<"${EXTRA:-}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
has() { [[ ",$parts," == *",$1,"* ]]; }
failed=()
step() {  # step NAME LOG COMMAND...: run (killed after STEP_LIMIT_S), tee the log, remember a failure, go on
  local name=$1 log=$2; shift 2
  timeout -k 10 "${STEP_LIMIT_S:-0}" "$@" 2>&1 | tee "$log"
  local rc=${PIPESTATUS[0]}
  ((${STEP_LIMIT_S:-0} > 0 && (rc == 124 || rc == 137))) &&
    echo "** $name: killed after STEP_LIMIT_S=$STEP_LIMIT_S s" | tee -a "$log"
  ((rc == 0)) || { failed+=("$name"); echo "** $name failed (see $log)"; }
}
monitor() {  # one line: time, host memory used/available (MiB), largest process RSS, GPU memory and use
  echo "$(date +%T) host_used_MiB=$(free -m | awk 'NR==2{print $3" avail_MiB="$7}')" \
    "top_rss_MiB=$(ps -eo rss=,comm= --sort=-rss | awk 'NR==1{print int($1/1024)"("$2")"}')" \
    "gpu=$(timeout 5 nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader 2>/dev/null | tr -d ' ')" \
    >>"$out/monitor.log"
}
snapshot() {
  tar czf "$SNAPSHOT.tmp" --exclude='*.ckpt' --exclude=tensorboard -C "$(dirname "$out")" "$(basename "$out")" \
    2>/dev/null && mv -f "$SNAPSHOT.tmp" "$SNAPSHOT"
}
if [[ -n ${SNAPSHOT:-} ]]; then
  (while sleep 20; do snapshot; monitor; done) &  # snapshot first: a wedged GPU can hang nvidia-smi
  trap 'kill $! 2>/dev/null; monitor; snapshot' EXIT
fi

step device "$out/device.txt" "$py" -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')"
# Every command reads its configs as pkg://cifar_lightning.conf, and conf/ becomes that package only once the clone
# is installed (pyproject.toml's package-dir; a PYTHONPATH of the clone has no cifar_lightning.conf). Installed
# editable, without dependencies (the machine has them) or the network, unless this clone's is importable already.
"$py" -c "import os, sys, cifar_lightning.conf as c; sys.exit(not os.path.realpath(c.__file__).startswith(os.path.realpath('.') + os.sep))" 2>/dev/null ||
  step install "$out/install.log" "$py" -m pip install --no-deps --no-build-isolation --no-index -e .
step prepare "$out/prepare.log" "$py" -m cifar_lightning.prepare data.source="$archive" "${extra[@]}" hydra.run.dir="$out/prepare"
[[ ${#failed[@]} -eq 0 ]] || exit 1  # no data, or no torch: nothing below can run

recipe() {  # recipe NAME OVERRIDES...: the README's "whole recipe" figure, wall seconds from process start to exit
  local name=$1 start
  shift
  start=$(date +%s.%N)
  step "$name" "$out/$name.log" "$py" -m cifar_lightning.train trainer="$trainer" "$@" "${extra[@]}" hydra.run.dir="$out/$name"
  [[ " ${failed[*]} " == *" $name "* ]] ||  # a killed or failed recipe has no wall time to report
    echo "whole default recipe: $("$py" -c "print(f'{$(date +%s.%N) - $start:.1f}')") s wall" | tee -a "$out/$name.log"
}
if has graph; then
  graphed=(speed.compile=true speed.compile_mode=reduce-overhead)
  step bench_graph "$out/bench_graph.log" "$py" benchmarks/bench.py trainer="$trainer" 'pipelines=[a,c]' \
    'compile_c=[false,true]' speed.compile_mode=reduce-overhead 'batch_sizes=[]' 'fractions=[]' "${extra[@]}" \
    hydra.run.dir="$out/bench_graph"
  recipe recipe_graph "${graphed[@]}"
  # Lightning's profiler on one graphed epoch: what the loop and callbacks cost around each replay
  step profile_graph "$out/profile_graph.log" "$py" -m cifar_lightning.train trainer="$trainer" "${graphed[@]}" \
    trainer.max_epochs=1 test=false trainer.profiler=simple "${extra[@]}" hydra.run.dir="$out/profile_graph"
fi
has recipe && recipe recipe
if has bench; then
  # Eager first, so the (a)/(b)/(c) table exists even if the compiled run is what overruns STEP_LIMIT_S.
  step bench "$out/bench.log" "$py" benchmarks/bench.py trainer="$trainer" "${extra[@]}" hydra.run.dir="$out/bench"
  step bench_compile "$out/bench_compile.log" "$py" benchmarks/bench.py trainer="$trainer" 'pipelines=[c]' \
    'compile_c=[false,true]' 'precision=[32-true]' 'batch_sizes=[]' 'fractions=[]' "${extra[@]}" \
    hydra.run.dir="$out/bench_compile"
  if [[ $trainer == gpu ]]; then
    step gpu_tests "$out/gpu_tests.log" "$py" -m pytest -n0 -q tests/test_speed.py -k gpu  # the CUDA tests only
    step step_overhead "$out/step_overhead.log" "$py" benchmarks/step_overhead.py --size 32 --batch 64 --device cuda --sync-debug
  fi
fi
if has seeds; then  # one sweep per RESULTS.md row; each sweep directory holds summary.md and seeds.csv
  for recipe in "" experiment=next; do
    name=${recipe#experiment=}
    step "seeds_${name:-repro}" "$out/seeds_${name:-repro}.log" "$py" -m cifar_lightning.train -m $recipe \
      trainer="$trainer" seed=0,1,2 "${extra[@]}" hydra.sweep.dir="$out/seeds_${name:-repro}"
  done
fi
if has accuracy; then  # in priority order: the teacher, fast's seeds, best's; sweeps hold summary.md
  step accuracy_teacher "$out/accuracy_teacher.log" "$py" -m cifar_lightning.train \
    experiment=teacher trainer="$trainer" test=false "${extra[@]}" hydra.run.dir="$out/accuracy_teacher"
  teacher="$out/accuracy_teacher/checkpoints/last.ckpt"
  [[ -f $teacher ]] || teacher=docs/results/teacher_xeon/teacher.ckpt  # the committed one
  for name in fast_distilled fast best_distilled best; do
    more=()
    [[ $name == *_distilled ]] && more=(distill.teacher="$teacher")
    epochs=$("$py" -c "from cifar_lightning.schema import compose
print(compose(['experiment=$name', 'distill.teacher=X']).trainer.max_epochs)")
    runs=("$name")
    [[ $name == fast* ]] && runs+=("${name}_short trainer.max_epochs=$((epochs - 1))")  # N and N-1
    for run in "${runs[@]}"; do
      read -r tag shorter <<<"$run"
      step "accuracy_$tag" "$out/accuracy_$tag.log" "$py" -m cifar_lightning.train -m \
        experiment="$name" trainer="$trainer" seed=0,1,2 $shorter "${more[@]}" "${extra[@]}" \
        hydra.sweep.dir="$out/accuracy_$tag"
    done
  done
fi
echo "results in $out${failed[*]:+; failed: ${failed[*]}}"
[[ ${#failed[@]} -eq 0 ]]
