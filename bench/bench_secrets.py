"""What registering one more secret costs when many are registered already (a service registering
each request's API key), and what redacting a text costs then.

Each round is a fresh process (the registry is process-wide and keeps registered secrets for the
process's life): it registers random 43-character keys one after another and, at each mark N,
times the registration of the next ``--window`` keys (CPU time of the registering thread,
``time.thread_time``) and the redaction of fresh (unmemoised) ~2 KB texts holding no secret.
Medians and IQR (and the mean and maximum of the registrations: a few compile a full or merged
chunk of secrets) over every timed key (or text) of every round; and the CPU time of all the
registrations.

    python bench/bench_secrets.py                       # marks 10 100 1000 5000, 3 rounds
    python bench/bench_secrets.py --marks 10 100 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from typing import Any

from _stats import median_iqr

WORDS = ("the model answered with a plan for the next step of the analysis and the engineer "
         "wrote code that reads the catalogue, fits the spectrum and plots the residuals; ")


def child(marks: list[int], window: int, texts: int) -> dict[str, Any]:
    from cmbagent_otel import redaction

    out: dict[str, Any] = {}
    registered = 0
    began = time.thread_time()
    redacting = 0.0

    def key() -> str:
        return "sk-" + secrets.token_hex(20)

    for mark in sorted(marks):
        while registered < mark:
            redaction.register_secret(key())
            registered += 1
        costs = []
        for _ in range(window):
            value = key()
            start = time.thread_time()
            redaction.register_secret(value)
            costs.append(time.thread_time() - start)
            registered += 1
        redacts = []
        for i in range(texts):
            text = f"{i} {registered} " + WORDS * 12  # unique: no memo of any kind answers it
            start = time.thread_time()
            redaction.redact(text)
            redacts.append(time.thread_time() - start)
        redacting += sum(redacts)
        out[str(mark)] = {"register": costs, "redact": redacts, "total": time.thread_time() - began - redacting}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--marks", type=int, nargs="+", default=[10, 100, 1000, 5000])
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes")
    parser.add_argument("--window", type=int, default=16, help="keys timed at each mark")
    parser.add_argument("--texts", type=int, default=30, help="texts redacted at each mark")
    parser.add_argument("--json", help="write raw figures here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.marks, args.window, args.texts)))
        return 0
    rounds = []
    for _ in range(args.rounds):
        done = subprocess.run(
            [sys.executable, __file__, "--child", "--marks", *map(str, args.marks), "--window", str(args.window),
             "--texts", str(args.texts)],
            check=True, capture_output=True, text=True, env=os.environ.copy())
        rounds.append(json.loads(done.stdout))
    print(f"{'registered':>10}  {'register one more key (ms CPU)':<34}  {'mean':>6}  {'max':>6}  "
          "redact a 2 KB text (µs CPU)")
    for mark in sorted(args.marks):
        register = [1e3 * c for r in rounds for c in r[str(mark)]["register"]]
        redact = [1e6 * c for r in rounds for c in r[str(mark)]["redact"]]
        print(f"{mark:>10}  {median_iqr(register, '.2f', 6):<34}  {statistics.fmean(register):6.2f}  "
              f"{max(register):6.2f}  {median_iqr(redact, '.1f', 6)}")
    last = str(max(args.marks))
    total = statistics.median(r[last]["total"] for r in rounds)
    print(f"registering all {max(args.marks) + args.window:,} keys: {total:.2f} s CPU (median of the rounds)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rounds, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
