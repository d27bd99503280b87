"""The RFC 3339 form of a millisecond timestamp, against datetime's own."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from flashsale.clock import rfc3339

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
LAST_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z


@given(st.integers(min_value=0, max_value=LAST_MS))
def test_rfc3339_is_datetimes_utc_form_to_the_millisecond(ms: int) -> None:
    expected = (EPOCH + timedelta(milliseconds=ms)).isoformat(timespec="milliseconds")
    assert rfc3339(ms) == expected.replace("+00:00", "Z")


def test_rfc3339_of_known_instants() -> None:
    assert rfc3339(0) == "1970-01-01T00:00:00.000Z"
    assert rfc3339(1_764_547_200_123) == "2025-12-01T00:00:00.123Z"
    assert rfc3339(LAST_MS) == "9999-12-31T23:59:59.999Z"
