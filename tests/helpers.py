"""Small utilities shared by the tests."""

import contextlib
import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch
from torch import nn


@torch.no_grad()
def randomize_zero_inits(model: nn.Module, std: float = 0.1, seed: int = 0) -> None:
    """Give every parameter random values so zero-initialised paths (gates, outputs) carry signal."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=gen) * std)


def text_inputs(cfg, batch: int, valid: list[int], seed: int = 0):
    """Random encoder states and a mask with `valid[i]` leading real tokens in row i."""
    gen = torch.Generator().manual_seed(seed)
    text = torch.randn(batch, cfg.text_len, cfg.text_dim, generator=gen)
    mask = torch.arange(cfg.text_len)[None, :] < torch.tensor(valid)[:, None]
    return text, mask


def conditioned_forward(model, x, t):
    """One forward of any family with fixed conditioning: labels 0, 1, ... for a ccDiT, otherwise `text_inputs`
    (rows of 3 and 1 real tokens) in x's dtype."""
    cfg = model.config
    if cfg.family == "ccdit":
        return model(x, t, labels=torch.arange(x.shape[0]) % cfg.num_classes)
    text, mask = text_inputs(cfg, x.shape[0], valid=[3, 1][: x.shape[0]])
    return model(x, t, text.to(x.dtype), mask)


@contextlib.contextmanager
def loopback_chat_server(answer: Callable[[dict, dict], str]):
    """A loopback OpenAI-compatible /v1/chat/completions server for the captioner and prompt-rewriting tests.

    Yields its `state`: `url` (the base URL), `requests` (each request's path, Authorization header and JSON
    body) and `status` (set it to, say, 500 to make the server fail). A 200 reply's message content is
    `answer(body, state)`."""
    state: dict[str, Any] = dict(requests=[], status=200)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state["requests"].append(dict(path=self.path, auth=self.headers.get("Authorization"), body=body))
            if state["status"] != 200:
                self.send_response(state["status"])
                self.end_headers()
                self.wfile.write(b"server exploded")
                return
            reply = {"choices": [{"message": {"role": "assistant", "content": answer(body, state)}}]}
            data = json.dumps(reply).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    state["url"] = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def loopback_file_server(files: dict[str, bytes]):
    """A loopback HTTP server for download tests: GET /NAME answers `files[NAME]` with its full Content-Length.

    Yields its `state`: `url` (the base URL, no trailing slash), `files` (change it while serving), `cut`
    (NAME -> bytes actually sent before the connection closes, to play a transfer that dies half way) and
    `requests` (the paths asked for)."""
    state: dict[str, Any] = dict(files=files, cut={}, requests=[])

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            name = self.path.lstrip("/")
            state["requests"].append(name)
            if name not in state["files"]:
                self.send_error(404)
                return
            body = state["files"][name]
            self.send_response(200)
            self.send_header("Content-Type", "application/x-tar")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: state["cut"].get(name, len(body))])
            self.close_connection = True

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    state["url"] = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
