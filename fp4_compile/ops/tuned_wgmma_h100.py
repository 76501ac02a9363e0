"""Measured launch configurations of the wgmma kernel on the H100 SXM (generated; benchmarks/NOTES.md v28).

Regenerate: python benchmarks/sweep_wgmma_configs.py on the GPU, then
python benchmarks/make_wgmma_table.py sweep_wgmma_configs.json [...].
"""

ABOUT = 'NVIDIA H100 80GB HBM3 (132 SMs), torch 2.11.0+cu130, 20 sweep(s) from 2026-11-27 05:16:27'
SWEEPS = (  # the table's sources
    'benchmarks/results_h100/session26/sweep/sweep_mid_m.json',
    'benchmarks/results_h100/session26/table_3pct/sweep_wgmma_configs.json',
    'benchmarks/results_h100/session26/both_modes/sweep_wgmma_configs.json',
    'benchmarks/results_h100/session26/llama32_3b/sweep_wgmma_configs.json',
    'benchmarks/results_h100/session27/llama3_70b/sweep_wgmma_configs.json',
    'benchmarks/results_h100/session27/qwen/sweep_wgmma_configs.json',
    'benchmarks/results_h100/session27/qwen25_32b/sweep_wgmma_configs.json',
    'benchmarks/results_h100/session27/heldout2/sweep_wgmma_configs.json',
    'benchmarks/results_h100/session28/call1_tests_tune/tune_sweep_a.json',
    'benchmarks/results_h100/session28/call2_sweep_b_gemma/sweep_b/sweep_wgmma_configs.json',
    'benchmarks/results_h100/session28/call2_sweep_b_gemma/tune_gemma2_27b.json',
    'benchmarks/results_h100/session28/tune_nemo_phi3/tune_mistral_nemo_12b.json',
    'benchmarks/results_h100/session28/tune_nemo_phi3/tune_phi3_medium.json',
    'benchmarks/results_h100/session28/tune_qwen_gemma2b/tune_qwen25_72b.json',
    'benchmarks/results_h100/session28/tune_qwen_gemma2b/tune_qwen25_14b.json',
    'benchmarks/results_h100/session28/tune_qwen_gemma2b/tune_gemma2_2b.json',
    'benchmarks/results_h100/session32/resweep/sweep_wgmma_configs.json',
    'benchmarks/results_h100/session32/heldout/sweep_wgmma_configs.json',
    'benchmarks/results_h100/session32/rest/sweep_wgmma_configs.json',
    'benchmarks/results_h100/session32/heldout2/sweep_wgmma_configs.json',
)
MARGIN = 0.02  # overridden where the cost model's pick ran this much slower or more (125 of 580 cells)
CAPABILITY = (9, 0)
SMS = 132
CLUSTER_CTAS = {1: 132, 2: 132, 4: 120, 8: 120}  # CTAs of the kernel that fit at once, per cluster size
SPLITS = (1, 2, 4, 8)  # the K split counts of the variants its sweeps timed
M_GRID = (17, 32, 48, 64, 96, 128, 192, 256, 384, 512)
# (N, K) -> one entry per M_GRID value: for M above the value before and up to this one, the
# launch configuration (LaunchConfig.label), or None for the cost model's pick.
# fmt: off
PICKS = {
    (512, 2048): (None, None, None, None, None, None, None, None, None, None),
    (1024, 2304): (None, None, None, None, None, None, None, 't64x1s4w', None, None),
    (1024, 4096): (None, None, None, None, None, None, None, 't64x1s4w', None, 't128x1s4w'),
    (1024, 5120): (None, None, None, None, None, None, 't64x2s8', 't64x1s4w', None, 't128x1s4w'),
    (1024, 8192): (None, None, None, None, None, 't64x1s8w', 't64x2s8', 't64x1s4w', 't128x2s8', 't128x1s4w'),
    (2048, 2048): (None, None, None, None, None, None, 't64x1s2w', None, None, 't128x1s2'),
    (2048, 2304): (None, None, None, None, 't64x1s4w', 't64x1s4w', None, None, None, None),
    (2048, 4608): (None, None, None, None, 't64x1s4w', 't64x1s4w', 't64x2s4', 't128x1s4w', 't128x2s4', None),
    (2048, 8192): (None, None, None, None, None, None, 't128x1s4w', 't128x1s4w', 't128x2s4', 't128x1s2w'),
    (2304, 2048): (None, None, None, None, None, None, 't64x1s2w', None, None, 't128x1s1'),
    (2304, 9216): ('t32x2s8', 't32x2s8', 't64x2s8', None, 't128x2s8', 't128x2s8', 't64x2s4', None, 't128x2s4', 't256x1s2w'),
    (3072, 3072): (None, None, None, None, None, None, None, None, None, None),
    (3072, 8192): ('t32x2s8', 't32x2s8', 't64x2s8', 't64x2s8', 't128x2s8', 't128x2s8', None, None, None, None),
    (3584, 3584): (None, None, None, None, None, None, None, None, 't128x1s1', None),
    (3584, 4096): (None, None, None, None, None, None, None, None, 't128x1s1', None),
    (3584, 14336): ('t32x2s8', 't32x2s8', 't64x2s8', 't64x2s8', 't128x2s8', 't128x2s8', None, None, None, None),
    (3584, 18944): ('t32x2s8', 't32x2s8', 't64x2s8', 't64x2s8', 't128x2s8', 't128x2s8', None, None, None, None),
    (4096, 4096): (None, None, None, None, None, None, None, None, 't128x1s1', None),
    (4096, 4608): (None, None, None, None, None, None, 't128x1s2w', None, 't128x1s1', None),
    (4096, 5120): (None, None, None, None, None, None, 't128x1s2w', 't128x1s2w', 't256x1s2w', None),
    (4096, 12288): (None, None, 't64x1s4w', 't64x1s4w', None, None, None, None, None, None),
    (4096, 14336): (None, None, 't64x1s4w', 't64x1s4w', None, None, None, None, None, None),
    (4608, 3584): (None, None, None, None, None, None, None, None, None, None),
    (4608, 4096): (None, None, None, None, 't128x2s4', None, None, 't256x1s2w', None, None),
    (4608, 36864): (None, None, None, None, None, None, None, None, 't128x2s2w', None),
    (5120, 3072): (None, None, None, None, None, None, 't64x1s1', None, None, 't256x1s1'),
    (5120, 4096): (None, None, None, None, 't128x2s4', None, None, None, None, None),
    (5120, 5120): (None, None, None, None, 't128x2s4', None, None, None, None, None),
    (5120, 13824): (None, None, None, None, 't128x2s4', 't128x2s4', 't64x2s2w', 't256x1s2w', 't128x2s2w', 't128x1s1'),
    (5120, 14336): (None, None, None, None, 't128x2s4', 't128x2s4', 't64x2s2w', 't256x1s2w', 't128x2s2w', 't128x1s1'),
    (5120, 17920): (None, None, None, None, 't128x2s4', 't128x2s4', 't64x2s2w', None, 't128x2s2w', 't128x1s1'),
    (5120, 27648): (None, None, None, None, 't128x2s4', 't128x2s4', None, None, 't128x2s2w', None),
    (5120, 32768): (None, None, None, None, None, 't128x2s4', None, None, 't128x2s2w', None),
    (6144, 4096): (None, None, None, None, 't128x2s4', None, None, None, None, None),
    (6144, 5120): (None, None, None, None, None, 't128x2s4', None, None, None, None),
    (7168, 5120): (None, None, None, None, 't128x2s4', 't128x2s4', None, None, None, None),
    (7680, 5120): (None, None, None, None, 't128x2s4', 't128x2s4', None, None, None, None),
    (8192, 2048): (None, None, None, None, 't128x1s2', 't128x1s2', 't128x1s1', 't128x1s1', None, None),
    (8192, 3584): (None, None, None, None, None, None, 't128x1s1', None, None, None),
    (8192, 8192): (None, None, None, None, None, None, None, None, None, None),
    (8192, 28672): (None, None, None, None, 't128x2s4w', 't128x2s4w', None, None, 't128x2s4w', None),
    (8192, 29568): (None, None, None, None, 't128x2s4w', 't128x2s4w', None, None, 't128x2s4w', None),
    (9216, 2304): (None, None, 't64x1s1', 't64x1s1', None, None, 't64x2s1', 't256x1s1', None, None),
    (10240, 8192): (None, None, None, None, 't128x2s2w', 't128x2s2w', None, None, 't128x2s1', None),
    (13824, 5120): (None, None, None, None, None, None, None, None, None, None),
    (14336, 4096): (None, None, None, None, None, None, None, None, None, None),
    (14336, 5120): (None, None, None, None, None, None, None, None, None, None),
    (16384, 3072): (None, None, 't64x1s1', 't64x1s1', None, None, None, None, 't128x2s1', None),
    (24576, 4096): (None, None, None, None, None, None, None, None, None, None),
    (28672, 3584): (None, None, None, None, None, None, None, None, 't128x2s1', None),
    (28672, 4096): (None, None, None, None, None, None, None, None, 't128x2s1', None),
    (29568, 8192): (None, None, None, None, None, None, None, None, 't128x2s1', None),
    (35840, 5120): (None, None, None, None, None, None, None, None, None, None),
    (36864, 4608): (None, None, None, None, None, None, None, None, None, None),
    (37888, 3584): (None, None, None, None, None, None, None, None, None, None),
    (55296, 5120): (None, None, None, None, None, None, None, None, None, None),
    (57344, 8192): (None, None, None, None, 't128x2s1', None, None, None, 't128x2s1', None),
    (65536, 5120): (None, None, None, None, None, None, None, None, None, None),
}
