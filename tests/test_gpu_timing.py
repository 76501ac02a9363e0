"""How ``gpu_timing.time_graphs_us`` times a graph, checked with stand-ins for CUDA graphs and events (no GPU).

Each turn's timed replays are queued back to back behind one untimed replay, as a decode loop issues them, and
nothing waits between them (benchmarks/NOTES.md v31c, v32a).
"""

from __future__ import annotations

import pytest
import torch

from fp4_compile.ops import gpu_timing


class Recorder:
    """The stream of what the timing enqueues, with a fake clock: each replay takes ``n`` us (1 us a call)."""

    def __init__(self):
        self.log: list[str] = []
        self.clock = 0.0

    def graph(self, name: str, n: int):
        recorder = self

        class Graph:
            def replay(self):
                recorder.log.append(f"replay {name}")
                recorder.clock += n

        return Graph()

    def events(self):
        recorder = self

        class Event:
            def record(self):
                recorder.log.append("record")
                self.t = recorder.clock

            def synchronize(self):
                recorder.log.append("sync")

            def elapsed_time(self, end):  # ms
                return (end.t - self.t) / 1000.0

        return Event(), Event()


@pytest.fixture
def recorder(monkeypatch):
    rec = Recorder()
    names = iter(["a", "b"])
    monkeypatch.setattr(gpu_timing, "capture_graph", lambda calls: rec.graph(next(names), len(calls)))
    monkeypatch.setattr(gpu_timing, "cuda_events", rec.events)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: rec.log.append("device sync"))
    return rec


def test_replays_are_queued_behind_an_untimed_one(recorder):
    times = gpu_timing.time_graphs_us({"a": [None] * 4, "b": [None] * 2}, rounds=2, replays=3, warmup=1)
    assert times == {"a": 1.0, "b": 1.0}  # per call: replay time / calls
    turn = lambda name: [f"replay {name}"] + ["record", f"replay {name}", "record"] * 3 + ["sync"]  # noqa: E731
    assert recorder.log == ["replay a", "replay b", "device sync"] + (turn("a") + turn("b")) * 2
