"""schemathesis hooks for scripts/schemathesis.sh: realistic trigger bodies.

`POST /workflows/trigger` accepts what its schema says, except for what depends on the
server's state rather than on the request's shape, which OpenAPI cannot say:

- which workflows exist (an unknown one is 404) and which parameters each one takes (an
  unknown or missing one is 400): see `GET /workflows/available`;
- which project directories exist under the root (a missing one is 400, one outside it 403);
- that an `Idempotency-Key` header and a body `idempotency_key` sent together must be equal
  (otherwise 400, as the operation's description says).

So a generated valid trigger keeps a random workflow name (and is answered 404) unless it
names a configured workflow (schemathesis learns the names from `GET /workflows/available`),
or every other time: then it runs the example server's `disk-usage` workflow (no parameters,
`du` in the project root, done in milliseconds) without parameters or project, so that jobs
really run and the status, events and cancel operations are reached with real job ids. The
header's idempotency key is copied into the body when both are present. Negative (invalid)
cases are left alone.
"""

import json

import schemathesis

WORKFLOW = "disk-usage"
CONFIGURED = {"disk-usage", "echo", "oc-review", "repo-files", "review", "search"}


@schemathesis.hook
def map_case(context, case):
    operation = case.operation
    if operation.method.upper() != "POST" or operation.path != "/workflows/trigger":
        return case
    meta = getattr(case, "meta", None)
    if meta is None or not meta.generation.mode.is_positive or not isinstance(case.body, dict):
        return case
    body = dict(case.body)
    header = (case.headers or {}).get("Idempotency-Key")
    if isinstance(header, str) and isinstance(body.get("idempotency_key"), str):
        body["idempotency_key"] = header
    real = body.get("workflow") in CONFIGURED
    if real or len(json.dumps(body, sort_keys=True)) % 2 == 0:
        body = {k: v for k, v in body.items() if k not in ("params", "project", "project_path")}
        body["workflow"] = WORKFLOW
    case.body = body
    return case
