#!/usr/bin/env bash
# Session 44: an H200 wgmma launch table, and bench_linear at mid M with the built-in (H100) table and with it.
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
T0=$(date +%s)
timeout 330 python3 -m fp4_compile tune --shapes 6144x4096 4096x4096 28672x4096 4096x14336 \
  --out "$OUT/h200_wgmma_table.json" --sweep-json "$OUT/h200_sweep.json" -q 2>&1 | tee "$OUT/tune.log" | tail -8
echo "tune took $(( $(date +%s) - T0 )) s"
for which in builtin h200; do
  mkdir -p "$OUT/linear_$which"
  if [ $which = h200 ]; then export FP4C_WGMMA_TABLE="$OUT/h200_wgmma_table.json"; fi
  OUT="$OUT/linear_$which" timeout 110 python3 benchmarks/bench_linear.py --ms 32,64,128,256 --no-eager --no-emulation \
    > "$OUT/linear_$which/log" 2>&1
  grep "summary\|^| " "$OUT/linear_$which/log" | cut -c1-140 | tail -20
done
