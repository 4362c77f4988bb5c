"""ASGI middleware of the server: the request-body size limit (413) and bearer-token auth on ``/v1`` (401),
both answered with OpenAI's error JSON before any route runs; every response carries ``X-Request-Id``.

A body is refused from its ``Content-Length`` before a byte is read, or, without one (chunked), as soon as the
bytes received pass the limit: an oversized body is never buffered whole. (With a Content-Length the server's
HTTP parser never delivers more bytes than it announced.)
"""
from __future__ import annotations

import hmac
import json
import re
import uuid

REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def _error_response(status: int, message: str, type_: str, code: str | None = None):
    body = json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()
    return [{"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]},
            {"type": "http.response.body", "body": body}]


class ServerMiddleware:
    """Wraps the FastAPI app.

    Args:
        max_body_bytes: the largest request body accepted (``--max-request-body-bytes``).
        api_key: when set, every ``/v1`` route needs ``Authorization: Bearer <api_key>`` (compared in constant
            time); ``/health``, ``/metrics``, ``/version``, ``/tokenize`` and ``/detokenize`` stay open, as in vLLM.
    """

    def __init__(self, app, *, max_body_bytes: int, api_key: str | None = None):
        self.app, self.max_body_bytes = app, max_body_bytes
        self.api_key = None if api_key is None else api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", request_id.encode())]}
            await send(message)

        refusal = self._refusal(scope, headers)
        if refusal is not None:
            for message in refusal:
                await send_with_id(message)
            return
        if scope.get("method") in ("POST", "PUT", "PATCH") and b"content-length" not in headers:
            receive = await self._buffered(receive)
            if receive is None:
                for message in self._too_large():
                    await send_with_id(message)
                return
        await self.app(scope, receive, send_with_id)

    async def _buffered(self, receive):
        """A body without Content-Length, read up to the limit (None past it) and replayed to the app."""
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                parts.append(message)
                break
            size += len(message.get("body", b""))
            if size > self.max_body_bytes:
                return None
            parts.append(message)
            if not message.get("more_body", False):
                break
        replay = iter(parts)

        async def replayed():
            return next(replay, None) or await receive()
        return replayed

    def _too_large(self):
        return _error_response(413, f"the request body exceeds this server's limit of {self.max_body_bytes} bytes "
                                    f"(--max-request-body-bytes)", "invalid_request_error", "request_too_large")

    def _refusal(self, scope, headers: dict):
        if self.api_key is not None and scope.get("path", "").startswith("/v1"):
            auth = headers.get(b"authorization", b"")
            scheme, _, token = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.api_key):
                return _error_response(401, "invalid or missing API key (Authorization: Bearer ...)",
                                       "authentication_error", "invalid_api_key")
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_large = int(length) > self.max_body_bytes
            except ValueError:
                return _error_response(400, "Content-Length is not an integer", "invalid_request_error")
            if too_large:
                return self._too_large()
        return None
