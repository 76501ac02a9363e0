#!/usr/bin/env bash
# Session 47, call 3 (2 H200s): the fixes (wgmma smem opt-in per device, tickets, cuBLASLt workspace per call,
# emulation under autocast). GPU 0: the whole GPU suite. Beside it: which strided input faults (one child per
# variant, CUDA_LAUNCH_BLOCKING=1), then the review's checks that the fault had masked. Last: the two-GPU tests.
set -u
source benchmarks/gpu_env.sh
P=.probe/v49
mkdir -p $OUT/tests $OUT/review $OUT/misaligned
( CUDA_VISIBLE_DEVICES=0 OUT=$OUT/tests RUN_GPU_ONLY=tests RUN_GPU_T_TESTS=420 bash benchmarks/run_gpu.sh > $OUT/tests/run.log 2>&1 ) &
sleep 45
timeout 200 python3 $P/misaligned.py 2>&1 | tee $OUT/misaligned/misaligned.log
OUT=$OUT/review timeout 230 python3 $P/user_gpu/user_gpu_review.py --only autocast_fp32_model,stale_state_after_user_changes,determinism_repeat_and_graph,two_streams_same_layer,user_graph_and_eager_other_stream,cublaslt_workspace_two_streams,empty_batch,scale_setattr_without_refresh_alpha,iso_fastpath_ticket_buffer_first_use_race,iso_graph_ticket_ring_wrap_collision,iso_two_gpus 2>&1 | tee $OUT/review/review.log | grep -v '^PASS' | cut -c1-700 | tail -30
grep '^PASS' $OUT/review/review.log | cut -c1-200
wait
timeout 90 python3 -m pytest -m gpu tests/test_gpu_kernels.py tests/test_triton_launch.py -k "two_gpus or their_tensors_device" -q -p no:cacheprovider -rs 2>&1 | tail -3
tail -3 $OUT/tests/pytest_gpu.log
