"""schemathesis hooks for scripts/schemathesis.sh.

One rule of the API cannot be written in OpenAPI: `POST /workflows/trigger` takes the
idempotency key in the `Idempotency-Key` header or in the body's `idempotency_key`, and when a
request carries both they must be equal (otherwise it is refused with 400, as the operation's
description says). Generated valid requests that carry both get the header's key in the body
too; nothing else is changed.
"""

import schemathesis


@schemathesis.hook
def map_case(context, case):
    operation = case.operation
    if operation.method.upper() != "POST" or operation.path != "/workflows/trigger":
        return case
    meta = getattr(case, "meta", None)
    if meta is None or not meta.generation.mode.is_positive:
        return case
    header = (case.headers or {}).get("Idempotency-Key")
    if isinstance(header, str) and isinstance(case.body, dict) and isinstance(
        case.body.get("idempotency_key"), str
    ):
        case.body["idempotency_key"] = header
    return case
