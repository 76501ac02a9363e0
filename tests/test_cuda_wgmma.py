"""The CUDA wgmma kernel on a machine without a GPU: it compiles for sm_90a without spills or
serialized wgmma, and the launch configuration is sane."""

import functools
import json
import os
import sys

import pytest
import torch

from fp4_compile.ops import cuda_wgmma, gpu_timing, nvcc, tuned_wgmma_h100, wgmma_tuning
import background_jobs
from nvcc_helpers import compile_with_ptxas_report, needs_nvcc, ptxas_report

ROOT = os.path.join(os.path.dirname(__file__), "..")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import make_wgmma_table  # noqa: E402

H100_CLUSTERS = tuned_wgmma_h100.CLUSTER_CTAS  # the cluster capacity of the H100 the table was swept on


@pytest.mark.background_job("wgmma_sm90a")
def test_kernel_compiles_for_sm90a_without_spills_or_serialization():
    report = ptxas_report(background_jobs.result("wgmma_sm90a"))
    # per tile: {bf16, fp16} x {16-bit, fp32 out} x {K split in a cluster, not}, and the persistent
    # kernel for the two 16-bit outputs (a split through global memory needs no other kernel)
    assert len(report.kernels) == 10 * len(cuda_wgmma.TILES)
    assert report.spills and all(s == ("0", "0") for s in report.spills), report
    assert max(report.registers) <= 255
    # ptxas serializes wgmma (and says so) when registers an in-flight wgmma reads could be overwritten
    assert "serialized" not in report.log, report.log[-2000:]


@needs_nvcc
def test_dsmem_benchmark_compiles_with_the_kernels_cluster_header(tmp_path):
    """benchmarks/dsmem_bandwidth.cu shares csrc/hopper/cluster.cuh with the kernel: it still builds."""
    source = os.path.join(ROOT, "benchmarks", "dsmem_bandwidth.cu")
    compile_with_ptxas_report([nvcc.nvcc_path(), *cuda_wgmma.nvcc_flags(), "-Xptxas", "-v", "-c", "-o",
                               str(tmp_path / "dsmem.o"), source])


@pytest.mark.parametrize("m", [17, 32, 64, 128, 1000, 4096, 16384])
@pytest.mark.parametrize("n,k", [(1024, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (64, 64)])
def test_launch_config_is_a_built_tile_with_enough_work_per_split(m, n, k):
    bn, wm, splits, _ = cuda_wgmma.launch_config(m, n, k, 132, H100_CLUSTERS)
    assert (bn, wm) in cuda_wgmma.TILES
    assert splits == 1 or cuda_wgmma.k_stages(k) // splits >= 8
    assert 1 <= splits <= cuda_wgmma.MAX_SPLITS


def test_wave_fill_counts_the_slots_of_the_launch_waves():
    fill = functools.partial(cuda_wgmma.wave_fill, sms=132, cluster_ctas=H100_CLUSTERS)
    LC = cuda_wgmma.LaunchConfig
    assert fill(16, 8192, 8192, LC(32, 2, 4, True)) == 128 / 132         # 32 tiles x 4 splits
    assert fill(16, 10240, 8192, LC(32, 2, 4, True)) == 160 / 264        # a second wave of 28 CTAs
    assert fill(16, 10240, 8192, LC(32, 2, 3, True)) == 120 / 132        # 3 ways: one wave
    assert fill(16, 10240, 8192, LC(32, 2, 4, False)) == 160 / 240       # H100_CLUSTERS of 4: 120 CTAs a wave
    assert fill(16, 28672, 4096, LC(32, 2, 1, False)) == 112 / 132       # unsplit, one wave
    assert fill(4096, 6144, 4096, LC(128, 1, 1, False)) == 1536 / 132 / 12  # persistent: whole waves
    assert fill(1024, 6144, 4096, LC(128, 1, 1, False)) == 384 / 132 / 3  # a tail of 120 tiles: a third wave
    assert fill(1024, 2304, 4096, LC(128, 1, 1, False)) == 144 / 132 / 1.25  # a tail of 12, split 4 ways


def test_cpu_tensors_are_refused_clearly():
    w = torch.zeros(64, 32, dtype=torch.uint8)
    s = torch.zeros(64, 4, dtype=torch.uint8)
    x = torch.randn(32, 64, dtype=torch.bfloat16)
    assert not cuda_wgmma.supports(w) and not cuda_wgmma.use_wgmma(w, 32)
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        cuda_wgmma.wgmma_gemm(x, w, s, torch.ones(1), n=64, out_dtype=torch.bfloat16)


def test_dispatch_rules(monkeypatch):
    """The measured dispatch (cuda_wgmma.py): M range, small weights at small M, whole waves at large M."""
    monkeypatch.setattr(cuda_wgmma, "supports", lambda weight: True)
    monkeypatch.setattr(cuda_wgmma, "num_sms", lambda index: 132)
    monkeypatch.setattr(cuda_wgmma, "cluster_ctas", lambda index: H100_CLUSTERS)
    monkeypatch.setattr(cuda_wgmma.nvcc, "device_capability", lambda index: (9, 0))
    monkeypatch.setattr(cuda_wgmma.wgmma_tables, "device_picks", lambda index: {})  # no table of its own
    cuda_wgmma.device_launch_config.cache_clear()  # results under these stand-ins stay in this test

    def weight(n, k):
        return torch.empty(n, k // 2, dtype=torch.uint8)

    assert not cuda_wgmma.use_wgmma(weight(28672, 4096), 16)   # the small-M kernel's
    assert cuda_wgmma.use_wgmma(weight(28672, 4096), 17)
    # eager calls that the fast path replays: also M = 9..16 on large weights whose launch fills its waves
    for n, k in ((28672, 4096), (4096, 14336), (8192, 8192), (13824, 5120), (10240, 8192), (5120, 13824)):
        assert cuda_wgmma.use_wgmma(weight(n, k), 9, host_bound=True)
        assert cuda_wgmma.use_wgmma(weight(n, k), 16, host_bound=True)
        assert not cuda_wgmma.use_wgmma(weight(n, k), 16)  # captured: Triton
        assert not cuda_wgmma.use_wgmma(weight(n, k), 8, host_bound=True)
    assert not cuda_wgmma.use_wgmma(weight(17408, 5120), 12, host_bound=True)  # 0.77 of its waves: the small-M kernel's
    for n, k in ((6144, 4096), (6144, 8192), (4128, 8192)):  # up to 3 x 2^24 elements: the small-M kernel's
        assert not cuda_wgmma.use_wgmma(weight(n, k), 16, host_bound=True)
    assert not cuda_wgmma.use_wgmma(weight(6144, 4096), 64)    # small weight: Triton
    assert not cuda_wgmma.use_wgmma(weight(6144, 4096), 33)
    assert cuda_wgmma.use_wgmma(weight(6144, 4096), 32)        # but the kernel up to M = 32
    assert cuda_wgmma.use_wgmma(weight(6144, 4096), 64, after_quantization=True)  # W4A4: the kernel (PDL)
    assert cuda_wgmma.use_wgmma(weight(4096, 4096), 17, after_quantization=True)
    assert cuda_wgmma.use_wgmma(weight(4096, 4096), 64)        # smaller than the Triton range
    assert not cuda_wgmma.use_wgmma(weight(4096, 4096), 16, after_quantization=True)
    assert cuda_wgmma.use_wgmma(weight(1024, 4096), 32)        # smaller: K split 8 ways beats Triton
    assert cuda_wgmma.use_wgmma(weight(6144, 4096), 128)
    assert cuda_wgmma.use_wgmma(weight(4096, 4096), 512)       # split K is fine up to LARGE_M
    assert cuda_wgmma.use_wgmma(weight(4096, 4096), 1024)      # 128 tiles: one whole wave
    assert cuda_wgmma.use_wgmma(weight(6144, 4096), 1024)      # 192 tiles: 1.45 waves, the tail split 2 ways
    assert not cuda_wgmma.use_wgmma(weight(1024, 4096), 1024)  # would split K
    assert cuda_wgmma.use_wgmma(weight(4096, 4096), 2048)      # 256 tiles, persistent
    assert not cuda_wgmma.use_wgmma(weight(1024, 4096), 2048)  # 64 tiles: half the SMs
    assert cuda_wgmma.use_wgmma(weight(4096, 4096), 4096)      # no upper bound on M
    assert cuda_wgmma.use_wgmma(weight(28672, 4096), 16384)
    # eager calls the fast path replays: the kernel wherever it runs (host time decides there)
    assert cuda_wgmma.use_wgmma(weight(6144, 4096), 64, host_bound=True)
    assert cuda_wgmma.use_wgmma(weight(1024, 4096), 2048, host_bound=True)
    assert not cuda_wgmma.use_wgmma(weight(4096, 4096), 16, host_bound=True)  # still the small-M kernel's
    cuda_wgmma.device_launch_config.cache_clear()


def test_launch_config_keeps_cluster_splits_within_one_wave():
    """Clusters must fit in a GPC: on an H100 120 CTAs run at once in clusters of 4 (132 SMs), so a
    grid of 32 tiles x 4 splits would take two waves there. The cost model then reduces through
    global memory (every SM) or splits less (H100 sweep, NOTES.md v8: 4096x14336 at M=128, t128x1 with
    4 splits took 65.0 us in clusters, 37.4 us through a workspace)."""
    for m, n, k in [(128, 4096, 4096), (256, 4096, 4096), (64, 4096, 14336), (128, 4096, 14336), (32, 1024, 4096)]:
        cfg = cuda_wgmma.launch_config(m, n, k, 132, H100_CLUSTERS)
        tiles = -(-m // cfg.bn) * -(-n // (128 * cfg.wm))
        assert cfg.workspace or tiles * cfg.splits <= H100_CLUSTERS[cfg.splits], (m, n, k, cfg)
    assert cuda_wgmma.launch_config(128, 28672, 4096, 132, H100_CLUSTERS) == (128, 2, 1, False)  # enough tiles
    assert cuda_wgmma.launch_config(128, 4096, 14336, 132, H100_CLUSTERS).workspace


def test_launch_configs_cover_both_reductions():
    configs = cuda_wgmma.launch_configs(4096, {1: 132, 2: 132, 4: 120, 8: 0})
    assert cuda_wgmma.LaunchConfig(64, 1, 4, False) in configs and cuda_wgmma.LaunchConfig(64, 1, 4, True) in configs
    assert cuda_wgmma.LaunchConfig(64, 1, 8, True) in configs
    assert cuda_wgmma.LaunchConfig(64, 1, 8, False) not in configs  # no cluster of 8 fits
    assert all(c.splits == 1 for c in cuda_wgmma.launch_configs(64 * 15, {s: 132 for s in cuda_wgmma.SPLITS}))
    assert cuda_wgmma.LaunchConfig(32, 2, 4, True).label == "t32x2s4w"


def test_cost_model_runs_many_tiles_persistent():
    """More unsplit tiles than SMs: the persistent kernel's per-tile cost, so an unsplit launch beats
    splitting K to even out waves (H100: 28672x4096 at M=512, t256x1 unsplit 199.9 us, split in
    clusters of 2 221.1 us)."""
    assert cuda_wgmma.launch_config(512, 28672, 4096, 132, H100_CLUSTERS) == (256, 1, 1, False)
    many = cuda_wgmma.LaunchConfig(256, 1, 1, False)
    tiles = 2 * 224
    per_tile = cuda_wgmma.estimated_us(512, 28672, 4096, many, 132, H100_CLUSTERS) / -(-tiles // 132)
    alone = cuda_wgmma.estimated_us(256, 28672 // 4, 4096, many, 132, H100_CLUSTERS)  # 56 tiles: one wave
    assert per_tile < alone  # the fixed per-CTA cost is paid once


def test_tail_plan():
    """A persistent launch's last wave is split along K where it would leave half the SMs or more
    idle, into slices of at least MIN_STAGES_PER_SPLIT stages that fit the SMs."""
    plan = cuda_wgmma.tail_plan
    assert plan(128, 132, 4096) == (0, 1)    # one wave, not persistent
    assert plan(264, 132, 4096) == (0, 1)    # whole waves
    assert plan(192, 132, 4096) == (60, 2)   # 6144x4096 at M = 1024 (256x128 tiles)
    assert plan(144, 132, 4096) == (12, 4)   # at most MAX_TAIL_SPLITS
    assert plan(256, 132, 4096) == (0, 1)    # a tail of 124: nearly a whole wave
    assert plan(192, 132, 1024) == (60, 2)   # 16 stages: 2 slices of 8
    assert plan(192, 132, 960) == (0, 1)     # 15 stages: slices would be shorter than 8
    for tiles in range(133, 1000):
        tail, splits = plan(tiles, 132, 4096)
        assert (tail, splits) == (0, 1) or (tail == tiles % 132 and 2 <= splits and tail * splits <= 132)
    # the cost model counts the split tail as the fraction of a wave it takes
    cfg = cuda_wgmma.LaunchConfig(256, 1, 1, False)
    one_wave = cuda_wgmma.estimated_us(1024, 4096, 4096, cfg, 132, H100_CLUSTERS)
    with_tail = cuda_wgmma.estimated_us(1024, 6144, 4096, cfg, 132, H100_CLUSTERS)
    two_waves = cuda_wgmma.estimated_us(2048, 4096, 4096, cfg, 132, H100_CLUSTERS)
    assert one_wave < with_tail < two_waves


def test_equal_estimates_take_the_256_row_tile_at_small_m():
    """128-row tiles split s ways and 256-row tiles split 2s ways are the same CTAs and stages to the
    cost model; on an H100 the 256-row tiles won at M <= 64 with up to 4 splits and lost at M = 128
    or with 8 splits (NOTES.md v16g)."""
    assert cuda_wgmma.launch_config(32, 6144, 4096, 132, H100_CLUSTERS) == (32, 2, 4, False)  # 15.2 against 17.2 us
    assert cuda_wgmma.launch_config(64, 6144, 4096, 132, H100_CLUSTERS) == (64, 2, 4, False)  # 17.4 against 18.1
    # 24.8 against 26.5 us; through L2 (v29e)
    assert cuda_wgmma.launch_config(32, 14336, 4096, 132, H100_CLUSTERS) == (32, 2, 2, True)
    assert cuda_wgmma.launch_config(128, 14336, 4096, 132, H100_CLUSTERS) == (128, 1, 1, False)  # 33.7 against 36.1
    assert cuda_wgmma.launch_config(64, 3072, 4096, 132, H100_CLUSTERS) == (64, 1, 4, False)  # 11.9 against 12.7 (s8)
    assert cuda_wgmma.launch_config(64, 4096, 4096, 132, H100_CLUSTERS) == (64, 1, 4, True)  # no tie there


MS = (17, 32, 64, 96, 128, 192, 256, 384, 512)


def test_two_way_splits_of_small_tiles_reduce_through_memory():
    """The model's 2-way cluster splits of tiles up to 128 activation rows go through memory (NOTES.md v29e);
    256-row tiles keep their cluster splits."""
    picks = [cuda_wgmma.launch_config(m, n, k, 132, H100_CLUSTERS)
             for m in MS for n, k in ((6144, 4096), (14336, 4096), (10240, 8192), (5120, 3072), (4096, 14336))]
    assert not any(c.splits == 2 and not c.workspace and c.bn <= 128 for c in picks)
    assert any(c.splits == 2 and not c.workspace and c.bn == 256 for c in picks)


def test_long_slices_of_small_tiles_reduce_through_memory():
    """From K = LONG_SLICE_MIN_K every cluster split of a tile up to 128 activation rows goes through memory
    (NOTES.md v30g); below it the model keeps 4- and 8-way cluster splits."""
    def cluster_splits(shapes):
        return [c for m in MS for n, k in shapes
                if (c := cuda_wgmma.launch_config(m, n, k, 132, H100_CLUSTERS)).splits > 1 and not c.workspace]
    long_k = [(5120, 13824), (4608, 36864), (2304, 9216), (5120, 17920), (3584, 18944)]
    assert all(k >= cuda_wgmma.LONG_SLICE_MIN_K for _, k in long_k)
    assert not any(c.bn <= 128 for c in cluster_splits(long_k))
    assert any(c.splits >= 4 and c.bn <= 128 for c in cluster_splits([(6144, 4096), (3072, 3072), (5120, 4096)]))


@pytest.mark.parametrize("m,n,k,label", [
    (17, 6144, 14336, "t32x2s5w"),    # 24 tiles of 256 rows: 5 ways 120 CTAs, 4 ways 96 (H200: 30.3 against 34.2 us)
    (128, 12800, 14336, "t128x2s5w"),  # 90.7 against the unsplit persistent launch's 102.0 us
    (17, 4608, 36864, "t32x2s7w"),    # 18 tiles: 7 ways 126 CTAs, 6 ways 108 (49.9 against 55.0 us)
    (128, 4608, 36864, "t128x2s7w"),  # 82 stages a slice against 768 KB summed (81.6 against 91.1 us)
])
def test_five_and_seven_way_splits_where_they_fill_the_sms(m, n, k, label):
    """The model's picks that NOTES.md v48a measured faster than every pick without 5 and 7 ways."""
    assert cuda_wgmma.launch_config(m, n, k, 132, H100_CLUSTERS).label == label


@pytest.mark.parametrize("m,n,k", [(17, 4608, 3584), (64, 4608, 3584), (128, 4608, 3584), (128, 4608, 8192),
                                   (128, 4608, 14336), (256, 3072, 8192)])
def test_no_five_or_seven_way_split_whose_last_slice_sums_longer_than_a_slice_runs(m, n, k):
    """Where 7 ways filled the SMs but each slice ran fewer stages than the 16 KB per stage of partial tiles its
    last slice sums, they measured up to 1.63x slower (4608x3584 at M=128: 8 stages, 768 KB; NOTES.md v48a):
    the model keeps 1-4, 6 or 8 ways there, and would have picked 5 or 7 without the rule."""
    cfg = cuda_wgmma.launch_config(m, n, k, 132, H100_CLUSTERS)
    assert cfg.splits not in cuda_wgmma.ODD_SPLITS
    cost = functools.partial(cuda_wgmma.estimated_us, m, n, k, sms=132, cluster_ctas=H100_CLUSTERS)
    assert min(map(cost, cuda_wgmma.launch_configs(k, H100_CLUSTERS))) < cost(cfg)


def test_launch_config_labels_round_trip():
    for cfg in cuda_wgmma.launch_configs(4096, H100_CLUSTERS):
        assert cuda_wgmma.LaunchConfig.from_label(cfg.label) == cfg


def test_tuned_table_holds_configurations_the_kernel_runs():
    table = tuned_wgmma_h100
    assert list(table.M_GRID) == sorted(set(table.M_GRID)) and table.M_GRID[-1] <= cuda_wgmma.LARGE_M
    for (n, k), labels in table.PICKS.items():
        assert len(labels) == len(table.M_GRID)
        for label in filter(None, labels):
            assert cuda_wgmma.LaunchConfig.from_label(label) in cuda_wgmma.launch_configs(k, H100_CLUSTERS)


def test_tuned_launch_config_covers_the_m_range_up_to_each_grid_value():
    table = tuned_wgmma_h100
    (n, k), labels = next((nk, v) for nk, v in table.PICKS.items() if any(v))
    at = next(i for i, label in enumerate(labels) if label)
    expected = cuda_wgmma.LaunchConfig.from_label(labels[at])
    low = table.M_GRID[at - 1] + 1 if at else 1
    for m in (low, table.M_GRID[at]):
        assert cuda_wgmma.tuned_launch_config(m, n, k, 132, (9, 0), H100_CLUSTERS) == expected
    # other devices, shapes and M beyond the grid keep the cost model's pick
    assert cuda_wgmma.tuned_launch_config(low, n, k, 114, (9, 0), H100_CLUSTERS) is None
    assert cuda_wgmma.tuned_launch_config(low, n, k, 132, (10, 0), H100_CLUSTERS) is None
    assert cuda_wgmma.tuned_launch_config(low, n + 16, k, 132, (9, 0), H100_CLUSTERS) is None
    assert cuda_wgmma.tuned_launch_config(table.M_GRID[-1] + 1, n, k, 132, (9, 0), H100_CLUSTERS) is None
    # a cluster the device cannot fit is never picked
    if expected.splits > 1 and not expected.workspace:
        no_clusters = {1: 132, **{s: 0 for s in cuda_wgmma.CLUSTER_SPLITS}}
        assert cuda_wgmma.tuned_launch_config(low, n, k, 132, (9, 0), no_clusters) is None


def test_make_wgmma_table_overrides_only_beyond_the_margin(tmp_path):
    n, k = 4096, 4096
    env = {"gpu": "H100", "sms": 132, "torch": "2.11", "time": "now", "cluster_ctas": {str(s): c for s, c in
                                                                                     H100_CLUSTERS.items()}}
    cells, others = [], []
    for m, factor in ((32, 1.02), (64, 1.10), (1024, 2.0)):  # within the margin, beyond it, above LARGE_M
        model = cuda_wgmma.launch_config(m, n, k, 132, H100_CLUSTERS).label
        others.append(next(c.label for c in cuda_wgmma.launch_configs(k, H100_CLUSTERS) if c.label != model))
        cells.append({"n": n, "k": k, "m": m, "us": {model: 10.0 * factor, others[-1]: 10.0}})
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps({"env": env, "cells": cells}))
    grid, picks, lines = make_wgmma_table.table(*make_wgmma_table.merged_cells([str(path)]), margin=0.03)
    assert grid == (32, 64) and len(lines) == 1
    assert picks[(n, k)] == (None, others[1])
    # a second sweep where the M=64 variants tie: their geometric mean, 1.10 ** 0.5 = 1.049 slower, overrides
    # at a 2% margin and not at 6%
    cells[1]["us"] = {label: 10.0 for label in cells[1]["us"]}
    tie = tmp_path / "tie.json"
    tie.write_text(json.dumps({"env": env, "cells": cells}))
    both = make_wgmma_table.merged_cells([str(path), str(tie)])
    assert make_wgmma_table.table(*both, margin=0.02)[1][(n, k)][1] == others[1]
    assert make_wgmma_table.table(*both, margin=0.06)[1][(n, k)][1] is None
    # --score: the model's pick over the best per cell up to LARGE_M, and their geometric mean
    merged = make_wgmma_table.merged_cells([str(path)])
    assert wgmma_tuning.model_slowdowns(*merged) == pytest.approx([1.02, 1.10])
    assert gpu_timing.geomean(wgmma_tuning.model_slowdowns(*merged)) == pytest.approx((1.02 * 1.10) ** 0.5)


def test_tuned_table_is_what_its_sweeps_give():
    """The committed table regenerates from the sweeps it names (no hand edits, the writer's rule as shipped)."""
    table = tuned_wgmma_h100
    env, cells = make_wgmma_table.merged_cells([os.path.join(ROOT, path) for path in table.SWEEPS])
    grid, picks, _ = make_wgmma_table.table(env, cells, table.MARGIN)
    assert grid == table.M_GRID and picks == table.PICKS and env["sms"] == table.SMS
    assert table.SPLITS == make_wgmma_table.timed_splits(env)
    assert table.CLUSTER_CTAS == make_wgmma_table.cluster_capacity(env)
