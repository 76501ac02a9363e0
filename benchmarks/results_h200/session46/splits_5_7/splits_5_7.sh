#!/usr/bin/env bash
# Session 46: K splits of 5 and 7 (through memory): every config timed on shapes whose cost-model pick moves to them;
# then the exactness test with the new split counts.
set -u
source benchmarks/gpu_env.sh
nvidia-smi --query-gpu=name --format=csv,noheader
T0=$(date +%s)
timeout 120 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu_kernels.py -k "wgmma_kernel_exact or wgmma_tuned" 2>&1 | tail -3
echo "tests took $(( $(date +%s) - T0 )) s"
T0=$(date +%s)
timeout 260 python3 -m fp4_compile tune --shapes 4608x3584 3072x8192 2304x9216 4608x36864 12288x4096 --modes w4a16 \
  --ms 17,32,64,128,256 --out "$OUT/table.json" --sweep-json "$OUT/sweep.json" -q 2>&1 | tee "$OUT/tune.log" | tail -12
echo "tune took $(( $(date +%s) - T0 )) s"
T0=$(date +%s)
timeout 150 python3 -m fp4_compile tune --shapes 4608x3584 2304x9216 --modes w4a4 \
  --ms 17,64,128 --out "$OUT/table_w4a4.json" --sweep-json "$OUT/sweep_w4a4.json" -q 2>&1 | tee "$OUT/tune_w4a4.log" | tail -12
echo "tune w4a4 took $(( $(date +%s) - T0 )) s"
