"""Kill the decode replica while the prefill replica runs its prompt; count what the prefill ran.

python -m bench.kill_decode_mid_prefill [--url http://127.0.0.1:8000] [--prompt-len 1900]
    [--kill-after-s 0.25]

Against a running server whose every prompt goes to the prefill replica, in chunks small
enough that the prompt is still running when the kill comes, e.g.:

    python -m bench.config_variant configs/tiny.yaml decode.local_prefill_max_tokens=0 \
        "prefill.engine={max_num_batched_tokens: 16}" --out /tmp/pure16.yaml
    serve run /tmp/pure16.yaml

One completion request of `--prompt-len` token ids; `--kill-after-s` later the decode replica's
process (found with `pgrep`, same host) gets SIGKILL. The ingress resumes the request on the
replacement decode replica, which calls the prefill replica again. Printed: the prefill
replica's prompt tokens counted (a prefill counts its tokens when it ends) and its requests.
Tokens equal to one prompt's mean the orphaned prefill was aborted when its caller's socket
closed; two prompts' mean it ran to the end for nobody. A race by design: a manual check, not
a test.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import threading
import time
import urllib.request

from bench.soak import role_totals


def prefill_counts(url: str) -> tuple[float, ...]:
    """(prompt tokens, requests) counted by the prefill replicas."""
    return role_totals(url, "prefill", ("pdserve_prompt_tokens_total", "pdserve_requests_total"))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--prompt-len", type=int, default=1900)
    ap.add_argument("--kill-after-s", type=float, default=0.25)
    args = ap.parse_args(argv)
    models = json.loads(urllib.request.urlopen(f"{args.url}/v1/models", timeout=10).read())
    body = json.dumps({"model": models["data"][0]["id"], "max_tokens": 4,
                       "prompt": [10 + i % 1000 for i in range(args.prompt_len)]}).encode()
    before = prefill_counts(args.url)
    answer: list[str] = []

    def send() -> None:
        request = urllib.request.Request(f"{args.url}/v1/completions", body,
                                         {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as r:
                answer.append(f"HTTP {r.status}")
        except OSError as e:
            answer.append(f"failed: {e}")

    client = threading.Thread(target=send)
    client.start()
    time.sleep(args.kill_after_s)
    pid = int(subprocess.check_output(["pgrep", "-f", "ServeReplica:pdserve:decode"]).split()[0])
    os.kill(pid, signal.SIGKILL)
    client.join()
    time.sleep(3)  # the metrics push interval
    tokens, requests = (a - b for a, b in zip(prefill_counts(args.url), before))
    print(f"decode replica {pid} killed {args.kill_after_s} s in; the request: {answer[0]}")
    print(f"prefill replica: {requests:.0f} requests, {tokens:.0f} prompt tokens counted "
          f"({tokens / args.prompt_len:.0f} prompts' worth run to the end)")


if __name__ == "__main__":
    main()
