"""The smoke test's client (standard library only, so it runs with any host ``python3``).

    python3 tests/docker/smoke_request.py health  URL [TIMEOUT_S]   # wait for GET /health == 200
    python3 tests/docker/smoke_request.py chat    URL MODEL         # one image chat; prints the outcome
    python3 tests/docker/smoke_request.py metrics URL               # the asymvlm counters on /metrics

``chat`` sends an OpenAI chat completion with one 64x64 PNG (a data URL) and a question, and
fails unless the response carries ``kv_transfer_params.asymvlm.status == "pruned"``.
``metrics`` fails unless ``asymvlm_requests_total{status="pruned"}`` is at least 1.
"""

from __future__ import annotations

import base64
import json
import struct
import sys
import time
import urllib.error
import urllib.request
import zlib


def png(width: int = 64, height: int = 64) -> bytes:
    """An RGB PNG: a red square on a blue background (the shapes model's kind of picture)."""
    rows = []
    for y in range(height):
        row = bytearray([0])  # filter: none
        for x in range(width):
            inside = width // 4 <= x < 3 * width // 4 and height // 4 <= y < 3 * height // 4
            row += bytes((220, 30, 30) if inside else (30, 60, 200))
        rows.append(bytes(row))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"".join(rows)))
            + chunk(b"IEND", b""))


def wait_healthy(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=10) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            sys.exit(f"no 200 from {url}/health within {timeout_s:.0f} s")
        time.sleep(3)


def chat(url: str, model: str) -> None:
    image = "data:image/png;base64," + base64.b64encode(png()).decode("ascii")
    body = {"model": model, "max_tokens": 8, "temperature": 0.0,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                                      {"type": "text", "text": "what colour is the square?"}]}]}
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        answer = json.loads(response.read())
    outcome = (answer.get("kv_transfer_params") or {}).get("asymvlm") or {}
    print(json.dumps({"text": answer["choices"][0]["message"]["content"], "usage": answer.get("usage"),
                      "asymvlm": outcome}))
    if outcome.get("status") != "pruned":
        sys.exit(f"expected the outcome status 'pruned', got {outcome!r}")


def metrics(url: str) -> None:
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as response:
        text = response.read().decode()
    lines = [line for line in text.splitlines() if line.startswith("asymvlm")]
    print("\n".join(lines))
    pruned = [float(line.rsplit(" ", 1)[1]) for line in lines
              if line.startswith('asymvlm_requests_total{') and 'status="pruned"' in line]
    if not pruned or max(pruned) < 1:
        sys.exit('/metrics has no asymvlm_requests_total{status="pruned"} >= 1')


if __name__ == "__main__":
    command, url, *rest = sys.argv[1:]
    if command == "health":
        wait_healthy(url, float(rest[0]) if rest else 600)
    elif command == "chat":
        chat(url, rest[0])
    elif command == "metrics":
        metrics(url)
    else:
        sys.exit(f"unknown command {command!r}")
