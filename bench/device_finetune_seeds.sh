#!/bin/bash
# bench_finetune.py rows on a many-core machine, side by side: slots of CORES cores each (taskset +
# OMP_NUM_THREADS), every slot one bench_finetune.py row. CORES=2 with the GPU hidden (the default)
# gives each row a 2-core CPU like the machine the main table ran on; GPU=1 CORES=4 gives each row
# Kaggle's GPU shape (4 cores), the rows of a wave sharing the one GPU.
#   WEIGHTS=<lite0 timm folder> BUDGET=150 [CORES=4 GPU=1] bash bench/device_finetune_seeds.sh OUT_DIR "task:row:seed[:flags] ..." ["..."]
# Each further argument is a wave, started when the previous one has finished (at most cores/CORES jobs a wave);
# flags: kernel.py flags for the row, commas for spaces (hard_multi:lite0:1:--img-size,96).
set -u
OUT=$1; shift
BUDGET=${BUDGET:-150}
WEIGHTS=${WEIGHTS:-outputs/lite0}
CORES=${CORES:-2}
GPU=${GPU:-0}
PY=${PY:-python3}
mkdir -p "$OUT"
for wave in "$@"; do
    slot=0
    for job in $wave; do
        IFS=: read -r task row seed flags <<< "$job"
        flags="${flags//,/ }"
        name="${task}_${row}_s${seed}${flags:+_${flags//[- ]/}}"
        mkdir -p "$OUT/$name/weights"
        cp -r "$WEIGHTS" "$OUT/$name/weights/tf_efficientnet_lite0"
        if [ "$GPU" = 1 ]; then hide=(); else hide=(env CUDA_VISIBLE_DEVICES=); fi
        "${hide[@]}" env OMP_NUM_THREADS="$CORES" taskset -c "$((CORES * slot))-$((CORES * slot + CORES - 1))" \
            "$PY" bench/bench_finetune.py --budget "$BUDGET" --only "$task" --rows "$row" --seeds "$seed" \
            --extra "$flags" --keep "$OUT/$name" --out "$OUT/$name.json" > "$OUT/$name.out" 2>&1 &
        slot=$((slot + 1))
    done
    wait
done
