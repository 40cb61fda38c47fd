"""The error answers of the HTTP API, for the OpenAPI document: every 4xx is
``{"error": ..., "field": ...}``."""

from __future__ import annotations

# ---- HTTP ----------------------------------------------------------------------------------------
ERRORS = {400: "malformed JSON", 401: "no valid 'Authorization: Bearer TOKEN' (services with a token)",
          403: "a file outside --media-root (or any file without one), a listener beyond loopback",
          404: "no such stream", 409: "the stream exists, is starting or not running, or an output is another "
          "stream's", 413: "the body is over its limit", 422: "a field is invalid: `field` names it",
          429: "the service runs --max-streams streams already", 503: "the service is shutting down"}


def error_responses(*codes: int) -> dict:
    """OpenAPI ``responses`` for the errors an endpoint gives: ``{"error": ..., "field": ...}``."""
    schema = {"type": "object", "required": ["error", "field"],
              "properties": {"error": {"type": "string"}, "field": {"type": ["string", "null"]}}}
    return {code: {"description": ERRORS[code], "content": {"application/json": {"schema": schema}}} for code in codes}
