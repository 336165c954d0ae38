"""Turn what ``benchmarks/gpu/run.sh`` left under ``$OUT`` into result rows and a table (benchmark
tooling, run on the development machine after the device call).

    python benchmarks/gpu/record.py FILES_AT [--out benchmarks/results/gpu_YYYY-MM-DD.json]

One row per step (``rc``, seconds, and what the step measured), each with the commit and dirty
flag of this checkout, the GPU, the route (torch, Triton, stand-in ops, attention backend) and
the date. Prints a Markdown table for ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _checkout() -> dict:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import checkout

    return checkout()


def rows_from(out_dir: Path) -> list[dict]:
    """The rows of one run's output folder."""
    environment = {}
    env_file = out_dir / "environment.json"
    if env_file.exists():
        text = [line for line in env_file.read_text().splitlines() if line.startswith("{")]
        environment = json.loads(text[-1]) if text else {}
    common = {**_checkout(), "gpu": environment.get("device", "unknown"),
              "route": {k: environment.get(k) for k in ("torch", "cuda", "triton", "transformers", "vllm")}
              | {"compiled_ops": "stand-ins (benchmarks/gpu/standins.py)", "attention": "TRITON_ATTN"},
              "date": dt.date.today().isoformat()}
    measured: dict[str, list[dict]] = {
        "a_smoke_llava": [r for r in _lines(out_dir / "a_smoke.jsonl") if r.get("model") == "llava-1.5-7b"],
        "a2_smoke_qwen": [r for r in _lines(out_dir / "a_smoke.jsonl") if r.get("model") == "qwen2.5-vl-7b"],
        "d_throughput": [r for r in _lines(out_dir / "d_throughput.jsonl") if r.get("model") != "qwen2.5-vl-7b"],
        "d2_throughput_qwen": [r for r in _lines(out_dir / "d_throughput.jsonl") if r.get("model") == "qwen2.5-vl-7b"],
    }
    for path in sorted(out_dir.glob("c_*.json")):
        measured.setdefault("c_kernel_benchmarks", []).extend(json.loads(path.read_text()))
    rows = []
    for step in _lines(out_dir / "steps.jsonl"):
        rows.append({**common, **step, "measured": measured.get(step["step"], [])})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| step | rc | seconds | result |", "|---|---|---|---|"]
    for row in rows:
        result = ""
        if row["step"].startswith("d"):
            ratio = [m["ratio"] for m in row["measured"] if m.get("step") == "throughput_ratio"]
            result = f"plugin / plain requests per second: {ratio[0]:.2f}" if ratio else ""
        elif row["step"].startswith("a"):
            ok = [m for m in row["measured"] if "ok" in m]
            result = f"{sum(m['ok'] for m in ok)}/{len(ok)} requests answered as expected" if ok else ""
        lines.append(f"| {row['step']} | {row['rc']} | {row['seconds']} | {result} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="benchmarks/gpu/record.py", description=__doc__.splitlines()[0])
    parser.add_argument("files_at", type=Path, help="the device call's files_at folder ($OUT)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    rows = rows_from(args.files_at)
    if not rows:
        sys.exit(f"{args.files_at} holds no steps.jsonl: nothing ran")
    out = args.out or ROOT / "benchmarks" / "results" / f"gpu_{rows[0]['date']}.json"
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import append_rows

    append_rows(out, rows)
    print(f"{len(rows)} rows -> {out}\n\n{table(rows)}")
    return rows


if __name__ == "__main__":
    main()
