"""Gateway helpers decided without I/O: Prefer, Idempotency-Key, webhook signatures."""

from __future__ import annotations

import hashlib
import hmac
import time

import pytest
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from gateway.errors import ProblemError
from gateway.handlers import SIGNATURE_TOLERANCE_S, verify_signature
from gateway.submit import Preference, fingerprint, idempotency_key

DEFAULT, MAXIMUM = 5.0, 60.0


# --- Prefer (RFC 7240) ------------------------------------------------------------------

@pytest.mark.parametrize(("headers", "wait", "applied"), [
    ([], DEFAULT, None),
    (["wait=3"], 3.0, "wait=3"),
    (["wait=0"], 0.0, "wait=0"),
    (["wait=2.5"], 2.5, "wait=2.5"),
    (['wait="4"'], 4.0, "wait=4"),
    (["respond-async"], 0.0, "respond-async"),
    (["Respond-Async"], 0.0, "respond-async"),
    (["respond-async, wait=10"], 10.0, "respond-async, wait=10"),
    (["wait=10", "respond-async"], 10.0, "respond-async, wait=10"),
    (["wait=3600"], MAXIMUM, "wait=60"),
    (["wait=-4"], 0.0, "wait=0"),
    (["wait=soon"], DEFAULT, None),
    (["handling=lenient"], DEFAULT, None),
    (["handling=strict, wait=2"], 2.0, "wait=2"),
    ([",,;  garbage ==,"], DEFAULT, None),
    (["wait=soon, respond-async"], 0.0, "respond-async"),
], ids=lambda v: repr(v))
def test_preference_parse(headers: list[str], wait: float, applied: str | None) -> None:
    assert Preference.parse(headers, DEFAULT, MAXIMUM) == Preference(wait, applied)


# --- Idempotency-Key --------------------------------------------------------------------

def key_of(value: str | None) -> str | None:
    headers = CIMultiDict() if value is None else CIMultiDict({"Idempotency-Key": value})
    return idempotency_key(make_mocked_request("POST", "/api/holds", headers=headers))


def test_no_idempotency_key_header_is_none() -> None:
    assert key_of(None) is None


@pytest.mark.parametrize("value", ["k-1", '"k-1"', '  "k-1" '], ids=["bare", "quoted", "padded"])
def test_idempotency_key_bare_or_quoted_is_the_same_key(value: str) -> None:
    assert key_of(value) == "k-1"


@pytest.mark.parametrize("value", ["k" * 255, '"' + "k" * 255 + '"'], ids=["bare", "quoted"])
def test_idempotency_key_of_255_characters_is_accepted(value: str) -> None:
    assert key_of(value) == "k" * 255


@pytest.mark.parametrize("value", ["", '""', "   ", "k" * 256, '"' + "k" * 256 + '"'],
                         ids=["empty", "quoted-empty", "blank", "256", "quoted-256"])
def test_idempotency_key_empty_or_too_long_is_400(value: str) -> None:
    with pytest.raises(ProblemError) as caught:
        key_of(value)
    assert caught.value.doc["status"] == 400


def test_fingerprint_ignores_key_order_but_not_values() -> None:
    assert fingerprint("hold", {"product_id": 1, "qty": 2}) == \
        fingerprint("hold", {"qty": 2, "product_id": 1})
    assert fingerprint("hold", {"product_id": 1, "qty": 2}) != \
        fingerprint("hold", {"product_id": 1, "qty": 3})
    assert fingerprint("hold", {"qty": 2}) != fingerprint("order", {"qty": 2})


# --- webhook signatures -----------------------------------------------------------------

SECRET = "whsec-test"
BODY = b'{"idempotency_key":"evt_1","order_id":"ord_1_00","status":"paid"}'


def now() -> int:
    return int(time.time())


def signature(t: int, body: bytes = BODY, secret: str = SECRET) -> str:
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def test_a_valid_signature_is_accepted() -> None:
    verify_signature(SECRET, signature(now()), BODY)


def test_one_valid_v1_among_several_is_enough() -> None:
    t = now()
    verify_signature(SECRET, f"t={t},v1={'0' * 64},{signature(t).split(',')[1]}", BODY)


def test_a_signature_near_the_tolerance_is_accepted() -> None:
    verify_signature(SECRET, signature(now() - SIGNATURE_TOLERANCE_S + 10), BODY)


# Headers are built when the test runs (not at collection): timestamps must be current.
BAD_SIGNATURES = {
    "missing": lambda: "",
    "no-timestamp": lambda: "v1=abc",
    "malformed-timestamp": lambda: "t=yesterday,v1=abc",
    "no-v1": lambda: f"t={now()}",
    "bad-hex": lambda: f"t={now()},v1=nothex",
    "wrong-secret": lambda: signature(now(), secret="other"),
    "other-body": lambda: signature(now(), body=BODY + b" "),
    "stale": lambda: signature(now() - SIGNATURE_TOLERANCE_S - 10),
    "future": lambda: signature(now() + SIGNATURE_TOLERANCE_S + 10),
}


@pytest.mark.parametrize("case", list(BAD_SIGNATURES))
def test_a_bad_signature_is_401(case: str) -> None:
    with pytest.raises(ProblemError) as caught:
        verify_signature(SECRET, BAD_SIGNATURES[case](), BODY)
    assert caught.value.doc["status"] == 401
