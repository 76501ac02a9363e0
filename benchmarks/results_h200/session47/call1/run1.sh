#!/usr/bin/env bash
# Session 47, call 1 (2 GPUs): HEAD's GPU suite on GPU 0 while the dispatch fuzz (4x the cases, a fresh seed)
# runs its ops on cuda:1 with cuda:0 current; then the two-GPU tests.
set -u
source benchmarks/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
mkdir -p $OUT/tests $OUT/fuzz
( CUDA_VISIBLE_DEVICES=0 OUT=$OUT/tests RUN_GPU_ONLY=tests RUN_GPU_T_TESTS=540 bash benchmarks/run_gpu.sh > $OUT/tests/run.log 2>&1 ) &
sleep 60   # the suite's first builds go first (builds are atomic renames; this only saves duplicate work)
FP4C_FUZZ_DEVICE=cuda:1 FP4C_FUZZ_SCALE=4 timeout 420 python3 -m pytest -m gpu tests/test_gpu_dispatch_fuzz.py \
  -q -p no:cacheprovider -rs 2>&1 | tee $OUT/fuzz/fuzz_cuda1.log | tail -4
timeout 120 python3 -m pytest -m gpu tests/test_triton_launch.py -q -p no:cacheprovider -rs 2>&1 | tee $OUT/fuzz/two_gpus.log | tail -3
wait
tail -3 $OUT/tests/pytest_gpu.log
