"""Run the app once as soon as its server answers, before any visitor does (see `make app`).

Streamlit decides on its first script run how to treat the project's pages/ folder; when that first
run is a visitor's deep link (a shared /merge?method=ties&k=20 link), the visitor saw a "Page not
found" box. This script waits for the server's health endpoint, then asks the script health check
(enabled in .streamlit/config.toml) to run app.py once, which also loads the demo zoo into memory.

    python scripts/warm_up.py [URL]     (default http://127.0.0.1:8501)
"""
from __future__ import annotations

import sys
import time
import urllib.error
import urllib.request

START_TIMEOUT_S = 120


def warm_up(url: str, timeout_s: float = START_TIMEOUT_S) -> str:
    """Wait for `url`'s server, run the app once; returns the health check's answer."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2):
                break
        except OSError:
            if time.monotonic() > deadline:
                return "the server did not answer"
            time.sleep(0.3)
    try:
        with urllib.request.urlopen(f"{url}/_stcore/script-health-check", timeout=timeout_s) as answer:
            return answer.read().decode(errors="replace").strip() or "ok"
    except urllib.error.HTTPError as exc:  # 503: the app raised; the visitor will see why
        return f"the app's first run failed ({exc.code})"
    except OSError as exc:
        return f"no answer ({exc})"


if __name__ == "__main__":
    result = warm_up(sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8501")
    print(f"warm-up: {result}", file=sys.stderr)
