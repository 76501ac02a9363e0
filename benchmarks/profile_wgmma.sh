#!/usr/bin/env bash
# ncu profiles of the wgmma kernel (one launch each, clocks left alone): speed of light, tensor-pipe
# activity and the warp stall reasons. Writes $OUT/ncu_<what>_N_K_M.txt and prints the key lines.
# Run on the GPU machine from the repository root: bash benchmarks/profile_wgmma.sh ["what N K M" ...]
# (what: wgmma, or bf16 for cuBLAS on the same shape; default: three wgmma cases).
set -u
OUT="${OUT:-/tmp}"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
python3 benchmarks/profile_one.py wgmma 1024 4096 64 >/dev/null 2>&1  # build once
CASES=("$@")
[ ${#CASES[@]} -gt 0 ] || CASES=("wgmma 28672 4096 64" "wgmma 28672 4096 1024" "wgmma 4096 4096 128")
for cfg in "${CASES[@]}"; do
  tag=$(echo $cfg | tr ' ' _)
  kernel="regex:nvfp4_wgmma_kernel"
  [ "${cfg%% *}" = bf16 ] && kernel="regex:nvjet|gemm|xmma|cutlass"
  timeout 150 ncu --clock-control none --kernel-name "$kernel" --launch-skip 2 --launch-count 1 \
    --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section WarpStateStats \
    --section SchedulerStats --section Occupancy --section LaunchStats \
    --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,regex:sm__pipe_tensor_op_.*cycles_active\.avg\.pct_of_peak_sustained_active,regex:sm__inst_executed_pipe_.*\.avg\.pct_of_peak_sustained_active" \
    python3 benchmarks/profile_one.py $cfg > $OUT/ncu_$tag.txt 2>&1
  echo "== $cfg"; grep -E "Duration|DRAM Throughput|L2 Cache Throughput|Compute \(SM\)|Issue Slots Busy|Eligible Warps|No Eligible|Registers Per|tensor_op|stalled_(barrier|long_scoreboard|wait|math|short|mio|lg|sleeping|branch|dispatch|no_inst|membar|not_sel|selected|drain|misc)[a-z_]*_per" $OUT/ncu_$tag.txt | head -40
done
