"""Time ``normlab verify --quick`` end to end and per claim.

Runs the real command in a fresh output folder (so every run trains), reads the time each
claim took in that call from the debug log, and prints one row per claim and the total
wall time. Claims that share runs with an earlier claim take less, as in any real call.

To compare two versions of normlab on the same machine in one go, pass the source tree of
the other version with ``--baseline``. Each version then runs in turn, and the table gets
a column per version and their ratio::

    git worktree add /tmp/normlab-old <commit>
    OMP_NUM_THREADS=1 python benchmarks/verify_time.py --baseline /tmp/normlab-old

Other arguments after ``--`` go to ``normlab verify`` unchanged, for example
``-- --claims higher-lr,init-insensitivity --workers 2``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLAIM_TIME = re.compile(r"normlab\.verify: (\S+) took ([0-9.]+) s in this call")
REPO = Path(__file__).resolve().parent.parent


def time_verify(source: Path, extra: list[str]) -> tuple[dict[str, float], float]:
    """Run ``normlab verify --quick`` from ``source``; return per-claim and total seconds."""
    env = dict(os.environ, PYTHONPATH=str(source))
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "normlab", "verify", "--quick", "--no-progress",
                   "-v", "--out", out, *extra]
        started = time.perf_counter()
        # cwd is the empty output folder: `python -m` puts the working directory first on
        # sys.path, which would shadow PYTHONPATH with a checkout in the caller's folder
        done = subprocess.run(command, env=env, cwd=out, capture_output=True, text=True)
        total = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"normlab verify from {source} failed ({done.returncode}):\n{done.stderr}")
    per_claim = {m.group(1): float(m.group(2)) for m in CLAIM_TIME.finditer(done.stderr)}
    return per_claim, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, default=None,
                        help="source tree of another normlab version to time first")
    parser.add_argument("extra", nargs="*", help="arguments passed to normlab verify")
    args = parser.parse_args()

    versions = {}
    if args.baseline is not None:
        versions["baseline"] = time_verify(args.baseline.resolve(), args.extra)
    versions["this"] = time_verify(REPO, args.extra)

    names = list(versions)
    claims = list(dict.fromkeys(c for per_claim, _ in versions.values() for c in per_claim))
    width = max(len(c) for c in claims + ["total"])
    header = "claim".ljust(width) + "".join(f"{n:>12}" for n in names)
    if len(names) == 2:
        header += f"{'ratio':>10}"
    print(f"normlab verify --quick {' '.join(args.extra)}, seconds, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print(header)
    rows = [(c, [versions[n][0].get(c, float("nan")) for n in names]) for c in claims]
    rows.append(("total", [versions[n][1] for n in names]))
    for claim, seconds in rows:
        line = claim.ljust(width) + "".join(f"{s:12.1f}" for s in seconds)
        if len(seconds) == 2:
            line += f"{seconds[0] / seconds[1]:10.2f}x"
        print(line)


if __name__ == "__main__":
    main()
