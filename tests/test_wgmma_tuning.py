"""The wgmma kernel's launch tables on a machine without a GPU: a device's own table (``fp4c tune``)
written, merged and read back, which table decides a launch, and the picks chosen from timings."""

from __future__ import annotations

import json

import pytest

from fp4_compile.ops import cuda_wgmma, gpu_timing, tuned_wgmma_h100, wgmma_tables, wgmma_tuning
from fp4_compile.ops.wgmma_tables import ShapePicks

H100_CLUSTERS = tuned_wgmma_h100.CLUSTER_CTAS
H100 = {"gpu": "NVIDIA H100 80GB HBM3", "sms": 132, "capability": [9, 0]}


def _other_label(m: int, n: int, k: int, clusters=H100_CLUSTERS, workspace: bool | None = None) -> str:
    """A launch configuration the cost model does not pick at this cell."""
    model = cuda_wgmma.launch_config(m, n, k, 132, clusters)
    return next(c.label for c in cuda_wgmma.launch_configs(k, clusters)
                if c != model and (workspace is None or (c.splits > 1 and c.workspace == workspace)))


def test_table_round_trip_and_merge(tmp_path):
    path = tmp_path / "t.json"
    a = {(4096, 4096): ShapePicks((32, 64), ("t64x1s4w", None))}
    b = {(1024, 4096): ShapePicks((17,), ("t32x1s8w",)), (4096, 4096): ShapePicks((64,), (None,))}
    assert wgmma_tables.write_table(path, H100, a) == a
    meta, picks = wgmma_tables.read_table(path)
    assert picks == a and all(meta[key] == value for key, value in H100.items())
    # a second tune of the same device keeps the shapes it did not measure, replaces those it did
    assert wgmma_tables.write_table(path, H100, b) == b
    assert wgmma_tables.read_table(path)[1] == b
    c = {(2048, 2048): ShapePicks((17,), (None,), cuda_wgmma.SPLITS)}  # a shape of a sweep with every split count
    assert wgmma_tables.write_table(path, H100, c) == {**b, **c}
    assert wgmma_tables.read_table(path)[1] == {**b, **c}
    # a table written before the split counts were recorded: its sweeps timed the powers of two
    data = json.loads(path.read_text())
    del data["shapes"]["2048x2048"]["splits"]
    path.write_text(json.dumps(data))
    assert wgmma_tables.read_table(path)[1][(2048, 2048)].splits == (1, 2, 4, 8)
    # another device's table is replaced, not merged; so is one measured on another build of the kernel
    h200 = {**H100, "gpu": "NVIDIA H200"}
    assert wgmma_tables.write_table(path, h200, a) == a
    assert wgmma_tables.write_table(path, {**h200, "kernel": "another build"}, b) == b
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("content", [
    "not json",
    json.dumps({"format": 99, "shapes": {}}),
    json.dumps({"format": 1, "shapes": {"4096": {"m_grid": [17], "labels": [None]}}}),
    json.dumps({"format": 1, "shapes": {"4096x4096": {"m_grid": [64, 32], "labels": [None, None]}}}),
    json.dumps({"format": 1, "shapes": {"4096x4096": {"m_grid": [32], "labels": []}}}),
    json.dumps({"format": 1}),
])
def test_read_table_names_the_file_it_cannot_read(tmp_path, content):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match="bad.json: not a wgmma launch table"):
        wgmma_tables.read_table(path)


def test_table_path_is_per_gpu_name_unless_the_environment_names_one(monkeypatch, tmp_path):
    monkeypatch.delenv("FP4C_WGMMA_TABLE", raising=False)
    monkeypatch.setenv("FP4C_BUILD_DIR", str(tmp_path))
    assert wgmma_tables.table_path("NVIDIA H100 80GB HBM3", 132) == tmp_path / "wgmma_table_NVIDIA_H100_80GB_HBM3_132sm.json"
    assert wgmma_tables.table_path("NVIDIA H200", 132) != wgmma_tables.table_path("NVIDIA H100 80GB HBM3", 132)
    monkeypatch.setenv("FP4C_WGMMA_TABLE", str(tmp_path / "mine.json"))
    assert wgmma_tables.table_path("NVIDIA H100 80GB HBM3", 132) == tmp_path / "mine.json"


def test_the_device_table_decides_where_it_covers_the_call():
    builtin = wgmma_tables.builtin_picks(132, (9, 0))
    (n, k), entry = next((nk, e) for nk, e in builtin.items() if any(e.labels))
    at = next(i for i, label in enumerate(entry.labels) if label)
    m = entry.m_grid[at]
    builtin_cfg = cuda_wgmma.LaunchConfig.from_label(entry.labels[at])
    assert cuda_wgmma.tuned_launch_config(m, n, k, 132, (9, 0), H100_CLUSTERS) == builtin_cfg
    mine = _other_label(m, n, k)
    measured = {(n, k): ShapePicks((m,), (mine,))}
    assert cuda_wgmma.tuned_launch_config(m, n, k, 132, (9, 0), H100_CLUSTERS, measured).label == mine
    # the device's table keeping the cost model's pick overrides the built-in pick too
    assert cuda_wgmma.tuned_launch_config(m, n, k, 132, (9, 0), H100_CLUSTERS, {(n, k): ShapePicks((m,), (None,))}) is None
    # beyond its grid, or for another shape, the built-in table (or the model) again
    assert cuda_wgmma.tuned_launch_config(m, n, k, 132, (9, 0), H100_CLUSTERS,
                                          {(n, k): ShapePicks((m - 1,), (mine,))}) == builtin_cfg
    assert cuda_wgmma.tuned_launch_config(m, n, k, 132, (9, 0), H100_CLUSTERS,
                                          {(n + 32, k): ShapePicks((m,), (mine,))}) == builtin_cfg
    # on another kind of device only its own table applies
    assert cuda_wgmma.tuned_launch_config(m, n, k, 114, (9, 0), H100_CLUSTERS) is None
    assert cuda_wgmma.tuned_launch_config(m, n, k, 114, (9, 0), H100_CLUSTERS, measured).label == mine


def test_a_table_has_no_say_where_the_model_picks_a_split_count_its_sweep_did_not_time():
    """The built-in table's sweeps timed K splits of 1, 2, 4 and 8; at 10240x8192 M=128 it took t128x2s2w over
    the model's pick of then, where the model now picks a 3-way split (measured faster, NOTES.md v47c)."""
    n, k, m = 10240, 8192, 128
    assert tuned_wgmma_h100.SPLITS == wgmma_tables.POWER_OF_TWO_SPLITS
    assert wgmma_tables.builtin_picks(132, (9, 0))[(n, k)].at(m) == "t128x2s2w"
    assert cuda_wgmma.launch_config(m, n, k, 132, H100_CLUSTERS).label == "t128x2s3w"
    assert cuda_wgmma.tuned_launch_config(m, n, k, 132, (9, 0), H100_CLUSTERS) is None  # the model's pick
    timed_all = {(n, k): ShapePicks((m,), ("t128x2s2w",), cuda_wgmma.SPLITS)}
    assert cuda_wgmma.tuned_launch_config(m, n, k, 132, (9, 0), H100_CLUSTERS, timed_all).label == "t128x2s2w"
    # where the model's pick is a split count the table timed, its entry decides as before
    assert cuda_wgmma.launch_config(128, 4096, 14336, 132, H100_CLUSTERS).splits in tuned_wgmma_h100.SPLITS


def test_merged_sweeps_count_only_the_splits_every_one_timed():
    old, new = _sweep([]), _sweep([])
    new["env"] = {**new["env"], "splits": list(cuda_wgmma.SPLITS)}
    assert wgmma_tuning.timed_splits(old["env"]) == (1, 2, 4, 8)
    assert wgmma_tuning.timed_splits(wgmma_tuning.merge_cells([new])[0]) == cuda_wgmma.SPLITS
    assert wgmma_tuning.timed_splits(wgmma_tuning.merge_cells([new, old])[0]) == (1, 2, 4, 8)


def test_a_measured_cluster_the_device_cannot_fit_is_never_launched():
    n, k, m = 4096, 4096, 64
    cluster = _other_label(m, n, k, workspace=False)
    measured = {(n, k): ShapePicks((m,), (cluster,))}
    assert cuda_wgmma.tuned_launch_config(m, n, k, 132, (9, 0), H100_CLUSTERS, measured).label == cluster
    no_clusters = {1: 132, **{s: 0 for s in cuda_wgmma.CLUSTER_SPLITS}}
    assert cuda_wgmma.tuned_launch_config(m, n, k, 132, (9, 0), no_clusters, measured) is None


def test_device_picks_reads_only_a_table_of_this_device(monkeypatch, tmp_path):
    path = tmp_path / "table.json"
    monkeypatch.setenv("FP4C_WGMMA_TABLE", str(path))
    monkeypatch.setattr(wgmma_tables, "device_identity", lambda index: dict(H100))
    here = {**H100, "kernel": wgmma_tables.kernel_build()}
    assert wgmma_tables.table_identity(0) == here
    picks = {(4096, 4096): ShapePicks((32,), ("t32x1s4w",))}
    try:
        wgmma_tables.device_picks.cache_clear()
        assert wgmma_tables.device_picks(0) == {}  # no table yet
        wgmma_tables.write_table(path, here, picks)
        wgmma_tables.device_picks.cache_clear()
        assert wgmma_tables.device_picks(0) == picks
        wgmma_tables.write_table(path, {**here, "sms": 114}, picks)
        wgmma_tables.device_picks.cache_clear()
        with pytest.warns(UserWarning, match="measured on"):
            assert wgmma_tables.device_picks(0) == {}
        for stale in ({**here, "kernel": "0123456789abcdef"}, H100):  # another build; a table from before builds
            wgmma_tables.write_table(path, stale, picks)
            wgmma_tables.device_picks.cache_clear()
            with pytest.warns(UserWarning, match="another build of the wgmma kernel.*fp4c tune"):
                assert wgmma_tables.device_picks(0) == {}
        path.write_text("{")
        wgmma_tables.device_picks.cache_clear()
        with pytest.warns(UserWarning, match="not a wgmma launch table"):
            assert wgmma_tables.device_picks(0) == {}
    finally:
        wgmma_tables.device_picks.cache_clear()


def _sweep(cells: list[dict]) -> dict:
    env = {"gpu": H100["gpu"], "sms": 132, "cluster_ctas": {str(s): c for s, c in H100_CLUSTERS.items()}}
    return {"env": env, "cells": cells}


def test_picks_from_timings_keep_the_model_within_the_margin():
    n, k = 4096, 4096
    cells, others = [], []
    for m, factor in ((32, 1.01), (64, 1.10)):  # the model's pick 1% slower (kept), 10% (overridden)
        model = cuda_wgmma.launch_config(m, n, k, 132, H100_CLUSTERS).label
        others.append(_other_label(m, n, k))
        for mode, extra in (("w4a16", 1.0), ("w4a4", 1.05)):
            cells.append({"n": n, "k": k, "m": m, "mode": mode,
                          "us": {model: 10.0 * factor * extra, others[-1]: 10.0 * extra}})
    env, merged = wgmma_tuning.merge_cells([_sweep(cells)])
    picks, lines = wgmma_tuning.picks_from_cells(env, merged, margin=0.02)
    assert picks == {(n, k): {32: None, 64: others[1]}} and len(lines) == 1
    assert wgmma_tuning.shape_picks(picks[(n, k)], (1, 2, 4, 8)) == ShapePicks((32, 64), (None, others[1]))
    assert wgmma_tuning.model_slowdowns(env, merged) == pytest.approx([1.01, 1.01, 1.10, 1.10])
    assert wgmma_tuning.table_slowdowns(env, merged, picks) == pytest.approx([1.01, 1.01, 1.0, 1.0])
    assert gpu_timing.geomean([1.0, 4.0]) == pytest.approx(2.0)


def test_an_override_may_not_slow_one_mode_down_beyond_the_tolerance():
    n, k, m = 4096, 4096, 64
    model = cuda_wgmma.launch_config(m, n, k, 132, H100_CLUSTERS).label
    other = _other_label(m, n, k)
    cells = [{"n": n, "k": k, "m": m, "mode": "w4a16", "us": {model: 10.0, other: 8.0}},
             {"n": n, "k": k, "m": m, "mode": "w4a4", "us": {model: 10.0, other: 10.3}}]  # 3% slower
    env, merged = wgmma_tuning.merge_cells([_sweep(cells)])
    assert wgmma_tuning.picks_from_cells(env, merged)[0] == {(n, k): {m: None}}


def test_merge_averages_one_build_and_keeps_only_the_latest_build_of_a_cell():
    def sweep(kernel, us, m=64):
        s = _sweep([{"n": 4096, "k": 4096, "m": m, "mode": "w4a16", "us": us}])
        if kernel:
            s["env"] = {**s["env"], "kernel": kernel}
        return s

    old_a, old_b = sweep(None, {"a": 4.0, "b": 10.0}), sweep(None, {"a": 9.0, "b": 10.0, "c": 1.0})
    old_other_m = sweep(None, {"a": 7.0}, m=128)
    new = sweep("digest1", {"a": 5.0, "b": 8.0})
    _, merged = wgmma_tuning.merge_cells([old_a, old_b, old_other_m])
    assert merged[(4096, 4096, 64)]["w4a16"] == pytest.approx({"a": 6.0, "b": 10.0})  # geomean, common labels
    _, merged = wgmma_tuning.merge_cells([old_a, old_b, old_other_m, new])
    assert merged[(4096, 4096, 64)]["w4a16"] == pytest.approx({"a": 5.0, "b": 8.0})  # the old build's times dropped
    assert merged[(4096, 4096, 128)]["w4a16"] == pytest.approx({"a": 7.0})  # a cell not timed again keeps its times
    _, merged = wgmma_tuning.merge_cells([new, sweep("digest1", {"a": 20.0, "b": 2.0})])
    assert merged[(4096, 4096, 64)]["w4a16"] == pytest.approx({"a": 10.0, "b": 4.0})


def test_merge_refuses_sweeps_of_another_device():
    in_process = _sweep([])  # a sweep just timed keys its cluster capacity by int, one read from JSON by str
    in_process["env"] = {**in_process["env"], "cluster_ctas": dict(H100_CLUSTERS)}
    assert wgmma_tuning.merge_cells([_sweep([]), in_process]) == ({**_sweep([])["env"], "splits": [1, 2, 4, 8]}, {})
    other = _sweep([])
    other["env"] = {**other["env"], "sms": 114}
    with pytest.raises(ValueError, match="another device"):
        wgmma_tuning.merge_cells([_sweep([]), other])


def test_the_tuning_grid_is_the_builtin_tables():
    assert wgmma_tuning.M_GRID == tuned_wgmma_h100.M_GRID
    assert wgmma_tuning.MARGIN == tuned_wgmma_h100.MARGIN


def test_tune_command_writes_the_table_of_its_timings(monkeypatch, tmp_path, capsys):
    """``fp4c tune`` after its sweep (stood in for: no GPU here): the summary, the table, the caches reset."""
    import torch

    from fp4_compile import cli

    n, k = 4096, 4096
    cells = []
    for m, factor in ((17, 1.0), (32, 1.25)):
        model = cuda_wgmma.launch_config(m, n, k, 132, H100_CLUSTERS).label
        cells += [{"n": n, "k": k, "m": m, "mode": mode, "us": {model: 10.0 * factor, _other_label(m, n, k): 10.0}}
                  for mode in ("w4a16", "w4a4")]
    swept = _sweep(cells)
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda_wgmma.nvcc, "device_index", lambda device: 0)
    monkeypatch.setattr(cuda_wgmma, "unavailable_reason", lambda index: None)
    monkeypatch.setattr(wgmma_tables, "device_identity", lambda index: dict(H100))
    monkeypatch.setattr(wgmma_tuning, "sweep", lambda *args, **kwargs: calls.append(args) or iter([swept]))
    monkeypatch.setenv("FP4C_BUILD_DIR", str(tmp_path))
    monkeypatch.delenv("FP4C_WGMMA_TABLE", raising=False)
    assert cli.main(["tune", "--shapes", f"{n}x{k}", "--ms", "17,32", "-q"]) == 0
    out = capsys.readouterr().out
    assert calls == [([(n, k)], (17, 32), ("w4a16", "w4a4"), 3, torch.device("cuda"))]
    path = wgmma_tables.table_path(H100["gpu"], H100["sms"])
    assert f"wrote {path} (1 layer shapes): read by every later process on a {H100['gpu']}" in out
    assert "the cost model's picks 1.118x the best (worst 1.25x), the table's 1.000x on the same timings; 1 of 2 M overridden" in out
    assert "all 1 shape(s): the cost model's picks 1.118x" in out
    meta, picks = wgmma_tables.read_table(path)
    assert picks == {(n, k): ShapePicks((17, 32), (None, _other_label(32, n, k)))}
    assert meta["margin"] == 0.02 and meta["modes"] == ["w4a16", "w4a4"]
    assert meta["kernel"] == wgmma_tables.kernel_build()  # the table holds for this build of the kernel


def test_an_interrupted_tune_keeps_the_shapes_it_finished(monkeypatch, tmp_path, capsys):
    import torch

    from fp4_compile import cli

    def one_shape(n, k):
        m = 17
        return _sweep([{"n": n, "k": k, "m": m, "mode": mode,
                        "us": {cuda_wgmma.launch_config(m, n, k, 132, H100_CLUSTERS).label: 12.0,
                               _other_label(m, n, k): 10.0}} for mode in ("w4a16", "w4a4")])

    def interrupted_sweep(shapes, *args, **kwargs):
        yield one_shape(*shapes[0])
        raise KeyboardInterrupt

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda_wgmma.nvcc, "device_index", lambda device: 0)
    monkeypatch.setattr(cuda_wgmma, "unavailable_reason", lambda index: None)
    monkeypatch.setattr(wgmma_tables, "device_identity", lambda index: dict(H100))
    monkeypatch.setattr(wgmma_tuning, "sweep", interrupted_sweep)
    path = tmp_path / "table.json"
    assert cli.main(["tune", "--shapes", "1024x4096", "4096x4096", "--ms", "17", "--out", str(path),
                     "--sweep-json", str(tmp_path / "sweep.json"), "-q"]) == 130
    assert "fp4c tune: interrupted" in capsys.readouterr().err
    assert wgmma_tables.read_table(path)[1] == {(1024, 4096): ShapePicks((17,), (_other_label(17, 1024, 4096),))}
    assert len(json.loads((tmp_path / "sweep.json").read_text())["cells"]) == 2
