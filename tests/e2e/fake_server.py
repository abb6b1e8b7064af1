"""A stand-in for ``vllm serve`` so the HTTP client, server handling and load logic run on CPU.

Speaks the small part of the OpenAI API the GPU scripts use (completions and chat, streamed as
chunked SSE like vLLM, or not), ``/health`` and ``/metrics`` with vLLM's gauge names. Answers are
a deterministic function of the prompt, one word per token, so a client can check them.

    python -m tests.e2e.fake_server --port PORT [--token-delay 0.002]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def answer_words(prompt: str, max_tokens: int) -> list[str]:
    seed = int(hashlib.sha256(prompt.encode()).hexdigest(), 16)
    return [f" w{(seed >> (4 * i)) % 97}" for i in range(max_tokens)]


class _State:
    def __init__(self, token_delay: float):
        self.token_delay = token_delay
        self.running = 0
        self.lock = threading.Lock()

    def add(self, n: int) -> None:
        with self.lock:
            self.running += n


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: _State

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        if self.path == "/health":
            self._send(200, b"", "text/plain")
        elif self.path == "/metrics":
            r = self.state.running
            body = (f"# HELP vllm:num_requests_running running\nvllm:num_requests_running"
                    f"{{engine=\"0\",model_name=\"model\"}} {float(r)}\n"
                    f"vllm:num_requests_waiting{{engine=\"0\"}} 0.0\n"
                    f"vllm:kv_cache_usage_perc{{engine=\"0\"}} {r / 100}\n")
            self._send(200, body.encode(), "text/plain")
        else:
            self._send(404, b"{}", "application/json")

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        chat = self.path == "/v1/chat/completions"
        if self.path not in ("/v1/completions", "/v1/chat/completions"):
            return self._send(404, b"{}", "application/json")
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        words = answer_words(prompt, int(body.get("max_tokens", 16)))
        if not body.get("stream"):
            text = "".join(words)
            choice = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
            return self._send(200, json.dumps({"choices": [dict(choice, index=0)]}).encode(),
                              "application/json")
        self.state.add(1)
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for w in words:
                time.sleep(self.state.token_delay)
                choice = {"delta": {"content": w}} if chat else {"text": w}
                self._chunk(b"data: " + json.dumps({"choices": [dict(choice, index=0)]}).encode() + b"\n\n")
            self._chunk(b"data: [DONE]\n\n")
            self._chunk(b"")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            self.state.add(-1)

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _send(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--token-delay", type=float, default=0.002)
    args = ap.parse_args()
    Handler.state = _State(args.token_delay)
    ThreadingHTTPServer.request_queue_size = 256  # default 5 resets bursts of concurrent clients
    ThreadingHTTPServer(("127.0.0.1", args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
