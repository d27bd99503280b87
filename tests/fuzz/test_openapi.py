"""Every operation of the OpenAPI document, fuzzed against each running deployment.

Positive and negative requests from the examples, coverage and fuzzing phases, then
scenarios along the document's links; each response must be no 5xx, of a documented
status, content type, headers and schema, valid requests must be accepted and invalid
ones rejected (API.md invariant 5), and no process may log an error meanwhile.
"""

from __future__ import annotations

import itertools
import os
import re
from typing import Any

import hypothesis
import hypothesis.errors
import pytest
import requests
import schemathesis
from schemathesis.errors import FailureGroup

from tests.e2e.harness import ServiceInstance

pytestmark = pytest.mark.fuzz

schema = schemathesis.pytest.from_fixture("fuzz_schema")

_requests = itertools.count(1)

STATEFUL_SCENARIOS = int(os.environ.get("FUZZ_STATEFUL_SCENARIOS") or 100)
STATEFUL_STEPS = 10
STATEFUL_SUITES = 5  # at most, when Hypothesis finds a suite inconsistent
LOGGED_ERROR = re.compile(r"^\S+ (?:ERROR|CRITICAL) |^Traceback ")


@schema.parametrize()
def test_operation_keeps_its_contract(
    case: schemathesis.Case,
    fuzz_session: requests.Session,
    fuzz_service: ServiceInstance,
    served_document: dict[str, Any],
) -> None:
    unique_keys(case, served_document)
    case.call_and_validate(session=fuzz_session)


def test_linked_operations_keep_their_contract(
    fuzz_schema: Any,
    fuzz_session: requests.Session,
    served_document: dict[str, Any],
    fuzz_seed: int,
) -> None:
    """Scenarios that follow the document's links (product -> hold -> order -> payment,
    202 -> job) with the ids the service really issued, every response checked.

    A live service answers a replayed scenario differently (stock moved on, a write was
    decided in time or not), so failures are collected as they happen rather than raised
    for Hypothesis to shrink, and a suite Hypothesis finds inconsistent is followed by a
    new one with the next seed, as schemathesis' own runner does.
    """
    failures: list[FailureGroup] = []
    scenarios = 0

    class Scenario(fuzz_schema.as_state_machine()):  # type: ignore[misc]
        def before_call(self, case: schemathesis.Case) -> None:
            unique_keys(case, served_document)

        def get_call_kwargs(self, case: schemathesis.Case) -> dict[str, Any]:
            return {"session": fuzz_session}

        def validate_response(self, response: schemathesis.Response, case: schemathesis.Case,
                              additional_checks: Any = None, **kwargs: Any) -> None:
            try:
                super().validate_response(response, case, additional_checks, **kwargs)
            except FailureGroup as failure:
                failures.append(failure)

        def teardown(self) -> None:
            nonlocal scenarios
            scenarios += 1
            super().teardown()

    for suite in range(STATEFUL_SUITES):
        if scenarios >= STATEFUL_SCENARIOS:
            break
        settings = hypothesis.settings(
            max_examples=STATEFUL_SCENARIOS - scenarios, stateful_step_count=STATEFUL_STEPS,
            phases=[hypothesis.Phase.generate], derandomize=False, database=None, deadline=None,
            suppress_health_check=list(hypothesis.HealthCheck))
        try:
            hypothesis.seed(fuzz_seed + suite)(Scenario).run(settings=settings)
        except hypothesis.errors.FlakyStrategyDefinition:
            continue
    assert scenarios, "no scenario ran"
    distinct: dict[tuple[tuple[str | None, str, str], ...], str] = {}
    for group in failures:  # one report per kind of failure on an operation
        kind = tuple((f.operation, type(f).__name__, f.title) for f in group.exceptions)
        distinct.setdefault(kind, str(group))
    assert not distinct, f"{len(distinct)} distinct failures, first ones:\n" + "\n".join(
        list(distinct.values())[:5])


def unique_keys(case: schemathesis.Case, document: dict[str, Any]) -> None:
    """Give each valid idempotency key a prefix no other request of this run has.

    The generator draws the same few keys ("0", the example) for different requests, which
    the service rightly answers 422 (key reused with a different request): a client uses
    one key per request. A key stays as valid as it was: same form, no longer than its
    bound. An invalid key is sent as generated, to be rejected.
    """
    prefix = f"fz{next(_requests)}-"
    header = document["components"]["parameters"]["Idempotency-Key"]["schema"]
    key = case.headers.get("Idempotency-Key")
    if isinstance(key, str) and _valid(key, header):
        quoted = len(key) >= 2 and key[0] == key[-1] == '"'
        fresh = _prefixed(prefix, key[1:-1] if quoted else key, header["maxLength"] - 2)
        case.headers["Idempotency-Key"] = f'"{fresh}"' if quoted else fresh
    field = document["components"]["schemas"]["WebhookRequest"]["properties"]["idempotency_key"]
    body = case.body
    event = body.get("idempotency_key") if isinstance(body, dict) else None
    if isinstance(body, dict) and isinstance(event, str) and _valid(event, field):
        body["idempotency_key"] = _prefixed(prefix, event, field["maxLength"])


def _valid(value: str, bounds: dict[str, Any]) -> bool:
    """Whether ``value`` is within a documented string schema's length and pattern."""
    return (bounds.get("minLength", 0) <= len(value) <= bounds["maxLength"]
            and re.fullmatch(bounds.get("pattern", ".*"), value, re.DOTALL) is not None)


def _prefixed(prefix: str, key: str, limit: int) -> str:
    """``prefix`` + the end of ``key``, at most ``limit`` characters."""
    return prefix + key[max(0, len(prefix) + len(key) - limit):]


def test_no_process_logged_an_error(fuzz_service: ServiceInstance) -> None:
    """Nothing the fuzzer sent made a web, worker or scheduler process log an error: a
    request the service could not handle shows there even when its answer was a 4xx."""
    found = []
    for process in fuzz_service.processes:
        text = process.log_path.read_text(errors="replace")
        found += [f"{process.name}: {line}" for line in text.splitlines()
                  if LOGGED_ERROR.search(line)]
    assert not found, f"{len(found)} error lines, first ones:\n" + "\n".join(found[:10])
