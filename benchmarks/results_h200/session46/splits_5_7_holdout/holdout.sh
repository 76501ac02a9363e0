#!/usr/bin/env bash
# Session 46: the 5/7-way rule on held-out shapes (all split counts timed), and eager M = 9 / 16 where its fill moved the pick.
set -u
source benchmarks/gpu_env.sh
nvidia-smi --query-gpu=name --format=csv,noheader
T0=$(date +%s)
timeout 330 python3 -m fp4_compile tune --shapes 4608x7168 6144x11008 12800x13824 8704x28672 14336x25600 17408x27648 \
  3072x27648 25600x14336 9728x28672 --modes w4a16 --ms 17,64,128 --out "$OUT/table.json" --sweep-json "$OUT/sweep.json" -q \
  2>&1 | tee "$OUT/tune.log" | tail -14
echo "tune took $(( $(date +%s) - T0 )) s"
T0=$(date +%s)
timeout 200 python3 benchmarks/bench_eager_small_m.py --shapes 6144x14336,12800x14336,25600x14336,17408x27648 \
  --ms 9,16 2>&1 | tail -10
echo "eager took $(( $(date +%s) - T0 )) s"
