"""Requests generated from the app's own OpenAPI schema (valid ones and ones that break it), sent
in-process to the running app with an admin key so every operation is reachable: none may get a
5xx. Bounded: a fixed number of examples per operation and mode, derandomized."""
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from tests.service.conftest import bearer

EXAMPLES = 15


def test_no_generated_request_gets_a_server_error(client, keys):
    schema = schemathesis.openapi.from_asgi("/openapi.json", client.app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            def no_server_error(case):
                response = case.call(headers=bearer(keys.admin))
                assert response.status_code < 500, (case.as_curl_command(), response.text)
                assert response.headers["content-type"].startswith("application/json") or \
                    case.path == "/metrics" or case.path == "/docs"

            no_server_error()
