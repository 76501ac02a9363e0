#!/usr/bin/env bash
# GPU run of fp4_compile: tests marked gpu, the backend listing, the benchmarks, a summary last.
# Installs nothing from the network. Writes JSON (and logs) to $OUT when set, else benchmarks/results/.
# Skip parts with RUN_GPU_SKIP="tests cpu model quant linear floor small_m wgmma timeline group pdl" (any subset):
# the whole script needs about 21-23 minutes on an H100 (tests ~4.5 warm, ~5.5 with the first nvcc builds; cpu (the
# CPU tests on this machine's torch, which CI does not have) ~5.5; linear ~2.5, floor ~0.7, small_m ~2, wgmma ~1.5,
# timeline ~1, model ~3, quant ~0.5, group ~1, pdl ~1.5). RUN_GPU_ONLY="..." runs only the stages it names;
# with a 10-minute command limit, run it as four calls: RUN_GPU_ONLY="tests", RUN_GPU_ONLY="cpu",
# RUN_GPU_ONLY="quant linear floor wgmma timeline group", RUN_GPU_ONLY="small_m pdl model". Each stage
# has its own timeout (RUN_GPU_T_TESTS, _CPU, _QUANT, _LINEAR, _FLOOR, _SMALL_M, _WGMMA, _TIMELINE, _GROUP, _MODEL, _PDL seconds).
set -u
source "$(dirname "$0")/gpu_env.sh"
OUTDIR="${OUT:-$PWD/benchmarks/results}"
mkdir -p "$OUTDIR"
SKIP="${RUN_GPU_SKIP:-}"
ONLY="${RUN_GPU_ONLY:-}"
skip() { if [ -n "$ONLY" ]; then [[ " $ONLY " != *" $1 "* ]]; else [[ " $SKIP " == *" $1 "* ]]; fi; }

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || true
python3 -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpu', torch.cuda.get_device_name(0), 'cc', torch.cuda.get_device_capability(0))"

declare -A STATUS
if ! skip tests; then
  timeout "${RUN_GPU_T_TESTS:-480}" python3 -m pytest -m gpu tests -q -p no:cacheprovider --maxfail=10 2>&1 \
    | tee "$OUTDIR/pytest_gpu.log" | tail -25
  STATUS[tests]="$(tail -1 "$OUTDIR/pytest_gpu.log")"
fi
if ! skip cpu; then  # CI runs these on torch 2.13; the package supports 2.11 too, which this image has
  timeout "${RUN_GPU_T_CPU:-420}" python3 -m pytest -m "not gpu" tests -q -p no:cacheprovider --maxfail=10 2>&1 \
    | tee "$OUTDIR/pytest_cpu.log" | tail -15
  STATUS[cpu]="$(tail -1 "$OUTDIR/pytest_cpu.log")"
fi
if python3 -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('fp4_compile.__main__') else 1)" >/dev/null 2>&1; then
  python3 -m fp4_compile backends 2>&1 | tee "$OUTDIR/backends.txt" | tail -20
fi
if ! skip quant; then
  timeout "${RUN_GPU_T_QUANT:-60}" python3 benchmarks/bench_quant.py 2>&1 | tee "$OUTDIR/bench_quant.log" | tail -16
fi
if ! skip linear; then
  timeout "${RUN_GPU_T_LINEAR:-240}" python3 benchmarks/bench_linear.py 2>&1 | tee "$OUTDIR/bench_linear.log" | tail -32
fi
if ! skip floor; then
  timeout "${RUN_GPU_T_FLOOR:-120}" python3 benchmarks/bench_read_floor.py 2>&1 | tee "$OUTDIR/bench_read_floor.log" | tail -12
fi
if ! skip small_m; then
  timeout "${RUN_GPU_T_SMALL_M:-240}" python3 benchmarks/bench_small_m.py --ms 1,4,8,16 --shapes 0,1,2,3,14336x4096,1024x4096 2>&1 | tee "$OUTDIR/bench_small_m.log" | tail -18
fi
if ! skip wgmma; then
  timeout "${RUN_GPU_T_WGMMA:-240}" python3 benchmarks/bench_wgmma.py --ms "${RUN_GPU_WGMMA_MS:-32,64,128,256,1024,2048,4096}" --splits 1,2,4 2>&1 | tee "$OUTDIR/bench_wgmma.log" | tail -31
fi
if ! skip timeline; then
  timeout "${RUN_GPU_T_TIMELINE:-120}" python3 benchmarks/timeline_wgmma.py 2>&1 | tee "$OUTDIR/timeline_wgmma.log" | tail -10
fi
if ! skip group; then
  timeout "${RUN_GPU_T_GROUP:-180}" python3 benchmarks/bench_group.py --warps 1,2,4,8 2>&1 | tee "$OUTDIR/bench_group.log" | tail -20
fi
if ! skip pdl; then
  timeout "${RUN_GPU_T_PDL:-120}" python3 benchmarks/bench_pdl.py --ms 1,16,64 2>&1 | tee "$OUTDIR/bench_pdl.log" | tail -15
  timeout "${RUN_GPU_T_PDL:-120}" python3 benchmarks/bench_early_weights.py 2>&1 | tee "$OUTDIR/bench_early_weights.log" | tail -13
fi
if ! skip model; then
  timeout "${RUN_GPU_T_MODEL:-280}" python3 benchmarks/bench_model.py 2>&1 | tee "$OUTDIR/bench_model.log" | tail -12
fi

echo
echo "=== summary ($(date -u +%H:%M:%S) UTC) ==="
echo "tests: ${STATUS[tests]:-skipped}"
echo "cpu tests on $(python3 -c 'import torch; print("torch", torch.__version__)'): ${STATUS[cpu]:-skipped}"
OUTDIR="$OUTDIR" python3 - <<'PY'
import json, os
d = os.environ["OUTDIR"]
def load(n):
    try:
        return json.load(open(os.path.join(d, n)))
    except Exception:
        return None
q = load("bench_quant.json")
if q:
    for r in q["rows"]:
        if r["m"] == 4096 and r["variant"] == "linear" and r.get("impl") in (None, "dispatch", "triton"):
            print(f"quant ({r.get('impl', 'triton')}) M=4096 K={r['k']}: {r['GBps']} GB/s = {r['copy_frac']:.0%} "
                  f"of copy ({q['env']['copy_GBps']} GB/s)")
lin = load("bench_linear.json")
if lin:
    print("| shape | M | bf16 us | W4A4 us (x) | W4A16 us (x) |")
    print("|---|---|---|---|---|")
    for r in lin["rows"]:
        print(f"| {r['shape']} | {r['m']} | {r['bf16_us']} | {r['w4a4_us']} ({r['w4a4_x']}x) | {r['w4a16_us']} ({r['w4a16_x']}x) |")
    for k, v in (lin.get("summary") or {}).items():
        print(k, v)
def rows(name, title, line, keep=lambda r: True):
    """One summary line per row (those ``keep`` takes) of a benchmark's JSON (``line``: a format string
    over its fields)."""
    data = load(name)
    if data:
        print(title)
        for r in data["rows"]:
            if keep(r):
                print("  " + line.format(**r))
fl = load("bench_read_floor.json")
if fl:
    print("read floor (a kernel that only reads the weight), us, and the speedup it would reach over bf16:")
    for r in fl["rows"]:
        if "m" in r:
            print(f"  {r['shape']} M={r['m']}: floor {r['floor_us']} ({r['floor_copy_frac']:.0%} of copy), ceiling "
                  f"{r['ceiling_x']}x; W4A4 {r['w4a4_x']}x ({r['w4a4_of_ceiling']:.0%} of it), W4A16 {r['w4a16_x']}x "
                  f"({r['w4a16_of_ceiling']:.0%})")
    print("  ", fl["summary"])
rows("bench_small_m.json",
     "small M, us: bf16 / W4A16 Triton / W4A16 backend | W4A4 Triton / W4A4 backend (backend: CUDA kernel at M<=8)",
     "{shape} M={m}: {bf16_us} / {w4a16_triton_us} / {w4a16_backend_us} | {w4a4_triton_us} / {w4a4_backend_us}")
rows("bench_wgmma.json",
     "wgmma kernel, W4A16 x over bf16: backend dispatch / dequant+cuBLASLt / kernel auto config / best variant",
     "{shape} M={m}: {w4a16_backend_x} / {dequant_x} / {wgmma_auto_x} ({auto}) / {best_x} ({best}, {best_tflops} TFLOP/s)")
rows("timeline_wgmma.json", "wgmma kernel, one launch's phases (median over CTAs, us):",
     "{case} {config}: {package_us} per call = launch {launch} + span {span} (set-up {set_up}, to first load "
     "{to_first_load}, first data {first_data}, main loop {main_loop}, publish {publish}, wait {wait_peers}, "
     "sum {sum_peers}, store {store})")
rows("bench_group.json", "linear_group, us per group: members' own calls -> grouped (W4A4 | W4A16):",
     "{group} M={m}: {w4a4_members_us} -> {w4a4_group_us} ({w4a4_x}x) | {w4a16_members_us} -> {w4a16_group_us} "
     "({w4a16_x}x)")
rows("bench_group.json", "linear_silu_mul, us: gate/up group + silu_mul -> gated launch (W4A4 | W4A16):",
     "{group} M={m}: {w4a4_group_silu_us} -> {w4a4_gated_us} | {w4a16_group_silu_us} -> {w4a16_gated_us}",
     lambda r: "w4a4_gated_us" in r)
rows("bench_pdl.json", "programmatic dependent launch, us per linear off -> on (W4A4 | W4A16):",
     "{shape} M={m}: {w4a4_pdl0_us} -> {w4a4_pdl1_us} | {w4a16_pdl0_us} -> {w4a16_pdl1_us}")
mo = load("bench_model.json")
if mo:
    for r in mo["rows"]:
        print("model:", {k: v for k, v in r.items() if k in ("model", "compile", "weights_MB", "decode1_us", "decode16_us", "prefill_us", "decode1_x", "decode1_queued_x", "decode16_x", "decode16_queued_x", "prefill_x", "prefill_inference_mode_x", "prefill_graph_us", "prefill_graph_x", "decode16_rel_err_vs_bf16", "decode16_rel_err_vs_reference")})
PY
