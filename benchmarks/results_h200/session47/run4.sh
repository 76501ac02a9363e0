#!/usr/bin/env bash
# Session 47, call 4 (2 H200s): the tree with aligned_rows too. GPU 0: the whole GPU suite. Beside it: the
# review's strided inputs and compile checks (not run before: the fault masked them). Last: the two-GPU tests.
set -u
source benchmarks/gpu_env.sh
P=.probe/v49
mkdir -p $OUT/tests $OUT/review
( CUDA_VISIBLE_DEVICES=0 OUT=$OUT/tests RUN_GPU_ONLY=tests RUN_GPU_T_TESTS=420 bash benchmarks/run_gpu.sh > $OUT/tests/run.log 2>&1 ) &
sleep 40
OUT=$OUT/review timeout 330 python3 $P/user_gpu/user_gpu_review.py --only strided_and_shaped_inputs,activation_dtypes_and_grad_modes,compile_fp4_fullgraph_then_state_changes,compile_fp4_dynamic_marlin_fp16_grad_mode,compile_fp4_reduce_overhead_then_reload,compile_fp4_max_autotune_norm_block,compile_default_inductor_backend,compile_fp4_under_autocast 2>&1 | tee $OUT/review/review.log | grep -v '^PASS' | cut -c1-900 | tail -30
grep '^PASS' $OUT/review/review.log | cut -c1-200
wait
timeout 90 python3 -m pytest -m gpu tests/test_gpu_kernels.py tests/test_triton_launch.py -k "two_gpus or their_tensors_device" -q -p no:cacheprovider -rs 2>&1 | tail -3
grep -E 'passed|failed' $OUT/tests/pytest_gpu.log | tail -3; grep -E '^FAILED|^ERROR' $OUT/tests/pytest_gpu.log | head
