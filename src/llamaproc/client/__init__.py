"""The async HTTP/SSE client of one llama-server (httpx); knows nothing about processes."""

from ._client import DEFAULT_TIMEOUT, END_OF_BODY_WAIT, ERROR_BODY_LIMIT, LlamaClient, TokenStream

__all__ = ["DEFAULT_TIMEOUT", "END_OF_BODY_WAIT", "ERROR_BODY_LIMIT", "LlamaClient", "TokenStream"]
