#!/usr/bin/env bash
# Session 47, call 2 (2 H200s): the user's-eye GPU review script; then, time permitting, v44d's lean loads
# (12% fewer instructions in the decode kernel's M=1 loop; no gain on the H100) on the H200.
set -u
source benchmarks/gpu_env.sh
nvidia-smi --query-gpu=name --format=csv,noheader
P=.probe/v49
mkdir -p $OUT/values $OUT/review
OUT=$OUT/review timeout 420 python3 $P/user_gpu/user_gpu_review.py 2>&1 | tee $OUT/review/review.log | grep -v '^PASS' | tail -60
grep -c '^PASS' $OUT/review/review.log
OUT=$OUT/values timeout 140 python3 benchmarks/compare_builds.py --kernel small_m --rounds 5 $P/lean_loads.cu --cases 28672x4096x1,4096x14336x1,14336x4096x1,4096x4096x1 2>&1 | tail -7
