"""schemathesis against the vendor's own published OpenAPI schema (`/openapi.json` of the live
app on 127.0.0.1): generated requests, valid and invalid, never produce a 5xx, and every answer's
status code, content type and body conform to the schema (response headers are not in the schema). Bounded: a few dozen examples
per operation, no deadline (a shared 2-core machine)."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                               status_code_conformance)

EXAMPLES = 25
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
MODES = [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE]


def _asking_for(model_id: str):
    def patch(case):
        if isinstance(case.body, dict) and "model" in case.body:
            case.body = {k: v for k, v in case.body.items() if k != "dimensions"} | {"model": model_id}
        return case
    return patch


@pytest.mark.parametrize("mode", MODES, ids=[m.value for m in MODES])
def test_every_generated_request_gets_a_documented_non_5xx_answer(make_vendor, mode):
    # schemathesis' pytest plugin does not run on pytest 9 yet, so hypothesis drives each
    # operation's strategy directly: the same generation and checks, without the plugin.
    vendor = make_vendor(max_items_per_request=16, max_body_bytes=1_000_000)
    key = vendor.create_key(quota=10**9, rate=10**6, burst=10**6)
    schema = schemathesis.openapi.from_url(vendor.base_url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/embeddings", "/v1/models", "/v1/usage"}
    for operation in operations:
        if mode is schemathesis.GenerationMode.NEGATIVE and not (
                list(operation.iter_parameters()) or operation.get_request_payload_content_types()):
            continue  # nothing to make invalid in a GET without parameters: positive mode covers it

        strategy = operation.as_strategy(generation_mode=mode)
        if mode is schemathesis.GenerationMode.POSITIVE:  # half of them ask for the served model:
            strategy = st.one_of(strategy, strategy.map(_asking_for(vendor.model_id)))  # the metered path

        @given(case=strategy)
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None,
                  phases=[Phase.generate])
        def call(case) -> None:
            case.call_and_validate(headers={"Authorization": f"Bearer {key}"}, checks=CHECKS, timeout=30)

        call()


def test_the_schema_describes_the_embeddings_body_and_errors(vendor):
    with vendor.client() as client:
        spec = client.get("/openapi.json").json()
    operation = spec["paths"]["/v1/embeddings"]["post"]
    body = operation["requestBody"]["content"]["application/json"]["schema"]
    assert set(body["required"]) == {"input", "model"} and "$defs" not in body
    assert [p["name"] for p in operation["parameters"]] == ["Idempotency-Key"]
    for status in ("400", "401", "402", "429", "503"):
        assert operation["responses"][status]["content"]["application/json"]["schema"]["$ref"].endswith("ErrorResponse")
