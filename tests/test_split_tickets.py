"""The split-K tickets (ops/split_tickets.py): zeroed regions per device, eager calls' taken in turn from a
ring, captured calls' never handed out again."""

import pytest
import torch

from fp4_compile.ops import split_tickets

CPU = torch.device("cpu")


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(split_tickets, "_buffers", {})
    monkeypatch.setattr(split_tickets, "ENTRIES", 100)
    monkeypatch.setattr(split_tickets, "CAPTURE_ENTRIES", 50)


def capture(monkeypatch, on: bool):
    monkeypatch.setattr(split_tickets, "_capturing", lambda device: on)


def test_calls_take_disjoint_zeroed_regions_of_one_buffer(fresh):
    split_tickets.reserve(CPU)
    ring = split_tickets._buffers[("cpu", None)].ring
    a = split_tickets.split_tickets(CPU, 30)
    b = split_tickets.split_tickets(CPU, 50)
    assert a.dtype == torch.int32 and int(a.abs().sum()) == 0 and int(b.abs().sum()) == 0
    assert a.data_ptr() == ring.data_ptr() and b.data_ptr() == ring.data_ptr() + 30 * 4
    c = split_tickets.split_tickets(CPU, 30)  # 80 + 30 > 100: from the start again
    assert c.data_ptr() == ring.data_ptr() and c.numel() == 30


def test_a_count_beyond_the_buffer_gets_a_fresh_zeroed_tensor(fresh):
    split_tickets.reserve(CPU)
    big = split_tickets.split_tickets(CPU, 101)
    assert big.numel() == 101 and int(big.abs().sum()) == 0
    assert big.data_ptr() != split_tickets._buffers[("cpu", None)].ring.data_ptr()
    with pytest.raises(ValueError, match="positive"):
        split_tickets.split_tickets(CPU, 0)


def test_captured_regions_are_never_handed_out_again(fresh, monkeypatch):
    """A graph keeps its counters for its life and may replay beside anything: eager calls wrapping their ring
    must not reach them, nor later captures."""
    split_tickets.reserve(CPU)
    tickets = split_tickets._buffers[("cpu", None)]
    capture(monkeypatch, True)
    g1 = split_tickets.split_tickets(CPU, 20)
    g2 = split_tickets.split_tickets(CPU, 20)
    assert g1.data_ptr() == tickets.captured.data_ptr() and g2.data_ptr() == g1.data_ptr() + 20 * 4
    capture(monkeypatch, False)
    captured = range(tickets.captured.data_ptr(), tickets.captured.data_ptr() + 50 * 4)
    for _ in range(10):  # the ring wraps several times
        t = split_tickets.split_tickets(CPU, 30)
        assert t.data_ptr() not in captured
    capture(monkeypatch, True)
    with pytest.warns(UserWarning, match="spent"):
        own = split_tickets.split_tickets(CPU, 20)  # 40 + 20 > 50
    assert own.numel() == 20 and int(own.abs().sum()) == 0 and own.data_ptr() not in captured
    assert split_tickets.split_tickets(CPU, 10).data_ptr() == g2.data_ptr() + 20 * 4  # what is left still serves


def test_a_capture_before_any_reservation_zeroes_its_own(fresh, monkeypatch):
    capture(monkeypatch, True)
    t = split_tickets.split_tickets(CPU, 7)
    assert t.numel() == 7 and int(t.abs().sum()) == 0 and not split_tickets._buffers
