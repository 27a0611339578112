"""The lines of dflash that only a GPU runs, and the tests that run each of them on the CPU.

    pip install coverage && python scripts/cuda_lines.py > docs/cuda-path.md

A line is GPU-only when it sits behind a GPU test: in the branch of an `if` on `cuda.is_gpu(...)`,
`cuda.is_available()`, `graphs_enabled(...)`, a `gpu` flag set from one of them, a captured graph's
`self.enabled` or an event's `ready`; after an early `return`/`raise` on the negation of one; or in
a region that only the GPU reaches (the real torch.cuda backend, graph capture). The script finds
them with `ast`, then runs the tests that drive the GPU branches under tests/fake_cuda.py's stand-in
with coverage, one context per test, and prints a Markdown table: each GPU-only line and the tests
that ran it, the lines no test ran first.
"""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = sorted({p.resolve() for p in [*(ROOT / "dflash_cli").rglob("*.py"), *(ROOT / "kernels").glob("*.py")]})
TESTS = ["tests/test_cuda_path.py", "tests/test_graph_safety.py", "tests/test_train_attention.py",
         "tests/test_doctor.py", "tests/test_cli_models.py::test_no_gpu_warning_only_without_a_gpu",
         "tests/kernels/test_attention.py::test_a_long_fp32_prefill_chunk_on_the_gpu_goes_through_the_split_kernel",
         "tests/test_conformance.py::test_kernel_path_tokens_equal_the_reference_path[qwen3]"]
GPU_TEST = re.compile(r"\bis_gpu\(|\bcuda\.is_available\(|\bgraphs_enabled\(|(?<![\w.])gpu\b|\bself\.gpu\b|"
                      r"\bself\.enabled\b|\bready is not None\b")
# Regions the GPU alone reaches: (file, qualified name of a class or function).
REGIONS = {("dflash_cli/cuda.py", "TorchCuda"), ("dflash_cli/graphs.py", "capture"),
           ("dflash_cli/graphs.py", "StepGraph")}


def _negated(test: ast.expr) -> bool:
    return isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not)


def _lines(nodes: list[ast.stmt], in_function: bool = True) -> set[int]:
    """The statements' lines that run when the code runs: not a `def` or `class` line, nor a class
    body's own statements (those run at import)."""
    out: set[int] = set()
    for node in nodes:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out |= _lines(node.body)
        elif isinstance(node, ast.ClassDef):
            out |= _lines(node.body, in_function=False)
        elif in_function:
            out |= {sub.lineno for sub in ast.walk(node) if isinstance(sub, ast.stmt)}
    return out


def _ends(body: list[ast.stmt]) -> bool:
    return bool(body) and isinstance(body[-1], (ast.Return, ast.Raise))


def gpu_only_lines(path: Path) -> set[int]:
    source = path.read_text()
    tree = ast.parse(source)
    rel = str(path.relative_to(ROOT))
    found: set[int] = set()

    def visit_block(body: list[ast.stmt]) -> None:
        for i, node in enumerate(body):
            if isinstance(node, ast.If) and GPU_TEST.search(ast.get_source_segment(source, node.test) or ""):
                if _negated(node.test):
                    found.update(_lines(node.orelse))
                    if _ends(node.body):  # `if not gpu: return ...`: the rest of the block is the GPU's
                        found.update(_lines(body[i + 1:]))
                else:
                    found.update(_lines(node.body))
            for field in ("body", "orelse", "finalbody", "handlers"):
                child = getattr(node, field, None)
                if isinstance(child, list) and child and isinstance(child[0], ast.stmt):
                    visit_block(child)
                elif isinstance(child, list):
                    for handler in child:
                        if isinstance(handler, ast.ExceptHandler):
                            visit_block(handler.body)

    visit_block(tree.body)
    for node in ast.walk(tree):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and (rel, node.name) in REGIONS:
            found.update(_lines([node]))
    return {n for n in found if not source.splitlines()[n - 1].strip().startswith(("#", '"""'))}


def _cell(code: str) -> str:
    return code.replace("|", "\\|")


def main() -> int:
    try:
        import coverage
    except ImportError:
        print("needs coverage: pip install coverage", file=sys.stderr)
        return 2
    data_file = ROOT / ".coverage.cuda-lines"
    rc = ROOT / ".coveragerc.cuda-lines"
    rc.write_text("[run]\ndynamic_context = test_function\n")
    run = [sys.executable, "-m", "coverage", "run", f"--rcfile={rc}", f"--data-file={data_file}",
           "--include=*/dflash_cli/*,*/kernels/*", "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS]
    try:
        done = subprocess.run(run, cwd=ROOT, stdout=sys.stderr)
    finally:
        rc.unlink()
    if done.returncode != 0:
        print(f"the tests failed (exit {done.returncode})", file=sys.stderr)
        return 1
    data = coverage.CoverageData(basename=str(data_file))
    data.read()
    measured = {Path(f).resolve(): f for f in data.measured_files()}
    rows, missing = [], []
    for path in PACKAGE:
        lines = gpu_only_lines(path)
        if not lines:
            continue
        key = measured.get(path.resolve())
        by_line = data.contexts_by_lineno(key) if key else {}
        source = path.read_text().splitlines()
        rel = str(path.relative_to(ROOT))
        for n in sorted(lines):
            tests = sorted({c.rsplit(".", 1)[-1] for c in by_line.get(n, []) if c})
            row = (f"{rel}:{n}", source[n - 1].strip(), tests)
            (rows if tests else missing).append(row)
    data_file.unlink(missing_ok=True)
    print("# Lines only a GPU runs, and the tests that run them on the CPU\n")
    print("Made by `python scripts/cuda_lines.py > docs/cuda-path.md` (needs `pip install coverage`): the GPU-only")
    print("lines found in the source (see the script's docstring for the rule), each with the tests that executed it")
    print("under tests/fake_cuda.py's stand-in for torch.cuda.\n")
    print(f"{len(rows) + len(missing)} GPU-only lines; {len(rows)} run by a test, {len(missing)} by none.\n")
    if missing:
        print("## Run by no test\n\n| line | code |\n|---|---|")
        for where, code, _ in missing:
            print(f"| `{where}` | `{_cell(code)}` |")
        print()
    print("## Run by tests\n\n| line | code | tests |\n|---|---|---|")
    for where, code, tests in rows:
        shown = ", ".join(f"`{t}`" for t in tests[:2]) + (f" (+{len(tests) - 2})" if len(tests) > 2 else "")
        print(f"| `{where}` | `{_cell(code)}` | {shown} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
