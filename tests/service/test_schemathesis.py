"""Requests generated from the app's own OpenAPI schema (valid ones and ones that break it), sent
in-process to the app with an admin key so every operation is reachable: none may get a 5xx,
and every 4xx is `{error, detail}`. Bounded: a fixed number of derandomized examples per
operation and mode."""
import time

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.python.asgi import shutdown_lifespans

from tests.service.conftest import bearer

EXAMPLES = 15


@pytest.fixture
def api_schema(app):
    # Schemathesis runs the app's lifespan itself (start-up on the first call); end it with the
    # test, so that the app's background work stops before its database is dropped.
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    yield schema
    shutdown_lifespans()


def test_no_generated_request_gets_a_server_error(api_schema, keys):
    ready = api_schema["/ready"]["GET"]
    deadline = time.monotonic() + 30
    while ready.Case().call().status_code != 200:
        assert time.monotonic() < deadline, "the app did not become ready"
        time.sleep(0.05)

    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 10
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            def no_server_error(case):
                response = case.call(headers=bearer(keys.admin))
                assert response.status_code < 500, (case.as_curl_command(), response.text)
                if response.status_code >= 400:
                    assert set(response.json()) == {"error", "detail"}, response.text

            try:
                no_server_error()
            except Unsatisfiable:
                # An operation without parameters or body (/health) has nothing to break.
                assert mode is GenerationMode.NEGATIVE, operation.label
