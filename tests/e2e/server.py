"""Start and stop a real ``vllm serve`` process and talk to it over HTTP (standard library only).

The GPU machine has vLLM on PYTHONPATH but maybe no ``vllm`` console script, so the server runs as
``python -m vllm.entrypoints.cli.main serve``. HTTP goes through urllib/http.client so these
helpers need nothing beyond what the tests already import.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

SERVE = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve"]
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via an http_proxy
MODEL_NAME = "model"  # --served-model-name, so requests do not repeat the folder path

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
         "it. I will quiz you about the important information there.\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_argv(model: str, port: int, backend: str, duo: dict | None = None,
               extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """``vllm serve`` command line; ``duo`` is the ``duo_attention`` dict (None for other backends)."""
    argv = SERVE + [model, "--host", "127.0.0.1", "--port", str(port), "--served-model-name",
                    MODEL_NAME, "--attention-backend", backend]
    if duo is not None:
        argv += ["--additional-config", json.dumps({"duo_attention": duo})]
    return argv + list(extra)


_LIVE: weakref.WeakSet[VllmServer] = weakref.WeakSet()


def _kill_servers_then_die(signum: int, frame: object) -> None:
    """`timeout` (device_run.sh) ends a stage with SIGTERM, whose default action would leave the
    servers (their own sessions) holding GPU memory: kill them, then die of the signal as before."""
    for server in list(_LIVE):
        server.kill()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


class VllmServer:
    """A ``vllm serve`` child process in its own session, logging to ``log_path``."""

    def __init__(self, argv: list[str], port: int, log_path: str, startup_timeout: float = 900.0):
        self.argv, self.port, self.log_path, self.startup_timeout = argv, port, log_path, startup_timeout
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> VllmServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Launch and block until ``/health`` answers 200; raise with the log tail if it dies."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _kill_servers_then_die)
        log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        log.close()
        _LIVE.add(self)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode} before it was "
                                   f"ready; log {self.log_path}:\n{self.log_tail()}")
            if self.healthy():
                return
            time.sleep(2)
        self.stop()
        raise TimeoutError(f"vllm serve not ready after {self.startup_timeout:.0f} s; log:\n{self.log_tail()}")

    def healthy(self) -> bool:
        try:
            with _HTTP.open(self.url + "/health", timeout=5) as r:
                return r.status == 200
        except (OSError, http.client.HTTPException):
            return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM the server (it shuts its engine down), then SIGKILL its session if needed."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        self.proc.wait()
        _LIVE.discard(self)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the server's session: engine-core children left behind share its pid as group."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def log_tail(self, chars: int = 6000) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-chars:]


def post_json(url: str, payload: dict[str, Any], timeout: float = 600.0) -> dict[str, Any]:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with _HTTP.open(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"POST {url}: HTTP {e.code}: {e.read()[:1000]!r}") from None


def get_text(url: str, timeout: float = 30.0) -> str:
    with _HTTP.open(url, timeout=timeout) as r:
        return r.read().decode()


def complete(base: str, prompt: str, max_tokens: int, **kw: Any) -> str:
    """Greedy ``/v1/completions`` text."""
    body = dict(model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens, temperature=0.0, **kw)
    return post_json(base + "/v1/completions", body)["choices"][0]["text"]


def chat(base: str, content: str, max_tokens: int, **kw: Any) -> str:
    """Greedy ``/v1/chat/completions`` reply to one user message."""
    body = dict(model=MODEL_NAME, messages=[{"role": "user", "content": content}],
                max_tokens=max_tokens, temperature=0.0, **kw)
    return post_json(base + "/v1/chat/completions", body)["choices"][0]["message"]["content"]


@dataclass
class Streamed:
    text: str
    chunks: int  # SSE events carrying text (about one token each)
    ttft: float | None  # seconds to the first text chunk
    latency: float  # seconds to [DONE] or to the disconnect
    done: bool  # saw [DONE]
    disconnected: bool  # we closed the connection early on purpose


def stream(base: str, path: str, body: dict[str, Any], stop_after: int | None = None,
           timeout: float = 600.0) -> Streamed:
    """POST with ``stream: true`` and read the SSE events; with ``stop_after``, close the
    socket after that many text chunks (a client that goes away mid-answer)."""
    u = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    t0 = time.perf_counter()
    text, chunks, ttft, done, cut = "", 0, None, False, False
    try:
        conn.request("POST", path, body=json.dumps(dict(body, stream=True)),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"POST {path}: HTTP {resp.status}: {resp.read()[:1000]!r}")
        for raw in resp:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                done = True
                break
            event = json.loads(data)
            if "error" in event:
                raise RuntimeError(f"stream error event: {event['error']}")
            piece = _event_text(event)
            if piece:
                ttft = ttft if ttft is not None else time.perf_counter() - t0
                text, chunks = text + piece, chunks + 1
            if stop_after is not None and chunks >= stop_after:
                cut = True
                break
    finally:
        conn.close()
    return Streamed(text, chunks, ttft, time.perf_counter() - t0, done, cut)


def _event_text(event: dict[str, Any]) -> str:
    if not event.get("choices"):
        return ""
    choice = event["choices"][0]
    if "text" in choice:
        return choice["text"] or ""
    return (choice.get("delta") or {}).get("content") or ""


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format -> {metric name: value summed over label sets}."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0].strip()
        try:
            out[name] = out.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return out


def passkey_prompt(passkey: int, repeats: int, depth: float, question: bool = True) -> str:
    """The classic pass-key retrieval prompt (about 25 * repeats tokens), the key at ``depth``.

    With ``question`` the prompt ends in "The pass key is" (completion style); without, it ends
    in the question only (chat style)."""
    before = round(repeats * depth)
    needle = f"The pass key is {passkey}. Remember it. {passkey} is the pass key. "
    tail = "What is the pass key? The pass key is" if question else "What is the pass key?"
    return INTRO + FILLER * before + needle + FILLER * (repeats - before) + tail
