"""The C++ extension is built in the test environment (unless the build was skipped on purpose).

Tests of the ``cpp`` backends skip when ``peftcore._C`` is missing, so that a checkout without a
compiler still runs the rest; this test makes a silently failed build visible instead of letting
those skips hide it.
"""

from __future__ import annotations

import os

import pytest

from peftcore.ops import _extension


@pytest.mark.skipif(os.environ.get("PEFTCORE_NO_EXT", "").strip() in {"1", "true", "yes"},
                    reason="PEFTCORE_NO_EXT asks for a build without the extension")
def test_the_extension_is_built_and_loads():
    ok, reason = _extension.load()
    assert ok, f"peftcore._C did not load: {reason}"
