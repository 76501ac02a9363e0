#!/usr/bin/env bash
# Session 45: splits 3 and 6 (through memory) in the wgmma launch configs: every config timed on shapes whose cost-model
# pick moves to them, W4A16; then the exactness test with the new split counts.
set -u
source benchmarks/gpu_env.sh
nvidia-smi --query-gpu=name --format=csv,noheader
T0=$(date +%s)
timeout 170 python3 -m fp4_compile tune --shapes 10240x8192 5120x4096 5120x5120 4608x4096 2304x9216 5120x27648 \
  4608x36864 5120x13824 --modes w4a16 --ms 17,32,64,128,256 --out "$OUT/table.json" --sweep-json "$OUT/sweep.json" -q \
  2>&1 | tee "$OUT/tune.log" | tail -12
echo "tune took $(( $(date +%s) - T0 )) s"
timeout 110 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu_kernels.py -k "wgmma_kernel_exact" 2>&1 | tail -3
