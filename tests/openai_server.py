"""An OpenAI-compatible chat-completions server on loopback, for testing a real LM's path without a key.

It answers like the demo LM (every output field of a DSPy signature, deterministic), streamed as
server-sent events with ``usage`` or as one JSON reply. A marker in the last user message picks a fault:

- ``[429]``: the first request with that message gets HTTP 429 with ``Retry-After: 0.2``;
- ``[500]``: every such request gets HTTP 500;
- ``[stall]``: the reply never comes (the connection stays open until the server stops);
- ``[drop]``: the first such request is cut off mid-reply (the connection closes);
- ``[401]``: HTTP 401, OpenAI's "Incorrect API key provided" with the request's key in it;
- ``[400ctx]``: HTTP 400, OpenAI's ``context_length_exceeded``;
- ``[length]``: the reply stops half-way with ``finish_reason: "length"`` (as at ``max_tokens``);
- ``[garbled]``: a reply without DSPy's field markers, unless the request asks for JSON (JSONAdapter).

A request with ``n`` gets that many choices; one with ``logprobs`` gets each token's log-probability.

A request that offers ``tools`` (native function calling) gets a call of its first tool, each of the tool's
parameters given the last user message, as the reply's ``tool_calls``.

``requests`` counts the requests per user message, so a test can tell how often one was retried.
"""

from __future__ import annotations

import collections
import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from dspex_nb.worker.demo_lm import DemoEngine


@dataclass
class _Text:
    role: str
    text: str


@dataclass
class _Request:
    system: str
    messages: list[_Text]


def _tool_calls(body: dict[str, Any], user: str) -> list[dict[str, Any]]:
    """A call of the request's first tool, each of its parameters given ``user``; none without tools."""
    if not body.get("tools"):
        return []
    function = body["tools"][0]["function"]
    arguments = {name: user for name in function.get("parameters", {}).get("properties", {})}
    return [{"id": "call_0", "type": "function",
             "function": {"name": function["name"], "arguments": json.dumps(arguments)}}]


def _logprobs(pieces: list[str]) -> dict[str, Any]:
    """OpenAI's ``logprobs`` of a choice: each token's, made up from its position."""
    return {"content": [{"token": piece, "logprob": -0.25 * (i % 4), "bytes": list(piece.encode()),
                         "top_logprobs": []} for i, piece in enumerate(pieces)]}


class OpenAIServer:
    def __init__(self) -> None:
        self.requests: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._engine = DemoEngine()
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._http.daemon_threads = True
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._http.server_address[1]}/v1"

    def __enter__(self) -> OpenAIServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._http.shutdown()
        self._http.server_close()

    def count(self, marker: str) -> int:
        """Requests whose user message contains ``marker``."""
        with self._lock:
            return sum(n for message, n in self.requests.items() if marker in message)

    def _answer(self, body: dict[str, Any]) -> tuple[str, str]:
        system = "".join(m["content"] for m in body["messages"] if m["role"] == "system")
        messages = [_Text(m["role"], m["content"] if isinstance(m["content"], str) else "")
                    for m in body["messages"] if m["role"] != "system"]
        user = next((m.text for m in reversed(messages) if m.role == "user"), "")
        return user, self._engine.answer(_Request(system, messages))  # type: ignore[arg-type]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                user, text = server._answer(body)
                with server._lock:
                    server.requests[user] += 1
                    attempt = server.requests[user]
                if "[429]" in user and attempt == 1:
                    return self._error(429, {"Retry-After": "0.2"})
                if "[500]" in user:
                    return self._error(500, {})
                if "[stall]" in user:
                    server._stop.wait()
                    return None
                if "[401]" in user:
                    key = self.headers.get("Authorization", "").removeprefix("Bearer ")
                    return self._json(401, {"error": {"message": f"Incorrect API key provided: {key}.",
                                                      "type": "invalid_request_error", "code": "invalid_api_key"}})
                if "[400ctx]" in user:
                    return self._json(400, {"error": {
                        "message": "This model's maximum context length is 16 tokens. However, your messages resulted "
                                   "in 99 tokens. Please reduce the length of the messages.",
                        "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}})
                if "[garbled]" in user and not body.get("response_format") and "a JSON object" not in json.dumps(body):
                    text = "I will not follow the format."
                tokens = text.split(" ")
                finish = "stop"
                if "[length]" in user:
                    tokens, finish = tokens[:len(tokens) // 2], "length"
                    text = " ".join(tokens)
                usage = {"prompt_tokens": len(json.dumps(body["messages"]).split()),
                         "completion_tokens": len(tokens), "total_tokens": 0}
                usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                if "[drop]" in user and attempt == 1:
                    return self._drop(body.get("stream", False))
                calls = _tool_calls(body, user)
                finish = "tool_calls" if calls else finish
                pieces = [t + " " for t in tokens[:-1]] + tokens[-1:]
                logprobs = _logprobs(pieces) if body.get("logprobs") else None
                if not body.get("stream"):
                    message = {"role": "assistant", "content": text, **({"tool_calls": calls} if calls else {})}
                    return self._json(200, {
                        "id": "chatcmpl-test", "object": "chat.completion", "created": int(time.time()),
                        "model": body["model"], "usage": usage,
                        "choices": [{"index": i, "finish_reason": finish, "message": message, "logprobs": logprobs}
                                    for i in range(body.get("n") or 1)]})
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                for i, piece in enumerate(pieces):
                    self._event({"choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None,
                                              "logprobs": logprobs and {"content": logprobs["content"][i:i + 1]}}]},
                                body)
                if calls:
                    self._event({"choices": [{"index": 0, "finish_reason": None, "delta": {
                        "tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]}}]}, body)
                self._event({"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}, body)
                self._event({"choices": [], "usage": usage}, body)
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
                self.close_connection = True
                return None

            def _drop(self, stream: bool) -> None:
                """Headers and the start of a reply, then the connection closes."""
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream" if stream else "application/json")
                if not stream:
                    self.send_header("Content-Length", "4096")
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(b'data: {"id": "chatcmpl-test", "choices": [{"index": 0, "delta": ' if stream
                                 else b'{"id": "chatcmpl-test", "choices": [')
                self.wfile.flush()
                self.close_connection = True

            def _event(self, data: dict[str, Any], body: dict[str, Any]) -> None:
                data = {"id": "chatcmpl-test", "object": "chat.completion.chunk", "created": int(time.time()),
                        "model": body["model"], **data}
                self.wfile.write(f"data: {json.dumps(data)}\n\n".encode())
                self.wfile.flush()

            def _json(self, status: int, data: dict[str, Any], headers: dict[str, str] | None = None) -> None:
                payload = json.dumps(data).encode()
                self.send_response(status)
                for key, value in {"Content-Type": "application/json", **(headers or {})}.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def _error(self, status: int, headers: dict[str, str]) -> None:
                self._json(status, {"error": {"message": f"simulated HTTP {status}", "type": "test",
                                              "code": status}}, headers)

        return Handler
