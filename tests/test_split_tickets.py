"""The split-K tickets (ops/split_tickets.py): zeroed regions of one buffer per device, taken in turn."""

import pytest
import torch

from fp4_compile.ops import split_tickets


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(split_tickets, "_buffers", {})
    monkeypatch.setattr(split_tickets, "_next", {})
    monkeypatch.setattr(split_tickets, "ENTRIES", 100)


def test_calls_take_disjoint_zeroed_regions_of_one_buffer(fresh):
    cpu = torch.device("cpu")
    split_tickets.reserve(cpu)
    buf = split_tickets._buffers[("cpu", None)]
    a = split_tickets.split_tickets(cpu, 30)
    b = split_tickets.split_tickets(cpu, 50)
    assert a.dtype == torch.int32 and int(a.abs().sum()) == 0 and int(b.abs().sum()) == 0
    assert a.data_ptr() == buf.data_ptr() and b.data_ptr() == buf.data_ptr() + 30 * 4
    c = split_tickets.split_tickets(cpu, 30)  # 80 + 30 > 100: from the start again
    assert c.data_ptr() == buf.data_ptr() and c.numel() == 30


def test_a_count_beyond_the_buffer_gets_a_fresh_zeroed_tensor(fresh):
    cpu = torch.device("cpu")
    split_tickets.reserve(cpu)
    big = split_tickets.split_tickets(cpu, 101)
    assert big.numel() == 101 and int(big.abs().sum()) == 0
    assert big.data_ptr() != split_tickets._buffers[("cpu", None)].data_ptr()
    with pytest.raises(ValueError, match="positive"):
        split_tickets.split_tickets(cpu, 0)
