#!/usr/bin/env bash
# Session 45: the wgmma kernel's cost model against every launch config on Llama-3-70B / 13B-class shapes (W4A16).
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH="/tmp/site:$PWD"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
T0=$(date +%s)
timeout 480 python3 -m fp4_compile tune --shapes 10240x8192 5120x13824 8192x8192 13824x5120 8192x28672 57344x8192 \
  --modes w4a16 --ms 17,32,64,128,256 --out "$OUT/table_70b.json" --sweep-json "$OUT/sweep_70b.json" -q 2>&1 | tee "$OUT/tune.log" | tail -30
echo "tune took $(( $(date +%s) - T0 )) s"
