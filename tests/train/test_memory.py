"""Peak-RSS measurement: a large allocation shows in the peak, and the peak can be reset."""

import sys

import pytest

from peftcore.train import memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="resetting the peak RSS is Linux-only")
def test_peak_sees_an_allocation_and_resets():
    assert memory.reset_peak()
    base = memory.peak_rss_mib()
    block = bytearray(200 * 1024 * 1024)  # 200 MiB, touched
    for i in range(0, len(block), 4096):
        block[i] = 1
    assert memory.peak_rss_mib() >= base + 150
    del block
    assert memory.reset_peak()
    assert memory.peak_rss_mib() < base + 100
    assert memory.rss_mib() > 0
