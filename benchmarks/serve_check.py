"""`dflash serve demo` on a device against `dflash run demo` on it: the same greedy completion through
the HTTP API as on the command line (a script for benchmarks/gpu_more.sh, not a test; the tests do
the same on the CPU). Prints both and `serve_check: ok`, or exits 1.

    python benchmarks/serve_check.py [--device cuda]
"""
from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import time
import urllib.request

PROMPT, TOKENS = "Once upon a time", 60


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    device = parser.parse_args().device
    cli = [sys.executable, "-m", "dflash_cli.cli"]
    run = subprocess.run(cli + ["run", "demo", "--device", device, "-p", PROMPT, "-n", str(TOKENS), "--json", "-q"],
                         capture_output=True, text=True, timeout=300)
    if run.returncode != 0:
        print(run.stderr)
        return 1
    want = json.loads(run.stdout)["text"]
    server = subprocess.Popen(cli + ["serve", "demo", "--device", device, "--port", "0"], stderr=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, text=True)
    try:
        start, base = time.monotonic(), None
        for line in server.stderr:
            print(line, end="")
            found = re.search(r"at (http://\S+)/v1", line)
            if found:
                base = found.group(1)
                break
            if time.monotonic() - start > 300:
                break
        if base is None:
            print("serve_check: the server did not start")
            return 1
        body = json.dumps({"model": "demo", "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0}).encode()
        for attempt in ("first", "second (prefix cached)"):
            request = urllib.request.Request(base + "/v1/completions", body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=300) as r:
                answer = json.loads(r.read())
            got, stats = answer["choices"][0]["text"], answer.get("dflash", {})
            print(f"{attempt}: same text as dflash run: {got == want} · {stats}")
            if got != want:
                print(f"run:   {want!r}\nserve: {got!r}")
                return 1
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    print("serve_check: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
