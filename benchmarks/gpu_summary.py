"""The summary a device call ends with (benchmarks/part.sh runs it; standard library only, run with
`python3 -I` so that nothing the call installed can break it). Reads the call's logs folder: parts.tsv
(one line per part: name, exit status, seconds, limit, note), NAME.log per part and nvidia-smi.log. Prints, in at most 8 kB:
  the card (nvidia-smi and torch's name for it), the versions, preflight's verdict;
  every part's `== NAME: exit N (s of limit)` line;
  then per part its key lines: gpu_check's verdicts (and any row that differs, errs, or is the hybrid's
  prefill), the fast-path table, each bench's `decode reads / plain decoding / iteration by block /
  break-even / PROJECTION` lines, the GEMM rows (F.linear M=1 vs M=16), kernel rows that are n/a, the
  pytest summary line and its FAILED/ERROR lines, the serve, auto and train verdicts; and any line
  matching Error|Traceback|differs|FAILED (deduplicated, a few per part); for a failed part without
  such a line, its last lines.

    python3 -I benchmarks/gpu_summary.py LOGS --call NAME [--budget S] [--elapsed S]
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

LIMIT = 8000  # bytes: the device returns the last 12,000 characters of stdout
ERRORS = re.compile(r"Error|Traceback|differs|FAILED")
KEY = re.compile(
    r"^gpu_check|^preflight:|^GPU:|^import .*MISSING|^triton: FAILED"
    r"|decode reads|^plain decoding|iteration by block|^break-even|^PROJECTION"
    r"|^\s+(decode|verify\(\d+\)|draft|accept|iteration)\s+[\d.]+ ms|^\s+weights .* GB"
    r"|same as plain|same text as dflash run|^serve_check|s per step|^peak GPU memory|sdpa|SDPA"
    r"|^dflash train|^held-out τ|^\s{4}\w+\s+(yes|no)\b"  # train_speed: which SDPA kernels admit the attention
    r"|layout: |stopped at the budget|^\(projected"
    r"|\d+ (passed|failed|errors?)\b.* in [\d.]+s|^(FAILED|ERROR) ")
ROW = re.compile(r"^\S+\s+(float32|bfloat16)\s+(kernels=|prefill)")  # gpu_check's rows
PHASE = re.compile(r"^\[\s*[\d.]+ s\] ")


def read(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()
    except OSError:
        return []


def clip(line: str, width: int) -> str:
    line = line.rstrip()
    return line if len(line) <= width else line[:width - 1] + "…"


def part_lines(name: str, lines: list[str], rc: str, errors_cap: int, width: int) -> list[str]:
    """The lines of one part's log worth keeping."""
    keep: list[str] = []
    table = None  # inside a `|` table: "check" (fast path), "gemm" (F.linear), "kernel" (kernel_speed)
    for line in lines:
        s = line.rstrip()
        if s.startswith("|"):
            if table is None:
                table = "check" if "check" in s else "gemm" if "F.linear" in s else "other"
            if table in ("check", "gemm") or "n/a" in s:
                keep.append(s)
            continue
        table = None
        if ROW.match(s):
            if "same " not in s or "prefill" in s:  # a row that differs, errs, or the prefill comparison
                keep.append(s)
        elif KEY.search(s):
            keep.append(s)
    errors: list[str] = []
    for i, line in enumerate(lines):
        s = line.strip()
        if s.startswith("Traceback (most recent call last)"):  # name the exception it ends with instead
            end = next((t.strip() for t in lines[i + 1:] if t and not t[0].isspace()), "")
            s = f"Traceback … {end}"
        if ERRORS.search(s) and s not in errors and not any(s in k or k.strip() in s for k in keep):
            errors.append(s)
    shown = errors[:errors_cap]
    if len(errors) > errors_cap:
        shown.append(f"(… {len(errors) - errors_cap} more error lines in logs.tgz: {name}.log)")
    if rc != "0" and not errors and lines and (rc in ("124", "137") or not keep):  # where it stopped
        phases = [s for s in lines if PHASE.match(s)]
        shown = ([f"last phase: {phases[-1].strip()}"] if phases else []) + [
            f"last line: {s.strip()}" for s in lines[-3:] if s.rstrip() not in keep]
    out, seen = [], set()
    for s in keep + shown:
        if s not in seen:
            seen.add(s)
            out.append("  " + clip(s, width))
    return out


def summary(logs: Path, call: str, budget: str, elapsed: str, errors_cap: int, width: int) -> str:
    parts = [line.split("\t") for line in read(logs / "parts.tsv") if line.strip()]
    smi = [s.strip() for s in read(logs / "nvidia-smi.log") if s.strip()]
    pre = read(logs / "preflight.log")
    gpu = next((s for s in pre if s.startswith("GPU:")), None)
    versions = next((s for s in pre if s.startswith("triton ")), None)
    head = [f"==== SUMMARY of {call}: {elapsed} s of a {budget} s budget · logs of every part in logs.tgz",
            f"card: {smi[0] if smi else 'nvidia-smi: nothing'} · {gpu or 'GPU: (no line from preflight)'}"]
    if versions:
        head.append(clip(f"versions: {versions}", 400))
    status, details = [], []
    for fields in parts:
        name, rc, seconds, limit, note = (fields + [""] * 5)[:5]
        if rc == "skipped":
            status.append(f"== {name}: skipped ({note})")
            continue
        status.append(f"== {name}: exit {rc} ({seconds} s of {limit} s){' ' + note if note else ''}")
        lines = part_lines(name, read(logs / f"{name}.log"), rc, errors_cap, width)
        if lines:
            details.append(f"-- {name}")
            details.extend(lines)
    failed = [f[0] for f in parts if len(f) > 1 and f[1] not in ("0", "skipped")]
    verdict = (f"==== {call}: {len(parts) - len(failed)} of {len(parts)} parts passed or were skipped"
               + (f"; not passed: {', '.join(failed)}" if failed else ""))
    return "\n".join(head + status + [verdict] + details) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logs", type=Path)
    parser.add_argument("--call", default="gpu")
    parser.add_argument("--budget", default="?")
    parser.add_argument("--elapsed", default="?")
    args = parser.parse_args()
    text = ""
    for errors_cap, width in ((6, 240), (3, 200), (1, 160), (0, 140)):  # fewer error lines until it fits
        text = summary(args.logs, args.call, args.budget, args.elapsed, errors_cap, width)
        if len(text.encode()) <= LIMIT:
            break
    else:
        cut = text.encode()[:LIMIT - 80].decode(errors="ignore")
        text = cut[:cut.rfind("\n") + 1] + "(summary cut at 8 kB: every part's full log is in logs.tgz)\n"
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
