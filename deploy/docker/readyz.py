"""Exit 0 when the teacher answers GET /readyz with 200, else 1: the images' HEALTHCHECK, the compose
healthcheck, the Kubernetes readiness probe, and (with --wait) the trainer pods' wait for their teacher.

    python deploy/docker/readyz.py [URL] [--wait SECONDS]

URL defaults to http://127.0.0.1:8000/readyz. With the service's auth on, /readyz needs the key: it is sent
as a bearer token when TROPD_API_KEY is set (the variable that `--api-key-env TROPD_API_KEY` names).
Standard library only, so that it runs in any image without curl.
"""

from __future__ import annotations

import os
import sys
import time
import urllib.error
import urllib.request


def ready(url: str, key: str | None) -> bool:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=4) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def main(argv: list[str]) -> int:
    wait = 0.0
    if "--wait" in argv:
        i = argv.index("--wait")
        wait = float(argv[i + 1])
        argv = argv[:i] + argv[i + 2 :]
    url = argv[0] if argv else "http://127.0.0.1:8000/readyz"
    key = os.environ.get("TROPD_API_KEY") or None
    deadline = time.monotonic() + wait
    while not ready(url, key):
        if time.monotonic() >= deadline:
            print(f"readyz: {url} is not ready", file=sys.stderr)
            return 1
        time.sleep(3)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
