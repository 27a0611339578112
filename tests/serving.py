"""`dflash serve` as a subprocess of this checkout, for the server tests: started on a free loopback
port (--port 0; the URL comes from its start-up line), its stderr collected line by line, stopped
with SIGINT as a user would. Also a tiny target whose greedy answers are scripted, so that a real
model run writes tool calls and reasoning."""
from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from .conftest import ctrl_c_reaches_it
from .tiny import copy_qwen3_tokenizer, drafter_config, save_weights, target_config, write_drafter, write_target

ROOT = Path(__file__).resolve().parents[1]
URL = re.compile(r"serving (\S+) at (http://\S+)/v1")


class ServerProcess:
    def __init__(self, *args: str, env: dict | None = None, startup: float = 180.0, preexec=ctrl_c_reaches_it):
        cmd = [sys.executable, "-m", "dflash_cli.cli", "serve", "--port", "0", *map(str, args)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     preexec_fn=preexec,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._eof = False
        self._changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        line = self.wait_for(lambda l: URL.search(l) is not None, startup)
        if line is None:
            self.stop()
            raise RuntimeError("dflash serve did not start:\n" + "\n".join(self.lines))
        self.model, self.base = URL.search(line).groups()
        self.host, self.port = self.base.removeprefix("http://").rsplit(":", 1)

    def _read(self) -> None:
        for line in self.proc.stderr:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    def wait_for(self, predicate, timeout: float, start: int = 0) -> str | None:
        """The first stderr line from index `start` on that satisfies `predicate` (None on timeout)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines[start:]:
                    if predicate(line):
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or self._eof:
                    return None
                self._changed.wait(min(left, 0.5))

    def client(self, **kw):
        import openai

        return openai.OpenAI(base_url=self.base + "/v1", api_key=kw.pop("api_key", "unused"), max_retries=0,
                             timeout=kw.pop("timeout", 120), **kw)

    def request(self, method: str, path: str, body: bytes | dict | None = None, headers: dict | None = None,
                timeout: float = 120) -> tuple[int, dict, object]:
        """A raw HTTP request: (status, headers, parsed JSON or text). A header given as None is not sent."""
        conn = http.client.HTTPConnection(self.host, int(self.port), timeout=timeout)
        try:
            data = json.dumps(body).encode() if isinstance(body, dict) else body
            sent = {"Content-Type": "application/json", **(headers or {})}
            conn.request(method, path, body=data, headers={k: v for k, v in sent.items() if v is not None})
            resp = conn.getresponse()
            raw = resp.read().decode()
            try:
                payload = json.loads(raw)
            except ValueError:
                payload = raw
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, payload
        finally:
            conn.close()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def qwen3_chat_config(hidden: int = 32) -> dict:
    cfg = target_config("qwen3", vocab=151936, hidden=hidden, layers=2, heads=2, kv_heads=1, head_dim=16,
                        intermediate=64, tie=False)
    return cfg | {"bos_token_id": 151643, "eos_token_id": 151645}


def write_scripted_pair(directory: Path, chains: list[list[int]], scale: float = 10.0) -> tuple[Path, Path]:
    """A Qwen3 target (real tokenizer and chat template) whose next token depends on the current one
    only, following `chains` (each [after, then, then, …]): attention and MLP outputs are zero, so the
    residual stream is the token's embedding; chain tokens get orthonormal embeddings, and lm_head
    rows point at their predecessors'. Greedy decoding therefore writes each chain exactly."""
    cfg = qwen3_chat_config()
    target = write_target(directory / "scripted", cfg, seed=11)
    copy_qwen3_tokenizer(target)
    (target / "generation_config.json").write_text(json.dumps({"eos_token_id": [151645, 151643]}))
    w = load_file(str(target / "model.safetensors"))
    tokens = sorted({t for chain in chains for t in chain})
    h = cfg["hidden_size"]
    assert len(tokens) <= h, "chain tokens need orthogonal embeddings"
    basis, _ = torch.linalg.qr(torch.randn(h, h, generator=torch.Generator().manual_seed(3)))
    w["lm_head.weight"] = torch.zeros(cfg["vocab_size"], h)
    w["model.norm.weight"] = torch.ones(h)
    for i, t in enumerate(tokens):
        w["model.embed_tokens.weight"][t] = basis[i] * h ** 0.5
    for chain in chains:
        for a, b in zip(chain, chain[1:]):
            w["lm_head.weight"][b] += scale * w["model.embed_tokens.weight"][a] / h ** 0.5
    for name in w:
        if name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
            w[name] = torch.zeros_like(w[name])
    save_weights(target, w)
    drafter = write_drafter(directory / "scripted-drafter",
                            drafter_config(cfg, block_size=4, target_layer_ids=(0, 1), mask_token_id=151669, heads=2,
                                           kv_heads=1, intermediate=64))
    return target, drafter
