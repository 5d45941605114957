#!/bin/bash
# More seeds of bench_finetune.py's hard tasks, on a many-core machine: slots of 2 cores each
# (taskset + OMP_NUM_THREADS=2, CUDA hidden), every slot one bench_finetune.py row, so the rows
# see a 2-core CPU like the machine the main table ran on, side by side with each other.
#   WEIGHTS=<lite0 timm folder> BUDGET=150 bash bench/device_finetune_seeds.sh OUT_DIR "task:row:seed[:flags] ..." ["..."]
# Each further argument is a wave, started when the previous one has finished (at most cores/2 jobs a wave);
# flags: kernel.py flags for the row, commas for spaces (hard_multi:lite0:1:--img-size,96).
set -u
OUT=$1; shift
BUDGET=${BUDGET:-150}
WEIGHTS=${WEIGHTS:-outputs/lite0}
mkdir -p "$OUT"
for wave in "$@"; do
    slot=0
    for job in $wave; do
        IFS=: read -r task row seed flags <<< "$job"
        flags="${flags//,/ }"
        name="${task}_${row}_s${seed}${flags:+_${flags//[- ]/}}"
        mkdir -p "$OUT/$name/weights"
        cp -r "$WEIGHTS" "$OUT/$name/weights/tf_efficientnet_lite0"
        CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=2 taskset -c "$((2 * slot))-$((2 * slot + 1))" \
            python3 bench/bench_finetune.py --budget "$BUDGET" --only "$task" --rows "$row" --seeds "$seed" \
            --extra "$flags" --keep "$OUT/$name" --out "$OUT/$name.json" > "$OUT/$name.out" 2>&1 &
        slot=$((slot + 1))
    done
    wait
done
