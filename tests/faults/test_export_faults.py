"""Exporter faults: a parity check never passes on nothing."""

from __future__ import annotations

import pytest

from export.common import parse_parity_batches


@pytest.mark.parametrize("text", ["0", "1,0", "-2", "", "a,b"])
def test_parity_batches_that_compare_nothing_are_refused(text):
    with pytest.raises(ValueError, match="--parity-batches"):
        parse_parity_batches(text)
    assert parse_parity_batches("1,7") == (1, 7) and parse_parity_batches(None) is None
