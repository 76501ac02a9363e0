#!/usr/bin/env bash
# ncu profiles of the wgmma kernel (one launch each, clocks left alone) at three shapes: speed of
# light, tensor-pipe activity and the warp stall reasons. Writes $OUT/ncu_wgmma_N_K_M.txt and prints
# the key lines. Run on the GPU machine from the repository root: bash benchmarks/profile_wgmma.sh
set -u
OUT="${OUT:-/tmp}"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
python3 benchmarks/profile_one.py wgmma 1024 4096 64 >/dev/null 2>&1  # build once
for cfg in "28672 4096 64" "28672 4096 1024" "4096 4096 128"; do
  tag=$(echo $cfg | tr ' ' _)
  timeout 150 ncu --clock-control none --kernel-name regex:nvfp4_wgmma_kernel --launch-skip 2 --launch-count 1 \
    --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section WarpStateStats \
    --section SchedulerStats --section Occupancy --section LaunchStats \
    --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,regex:sm__pipe_tensor_op_.*cycles_active\.avg\.pct_of_peak_sustained_active,regex:sm__inst_executed_pipe_.*\.avg\.pct_of_peak_sustained_active" \
    python3 benchmarks/profile_one.py wgmma $cfg > $OUT/ncu_wgmma_$tag.txt 2>&1
  echo "== $cfg"; grep -E "Duration|DRAM Throughput|L2 Cache Throughput|Compute \(SM\)|Issue Slots Busy|Eligible Warps|No Eligible|Registers Per|tensor_op|stalled_(barrier|long_scoreboard|wait|math|short|mio|lg|sleeping|branch|dispatch|no_inst|membar|not_sel|selected|drain|misc)[a-z_]*_per" $OUT/ncu_wgmma_$tag.txt | head -40
done
