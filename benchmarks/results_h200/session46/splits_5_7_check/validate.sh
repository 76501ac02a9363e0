#!/usr/bin/env bash
# Session 46: a rule for 5- and 7-way splits, fitted on splits_5_7.sh's sweep, checked on shapes it changes (all counts timed).
set -u
source benchmarks/gpu_env.sh
nvidia-smi --query-gpu=name --format=csv,noheader
T0=$(date +%s)
timeout 330 python3 -m fp4_compile tune --shapes 4608x8192 6144x14336 12800x14336 3072x14336 6144x8192 9216x14336 \
  17408x14336 13312x11008 4608x14336 --modes w4a16 --ms 17,32,64,128 --out "$OUT/table.json" --sweep-json "$OUT/sweep.json" -q \
  2>&1 | tee "$OUT/tune.log" | tail -14
echo "tune took $(( $(date +%s) - T0 )) s"
T0=$(date +%s)
timeout 200 python3 -m fp4_compile tune --shapes 4608x8192 6144x14336 12800x14336 --modes w4a4 --ms 17,64,128 \
  --out "$OUT/table_w4a4.json" --sweep-json "$OUT/sweep_w4a4.json" -q 2>&1 | tee "$OUT/tune_w4a4.log" | tail -8
echo "tune w4a4 took $(( $(date +%s) - T0 )) s"
