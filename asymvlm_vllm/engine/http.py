"""HTTP-level check of ``vllm_xargs`` for the OpenAI server (``--plugin asymvlm`` installs it).

vLLM's request models declare ``vllm_xargs`` as ``dict[str, str | int | float | list]``, and
pydantic coerces JSON ``true``/``false`` to ``1``/``0`` before any code of ours runs: a client
that sends ``"asymvlm_keep_ratio": true`` would silently keep everything. This ASGI middleware
reads the raw JSON of the completion endpoints (only bodies that mention ``"asymvlm``; others
pass untouched) and answers HTTP 400, with the same message as every other bad option, when
an ``asymvlm*`` value is invalid as sent. Everything else is left to vLLM.
"""

from __future__ import annotations

import json
from typing import Any

from ..core.request_options import RequestOptionsError, request_options_from_extra_args

__all__ = ["MIDDLEWARE_QUALNAME", "StrictRequestOptions", "raw_options_error"]

MIDDLEWARE_QUALNAME = "asymvlm_vllm.engine.http.StrictRequestOptions"
_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/responses")
_MARKER = b'"asymvlm'


def raw_options_error(body: bytes) -> str | None:
    """The message for a request body whose ``vllm_xargs`` has an invalid ``asymvlm*`` value
    (as JSON sent it), or None."""
    if _MARKER not in body:
        return None
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None  # vLLM answers malformed JSON itself
    xargs = data.get("vllm_xargs") if isinstance(data, dict) else None
    if not isinstance(xargs, dict):
        return None
    try:
        request_options_from_extra_args(xargs)
    except RequestOptionsError as e:
        return str(e)
    return None


class StrictRequestOptions:
    """ASGI middleware; see the module docstring."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") != "http" or scope.get("method") != "POST" or not scope.get("path", "").endswith(_PATHS):
            await self.app(scope, receive, send)
            return
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away while sending
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        error = raw_options_error(body)
        if error is not None:
            payload = json.dumps({"error": {"message": error, "type": "BadRequestError", "param": "vllm_xargs",
                                            "code": 400}}).encode()
            await send({"type": "http.response.start", "status": 400,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(payload)).encode())]})
            await send({"type": "http.response.body", "body": payload})
            return
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
