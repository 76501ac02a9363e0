"""The CUDA C++ wgmma GEMM of ``csrc/hopper/nvfp4_wgmma.cu`` (sm_90a, M >= 17): build, load, launch.

Built and loaded like the small-M kernel (``cuda_small_m.py``: nvcc on first use into a plain
shared library, ctypes on torch's current stream, so CUDA graphs capture it). ``FP4C_WGMMA_KERNEL=0``
turns it off; a build or load failure does the same, once, with a warning naming the cause.
"""

from __future__ import annotations

import ctypes
import functools
import math
import pathlib
import re
from typing import NamedTuple

import torch

from . import cuda_small_m, nvcc, wgmma_tables
from .nvcc import build_shared_library, shared_library_command
from .pdl import use_pdl
from .split_tickets import split_tickets
from .triton_gemm import num_sms
from .weight_layout import tiled_weight_problem

SOURCE = pathlib.Path(__file__).resolve().parent.parent / "csrc" / "hopper" / "nvfp4_wgmma.cu"
# wgmma needs the arch-specific sm_90a target: the kernel exists for Hopper only.
CAPABILITIES = ((9, 0),)
# (activation rows, weight rows / 128) per CTA that the library is built with.
TILES = ((32, 1), (32, 2), (64, 1), (64, 2), (128, 1), (128, 2), (256, 1))
# K splits: reduced in a thread-block cluster (at most the portable cluster size; CLUSTER_SPLITS) or through
# global memory. The counts that are not powers of two through memory only: they fill the SMs where the powers
# of two leave a part-empty wave (H200, W4A16, us at M = 16 / 64 / 128, best of 3 or 6 against best of 1, 2, 4,
# 8: 10240x8192, 40 tiles of 256 rows, 3 x 40 = 120 CTAs on 132 SMs where 2 ways took 80, 4 ways two waves:
# 28.5 / 33.2 / 43.8 against 37.2 / 42.6 / 55.7; 5120x13824, 6 x 20: 25.9 / 31.8 / 39.7 against 33.0 / 38.5 /
# 48.5; NOTES.md v47c); in a cluster they ran 1.05-1.21x slower than the best on the H100 (clusters of 3 fit 117
# CTAs, of 6 102; v33a).
SPLITS = (1, 2, 3, 4, 5, 6, 7, 8)
# 5 and 7 ways: the cost model takes them only where each slice runs at least one 64-k stage per
# SLICE_SUM_KB_PER_STAGE KB of partial tiles that the tile's last slice sums ((splits - 1) fp32 tiles, at
# about 35-40 bytes a clock on one SM, 16 KB in the time of a stage), which its per-partial-sum fixup cost
# does not see. On H200 sweeps of every variant over 14 shapes (76 cells, W4A16 and W4A4, M = 17..256), the
# picks with 5 and 7 ways under this rule ran 0.967x the time of those without (up to 0.855x, 6144x14336
# 5 ways; one cell 1.053x slower), without it 0.99x, with cells up to 1.63x slower (4608x3584 at M = 128,
# 7 ways of 8 stages each summing 768 KB); on 27 cells of 9 held-out shapes 0.952x (two slower, up to 1.12x);
# NOTES.md v48a.
ODD_SPLITS = (5, 7)
SLICE_SUM_KB_PER_STAGE = 16
CLUSTER_SPLITS = (2, 4, 8)
MAX_SPLITS = SPLITS[-1]
STAGE_K = 64  # k per stage of the main loop (kBK of nvfp4_wgmma.cu)
MIN_STAGES_PER_SPLIT = 8  # stages: fewer would leave a split mostly pipeline fill
# Cost model of one launch that launch_config minimises, fitted to the H100 sweep of bench_wgmma.py
# over every tile and split (benchmarks/NOTES.md, v8): each CTA costs CTA_FIXED_US (launch, pipeline
# fill, epilogue) plus, per 64-k stage and 128 weight rows, STAGE_US (decode, weight bytes) and
# STAGE_ROW_US per activation row (tensor cores); CTAs beyond those that fit at once run in further
# waves; a split through global memory adds FIXUP_US (each tile's last split waits for the others
# and reads their partial tiles back from L2) and FIXUP_US_PER_MILLION per million partial sums
# (M x N x splits). These are the constants fitted to the zeroed workspace (memset, red.add,
# finalize kernel) that the fixup replaced: in an A/B on an H100 the two took the same time with
# W4A16 (4096x4096 at M = 128: 18.95 / 19.63 us against 19.28 / 19.02, NOTES.md v14).
# Over the 30 (shape, M) cells of the fit, its picks ran 1.7% slower than the best variant measured (geomean).
# Unsplit launches with more tiles than SMs run persistent (16-bit outputs): CTA_FIXED_US once, then
# PERSISTENT_TILE_US per tile a CTA takes on (A/B on an H100: 28672x4096 at M = 1024, 7 tiles per CTA,
# 395 -> 366 us). Where their last wave would leave half the SMs or more idle, its tiles are split
# along K over them (``tail_plan``, at most MAX_TAIL_SPLITS ways), at TAIL_FIXUP_US for the partial
# tiles' round trip through L2.
# On weights of WIDE_TILE_MIN_ELEMENTS or more, a stage of a 256-row tile holding all M (<= 64) activation
# rows costs WIDE_TILE_STAGE of two 128-row stages: it decoded a weight in 0.79x the time (NOTES.md v16g).
# Over the sweeps of session 27 this took the model's picks from 1.167x the best variant to 1.053x
# (Llama-3-70B layers), 1.050x to 1.020x (Qwen2.5-7B, Qwen3-8B), 1.070x to 1.036x (Qwen2.5-32B, swept
# after the rule was set) and 1.054x to 1.031x (Mistral-Small-24B, Gemma-2-9B; the threshold lowered
# from 2^26 to 2^25 after it). On smaller weights (4096x4096) it picked 8-way splits that ran up to 1.5x
# slower (NOTES.md v29).
CTA_FIXED_US = 4.73
STAGE_US = 0.230
STAGE_ROW_US = 0.00221
FIXUP_US = 2.45
FIXUP_US_PER_MILLION = 0.427
PERSISTENT_TILE_US = 0.7
MAX_TAIL_SPLITS = 4
TAIL_FIXUP_US = 2.0
WIDE_TILE_STAGE = 0.79
WIDE_TILE_MIN_ELEMENTS = 2**25
# From K = LONG_SLICE_MIN_K, a cluster split of any count of a tile of at most 128 activation rows is reduced
# through memory instead (below that, 2-way splits only): see launch_config.
LONG_SLICE_MIN_K = 9216
# Dispatch, from the H100 sweeps of bench_wgmma.py (benchmarks/NOTES.md, v7, v8 and v11):
# - M >= DISPATCH_MIN_M (below: the small-M kernel). After the scale groups of v10e the kernel was as
#   fast as or faster than dequantization + cuBLASLt at M = 2048 and 4096 on the four Llama shapes
#   (v11a; it had lost on 4 of 6 shapes at M = 4096 in v7), so M has no upper bound;
# - at M in SMALL_WEIGHT_M, W4A16 not for weights whose element count is in [SMALL_WEIGHT_ELEMENTS)
#   (6144x4096: the Triton kernel was as fast or faster at M = 48 and 64, the kernel 3-6% faster at
#   M = 17..32, NOTES.md v16g); smaller ones are the kernel's: 4096x4096 3-8% faster than Triton at
#   M = 17..64 since v16a, 1024x4096 1.5x at M = 32 and 64 with K split 8 ways (NOTES.md v8).
#   W4A4 takes the kernel there too: after the activation quantization kernel it launches
#   programmatically, the Triton GEMM does not (that measured slower, v9c and v14c), and it was
#   1.03-1.17x faster at M = 32 and 64 (NOTES.md v14d);
# - above LARGE_M, only when the tiles fill the SMs in whole waves (WAVE_EFFICIENCY, a split tail
#   counting as the fraction of a wave it takes) without splitting K: else dequantization + cuBLASLt
#   was faster (1024x4096 at M = 1024 and 2048);
# - below DISPATCH_MIN_M, eager calls at M = 9..16 (``host_bound``) that the small-M kernel would take, on
#   weights of more than EAGER_SMALL_M_MIN_ELEMENTS (N x K) whose launch fills WAVE_EFFICIENCY of its waves. Every
#   16 weight rows of the small-M kernel re-read all M x K activations there, so its time grows as N x K x M; this
#   kernel's as N x K plus a fixed cost (launch, first data, split reduction) that a large weight amortizes, unless
#   a part-empty wave stretches it. W4A16 eager through fp4::linear, H200, us at M = 9 / 16, small-M kernel against
#   this one (NOTES.md v46b, v47a-b): taken, 28672x4096 48.0 / 72.3 against 38.1 / 37.8 (fill 0.85), 8192x8192
#   29.4 / 41.5 against 24.8 / 24.7 (0.97), 8192x28672 95.8 / 127.1 against 68.9 / 68.8, 4096x14336 (58.7M
#   elements) 24.5 / 30.1 against 23.9 / 24.4; left, 4100x8192 (33.6M elements, fill 1.0) 15.6 / 18.6 against
#   17.6 / 18.1, 6144x4096 9.9 / 12.8 against 13.7 / 13.7, and with splits of 1, 2, 4, 8 only, 10240x8192 27.5 /
#   36.6 against 38.6 / 38.6 (fill 0.61: 80 of 132 SMs) and 5120x13824 25.7 / 34.4 against 34.0 / 34.2 (0.61);
#   split 3 and 6 ways these fill 0.91, the kernel at M = 16 28.5 and 25.9 us in graphs (v47c): taken.
#   (W4A4's eager calls there run on codes.)
DISPATCH_MIN_M = 17
SMALL_WEIGHT_M = (33, 64)
SMALL_WEIGHT_ELEMENTS = (20 * 2**20, 48 * 2**20)
LARGE_M = 512
WAVE_EFFICIENCY = 0.8
EAGER_SMALL_M_MIN_ELEMENTS = 3 * 2**24  # 6144x8192


def nvcc_flags(capability: tuple[int, int] = (9, 0)) -> list[str]:
    arch = f"{capability[0]}{capability[1]}a"
    return [f"-gencode=arch=compute_{arch},code=sm_{arch}", "-O3", "-std=c++17", "-lineinfo"]


def compile_command(output: str) -> list[str]:
    """The nvcc command line of the build (used by the CPU compile test)."""
    return shared_library_command(SOURCE, output, nvcc_flags() + ["-Xptxas", "-v"])


def load_library(source: pathlib.Path, stem: str, capability: tuple[int, int] = (9, 0),
                 extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """Build (cached) and load ``source``, the kernel or a variant of it with the same C entry point
    (benchmarks/compare_builds.py times builds against each other), with its signature;
    ``extra_flags`` go to nvcc (``-DFP4C_TIMELINE``: benchmarks/timeline_wgmma.py)."""
    lib = ctypes.CDLL(str(build_shared_library(source, nvcc_flags(capability) + list(extra_flags), stem)))
    fn = lib.fp4c_nvfp4_wgmma_gemm
    fn.restype = ctypes.c_int
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    fn.argtypes = [p, i64, p, i64, p, i64, p, i64, p, p, p, p] + [i32] * 13 + [p]
    return lib


@functools.lru_cache(maxsize=None)
def _library(capability: tuple[int, int]) -> ctypes.CDLL:
    lib = load_library(SOURCE, f"nvfp4_wgmma_sm{capability[0]}{capability[1]}a", capability)
    lib.fp4c_nvfp4_wgmma_cluster_capacity.restype = ctypes.c_int
    lib.fp4c_nvfp4_wgmma_cluster_capacity.argtypes = [ctypes.c_int]
    return lib


@functools.lru_cache(maxsize=None)
def unavailable_reason(device_index: int) -> str | None:
    """Why the kernel cannot run on this CUDA device (None: it can; built on the first call)."""
    return nvcc.unavailable_reason("CUDA wgmma kernel", "FP4C_WGMMA_KERNEL", device_index, _library, CAPABILITIES)


def _tiles(m: int, n: int, bn: int, wm: int) -> int:
    """Output tiles (CTAs before any K split) of an [m, n] output with (bn, wm) tiles."""
    return math.ceil(m / bn) * math.ceil(n / (128 * wm))


def supports(weight: torch.Tensor) -> bool:
    """Can the kernel take this prepared weight (on a device where it runs; ``tiled_weight_problem``)?
    Its bf16/fp16 activations must live on the same device."""
    if weight.device.type != "cuda" or tiled_weight_problem(weight) is not None:
        return False
    index = nvcc.device_index(weight.device)
    return unavailable_reason(index) is None


class LaunchConfig(NamedTuple):
    bn: int          # activation rows per CTA
    wm: int          # weight rows per CTA / 128
    splits: int      # K splits
    workspace: bool  # splits reduced through global memory (else within a cluster)

    @property
    def label(self) -> str:
        return f"t{self.bn}x{self.wm}s{self.splits}" + ("w" if self.workspace else "")

    @classmethod
    def from_label(cls, label: str) -> LaunchConfig:
        bn, wm, splits, workspace = re.fullmatch(r"t(\d+)x(\d+)s(\d+)(w?)", label).groups()
        return cls(int(bn), int(wm), int(splits), workspace == "w")


def k_stages(k: int) -> int:
    """The main loop's stages over K."""
    return -(-k // STAGE_K)


def tail_plan(tiles: int, sms: int, k: int) -> tuple[int, int]:
    """(tail tiles, K slices each) of a persistent launch of ``tiles`` unsplit tiles on ``sms`` SMs:
    where the last wave's tiles would leave half the SMs or more idle, they are split along K so
    that their slices fill it (each slice at least MIN_STAGES_PER_SPLIT stages); else (0, 1)."""
    tail = tiles % sms
    if tiles <= sms or tail == 0:
        return 0, 1
    splits = min(sms // tail, MAX_TAIL_SPLITS, k_stages(k) // MIN_STAGES_PER_SPLIT)
    return (tail, splits) if splits >= 2 else (0, 1)


def _waves(tiles: int, sms: int, k: int) -> float:
    """Waves of an unsplit launch, a split tail counting as the fraction of a wave its slices take."""
    tail, splits = tail_plan(tiles, sms, k)
    return tiles // sms + 1 / splits if tail else math.ceil(tiles / sms)


def _slots(cfg: LaunchConfig, sms: int, cluster_ctas: dict[int, int]) -> int:
    """CTAs of this configuration that fit on the device at once."""
    return cluster_ctas[cfg.splits] if cfg.splits > 1 and not cfg.workspace else sms


def wave_fill(m: int, n: int, k: int, cfg: LaunchConfig, sms: int, cluster_ctas: dict[int, int]) -> float:
    """The fraction of its waves' CTA slots that a launch fills (an unsplit launch's split tail counting as
    the fraction of a wave it takes)."""
    tiles = _tiles(m, n, cfg.bn, cfg.wm)
    if cfg.splits == 1:
        return tiles / sms / _waves(tiles, sms, k)
    ctas, slots = tiles * cfg.splits, _slots(cfg, sms, cluster_ctas)
    return ctas / (slots * math.ceil(ctas / slots))


def _device_wave_fill(m: int, n: int, k: int, device_index: int) -> tuple[LaunchConfig, float]:
    """The device's launch configuration for this GEMM, and its ``wave_fill``."""
    cfg = device_launch_config(m, n, k, device_index)
    return cfg, wave_fill(m, n, k, cfg, num_sms(device_index), cluster_ctas(device_index))


def use_wgmma(weight: torch.Tensor, m: int, after_quantization: bool = False, host_bound: bool = False) -> bool:
    """Route an [m, K] activation times this prepared weight to the kernel? ``after_quantization``:
    the activations are the block values that the quantization kernel just wrote (W4A4).
    ``host_bound``: an eager call that the fast path of ``fast_linear`` will replay; it takes the kernel
    even where Triton (small weights at M = 33..64) or dequantization + cuBLASLt (above LARGE_M) is
    faster on the GPU, because those paths' eager calls stay in Python, at 100-300 us of host time
    each on the H100 hosts against the replay's 10-20 (NOTES.md v19); at M = 9..16 it takes those on large
    weights that the launch fills (the notes at DISPATCH_MIN_M) ahead of the small-M kernel, which ``hopper``
    asks second: exact there as from M = 17, the rows of a 32-row tile past M masked."""
    n, k = weight.shape[0], weight.shape[1] * 2
    if m < DISPATCH_MIN_M:
        eager_small_m = host_bound and cuda_small_m.DISPATCH_MAX_M < m <= cuda_small_m.MAX_M
        if not (eager_small_m and n * k > EAGER_SMALL_M_MIN_ELEMENTS and supports(weight)):
            return False
        return _device_wave_fill(m, n, k, weight.device.index or 0)[1] >= WAVE_EFFICIENCY
    small_weight = SMALL_WEIGHT_ELEMENTS[0] <= n * k < SMALL_WEIGHT_ELEMENTS[1]
    if SMALL_WEIGHT_M[0] <= m <= SMALL_WEIGHT_M[1] and small_weight and not (after_quantization or host_bound):
        return False
    if not supports(weight):
        return False
    if m > LARGE_M and not host_bound:
        cfg, fill = _device_wave_fill(m, n, k, weight.device.index or 0)
        if cfg.splits > 1 or fill < WAVE_EFFICIENCY:
            return False
    return True


def estimated_us(m: int, n: int, k: int, cfg: LaunchConfig, sms: int, cluster_ctas: dict[int, int]) -> float:
    """The cost model's time of one launch, where ``sms`` CTAs fit on the device at once alone and
    ``cluster_ctas[s]`` in clusters of s."""
    tiles = _tiles(m, n, cfg.bn, cfg.wm)
    waves = math.ceil(tiles * cfg.splits / _slots(cfg, sms, cluster_ctas))
    stages = k_stages(k)
    wide = cfg.wm == 2 and m <= cfg.bn <= 64 and n * k >= WIDE_TILE_MIN_ELEMENTS
    stage = (STAGE_US + STAGE_ROW_US * cfg.bn) * cfg.wm * (WIDE_TILE_STAGE if wide else 1.0)

    def loop(slices: int) -> float:  # the main loop over 1 / slices of K
        return math.ceil(stages / slices) * stage

    main_loop = loop(cfg.splits)
    if cfg.splits == 1 and tiles > sms:  # persistent
        tail, tail_splits = tail_plan(tiles, sms, k)
        if tail:
            return (CTA_FIXED_US + tiles // sms * (PERSISTENT_TILE_US + main_loop) + PERSISTENT_TILE_US
                    + loop(tail_splits) + TAIL_FIXUP_US)
        return CTA_FIXED_US + waves * (PERSISTENT_TILE_US + main_loop)
    cta = CTA_FIXED_US + main_loop
    fixup = FIXUP_US + FIXUP_US_PER_MILLION * m * n * cfg.splits / 1e6 if cfg.workspace else 0.0
    return waves * cta + fixup


def launch_configs(k: int, cluster_ctas: dict[int, int], splits: tuple[int, ...] = SPLITS) -> list[LaunchConfig]:
    """Every built tile and split (of ``splits``) the kernel may run K with: splits keep at least
    MIN_STAGES_PER_SPLIT stages each, and run in clusters (of CLUSTER_SPLITS) only where such a cluster fits."""
    stages = k_stages(k)
    out = []
    for bn, wm in TILES:
        out.append(LaunchConfig(bn, wm, 1, False))
        for s in splits:
            if s == 1 or stages // s < MIN_STAGES_PER_SPLIT:
                continue
            out.append(LaunchConfig(bn, wm, s, True))
            if s in CLUSTER_SPLITS and cluster_ctas.get(s, 0) > 0:
                out.append(LaunchConfig(bn, wm, s, False))
    return out


def launch_config(m: int, n: int, k: int, sms: int = 132, cluster_ctas: dict[int, int] | None = None,
                  splits: tuple[int, ...] = SPLITS) -> LaunchConfig:
    """The tile, K splits and split reduction for an [m, k] x [n, k] GEMM: the one of
    ``launch_configs`` with the least estimated time (``estimated_us``), 5- and 7-way splits only where
    ``_slice_outlasts_its_sum``. ``cluster_ctas``: CTAs that
    fit at once per cluster size (``cluster_ctas()`` of the device; without one, every SM's worth
    in whole clusters). Of equal estimates (the same CTAs, each with 256 weight rows and half the
    stages, or 128 rows and all of them), the 256-row tile where ``_prefers_256_rows``; then fewer
    splits. A 2-way split in a cluster of a tile of at most 128 activation rows is then reduced through
    memory instead: of the two, that ran 4-10% faster in nearly every cell of the H100 sweeps (NOTES.md
    v27i, v28a), which the model, charging the split through memory a fixup that it does not charge the
    cluster, does not see; over the sweeps of eight model families this took its picks from 1.020-1.053x
    the best variant to 1.015-1.028x (v29e). Leaving the cluster variant out instead made it pick other,
    slower ones. From K = LONG_SLICE_MIN_K the same holds for 4- and 8-way splits: each slice's main loop is
    long, so the SMs a cluster launch leaves idle cost more than the partial tiles' trip through L2 (over
    the sweeps of thirteen families, 1.030x -> 1.023x the best, none worse, 47 cells faster at 0.914x and 8
    slower at 1.054x; at K = 8192 the cells went both ways, v30g). ``splits``: the K split counts to choose
    from (a sweep's table compares the pick among those it timed)."""
    if cluster_ctas is None:
        cluster_ctas = {s: sms // s * s for s in (1, *CLUSTER_SPLITS)}
    pick = min((c for c in launch_configs(k, cluster_ctas, splits) if c.splits not in ODD_SPLITS
                or _slice_outlasts_its_sum(c, k)),
               key=lambda c: (estimated_us(m, n, k, c, sms, cluster_ctas), not _prefers_256_rows(c), c.splits,
                              c.workspace))
    if pick.splits > 1 and not pick.workspace and pick.bn <= 128 and (pick.splits == 2 or k >= LONG_SLICE_MIN_K):
        return pick._replace(workspace=True)
    return pick


def _slice_outlasts_its_sum(cfg: LaunchConfig, k: int) -> bool:
    """Does each K slice run a stage per SLICE_SUM_KB_PER_STAGE KB of the partial tiles its last slice sums?"""
    summed_kb = (cfg.splits - 1) * cfg.bn * 128 * cfg.wm * 4 / 1024
    return k_stages(k) / cfg.splits * SLICE_SUM_KB_PER_STAGE >= summed_kb


def _prefers_256_rows(cfg: LaunchConfig) -> bool:
    """A 256-row tile of at most 64 activation rows and 4 splits: it decoded a weight in 0.79x the
    time of a 128-row tile, which the cost model's per-row stage cost does not see, and won the
    ties measured on an H100 at 6144x4096 and 14336x4096 (M = 32, 64: up to 13% faster); with 128
    activation rows or 8 splits it lost them (14336x4096 at M = 128, 3072x4096 at M = 64 and 128:
    1.07-1.15x slower; NOTES.md v16g)."""
    return cfg.wm == 2 and cfg.bn <= 64 and cfg.splits <= 4


@functools.lru_cache(maxsize=None)
def cluster_ctas(device_index: int) -> dict[int, int]:
    """CTAs of the kernel that fit on the device at once, per split count (the splits of a tile are
    one cluster, and clusters must fit within one GPC)."""
    lib = _library(torch.cuda.get_device_capability(device_index))
    out = {1: num_sms(device_index)}
    with torch.cuda.device(device_index):
        for s in CLUSTER_SPLITS:
            clusters = lib.fp4c_nvfp4_wgmma_cluster_capacity(s)
            out[s] = max(clusters, 0) * s  # an error: never split that way
    return out


def tuned_launch_config(m: int, n: int, k: int, sms: int, capability: tuple[int, int],
                        cluster_ctas: dict[int, int],
                        measured: wgmma_tables.Picks | None = None,
                        model: LaunchConfig | None = None) -> LaunchConfig | None:
    """The configuration measured fastest for this layer shape and M where the cost model's pick ran a
    margin (2%) or more slower, or None (the cost model's pick). ``measured``: the device's own table
    (``fp4c tune``; ``wgmma_tables.device_picks``), which decides wherever it covers the shape and M,
    even where it keeps the cost model's pick; else the H100 table built into the package
    (``tuned_wgmma_h100``, NOTES.md v28-v30) on a device like the one it was measured on. Their
    entries follow no one pattern that a rule of the model would capture (a re-fit of its constants
    did not find better picks overall, v28b; the rules that held across all the families swept are in
    ``launch_config``): mostly other tiles and split counts than the model's, shape by shape. A table has
    no say where the model picks a K split count its sweep did not time (``ShapePicks.splits``: the built-in
    table's sweeps predate the 3- and 6-way splits, whose picks ran faster than its entries, NOTES.md v47c).
    ``model``: the cost model's pick (``launch_config``), where the caller has it."""
    for picks in (measured or {}, wgmma_tables.builtin_picks(sms, tuple(capability))):
        entry = picks.get((n, k))
        if entry is not None and entry.covers(m):
            model = model or launch_config(m, n, k, sms, cluster_ctas)
            if model.splits not in entry.splits:
                return None
            label = entry.at(m)
            if label is None:
                return None
            cfg = LaunchConfig.from_label(label)
            return cfg if cfg in launch_configs(k, cluster_ctas) else None  # a cluster the device cannot fit
    return None


@functools.lru_cache(maxsize=1 << 16)  # every M of every layer shape a server sees
def device_launch_config(m: int, n: int, k: int, device_index: int) -> LaunchConfig:
    """``tuned_launch_config`` (the device's own table, then the built-in one), else ``launch_config``,
    for the device's SMs and cluster capacity (cached: the search over tiles and splits costs about as
    much host time as an eager launch)."""
    sms, clusters = num_sms(device_index), cluster_ctas(device_index)
    model = launch_config(m, n, k, sms, clusters)
    return (tuned_launch_config(m, n, k, sms, nvcc.device_capability(device_index), clusters,
                                wgmma_tables.device_picks(device_index), model)
            or model)


def forget_measured_tables() -> None:
    """Re-read the device tables on the next launch (after ``fp4c tune`` wrote one in this process): the
    cached picks, and the eager fast path's plans made from them."""
    from . import fast_linear  # (it imports this module)

    wgmma_tables.device_picks.cache_clear()
    device_launch_config.cache_clear()
    fast_linear.forget_plans()


class LaunchParams(NamedTuple):
    """One launch's tile, K split and split tail, and the buffers a split through memory needs."""
    bn: int
    wm: int
    splits: int
    workspace: bool
    tail: int          # persistent launches: the last tail tiles split along K ...
    tail_splits: int   # ... into this many slices
    fixup_floats: int  # fp32 partial tiles of every slice but a tile's last (0: no split through memory)
    tickets: int       # one per tile split through memory


def launch_params(m: int, n: int, k: int, device_index: int, out_dtype: torch.dtype,
                  tile: tuple[int, int] | None = None, splits: int | None = None, workspace: bool | None = None,
                  split_tail: bool = True) -> LaunchParams:
    """The launch of an [m, k] x [n, k] call (``wgmma_gemm``'s overrides applied to
    ``device_launch_config``), with what its K split through global memory needs."""
    auto = device_launch_config(m, n, k, device_index)
    bn, wm = tile if tile is not None else (auto.bn, auto.wm)
    splits = splits or auto.splits
    workspace = auto.workspace if workspace is None else workspace
    tiles = _tiles(m, n, bn, wm)
    tail, tail_splits, split_tiles, slices = 0, 1, 0, 1
    if workspace and splits > 1:
        split_tiles, slices = tiles, splits
    elif split_tail and splits == 1 and out_dtype != torch.float32:  # (the persistent kernel's cases)
        tail, tail_splits = tail_plan(tiles, num_sms(device_index), k)
        split_tiles, slices = tail, tail_splits
    fixup_floats = split_tiles * (slices - 1) * bn * 128 * wm
    return LaunchParams(bn, wm, splits, workspace, tail, tail_splits, fixup_floats, split_tiles if fixup_floats else 0)


def wgmma_gemm(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, alpha: torch.Tensor, *,
               n: int, out_dtype: torch.dtype, bias: torch.Tensor | None = None,
               tile: tuple[int, int] | None = None, splits: int | None = None,
               workspace: bool | None = None, split_tail: bool = True,
               library: ctypes.CDLL | None = None) -> torch.Tensor:
    """out [M, n] = (x @ dequant(w)^T) * alpha (+ bias).

    ``x``: bf16/fp16 [M, K] (K a multiple of 16, at most the weight's padded K, which must be a
    multiple of 256); the weight in the Hopper layout (uint8 [Np, Kp/2], e4m3 [Np, Kp/16]);
    ``alpha`` one float32 on the device; ``out_dtype`` x.dtype or float32. Fed NVFP4 block values,
    this is the exact W4A4 product. ``tile`` (one of TILES), ``splits`` and ``workspace`` (reduce
    the splits through global memory rather than in a cluster) override ``launch_config``,
    ``split_tail=False`` keeps a persistent launch's last wave whole (``tail_plan``), and
    ``library`` (from ``load_library``) the package's build (benchmark variants). Launched with
    programmatic dependent launch where ``pdl.use_pdl`` says so.
    """
    x, weight_scale, alpha, bias = nvcc.gemm_operands("CUDA wgmma kernel", x, weight, weight_scale, alpha, bias,
                                                      out_dtype)
    m, k = x.shape
    np_, kp = weight.shape[0], weight.shape[1] * 2
    # its scales are copied 4 bytes at a time where their base is not 16-byte aligned (else by TMA)
    problem = tiled_weight_problem(weight, weight_scale, scale_alignment=4)
    if problem is not None:
        raise ValueError(problem)
    if m < 1 or k % 16 or k > kp or n > np_:
        raise ValueError(f"bad shapes: x {tuple(x.shape)}, weight {tuple(weight.shape)}, n={n} "
                         f"(K a multiple of 16 within the weight's K)")
    if tile is not None and tuple(tile) not in TILES:
        raise ValueError(f"tile must be one of {TILES}, got {tile}")
    if splits is not None and not 1 <= splits <= MAX_SPLITS:
        raise ValueError(f"splits must be 1..{MAX_SPLITS}, got {splits}")
    launch = launch_params(m, n, k, x.device.index or 0, out_dtype, tile, splits, workspace, split_tail)
    bn, wm, splits, workspace, tail, tail_splits = (launch.bn, launch.wm, launch.splits, launch.workspace,
                                                    launch.tail, launch.tail_splits)
    out = torch.empty((m, n), dtype=out_dtype, device=x.device)
    fixup = tickets = None
    if launch.fixup_floats:
        fixup = torch.empty(launch.fixup_floats, dtype=torch.float32, device=x.device)
        tickets = split_tickets(x.device, launch.tickets)
    err = nvcc.launch_on(x.device, lambda capability, stream: (library or _library(capability)).fp4c_nvfp4_wgmma_gemm(
        x.data_ptr(), x.stride(0), weight.data_ptr(), weight.stride(0), weight_scale.data_ptr(),
        weight_scale.stride(0), out.data_ptr(), out.stride(0), fixup.data_ptr() if fixup is not None else None,
        tickets.data_ptr() if tickets is not None else None, bias.data_ptr() if bias is not None else None,
        alpha.data_ptr(), m, n, np_, k, kp, int(x.dtype == torch.float16), int(out_dtype == torch.float32),
        bn, wm, splits, tail, tail_splits, int(use_pdl(x.device)), stream))
    if err != 0:
        raise RuntimeError(f"fp4c_nvfp4_wgmma_gemm failed: CUDA error {err} (M={m}, N={n}, K={k}, tile=({bn}, {wm}), "
                           f"splits={splits}, workspace={workspace}, tail={tail}x{tail_splits})")
    return out
