"""How fast does the `hpd` command answer? Median wall time of `hpd --help`, `hpd train --help`
and `import hpd`, each in a fresh Python process, next to a bare interpreter start.

    PYTHONPATH=. python benchmarks/cli_startup.py                  # this checkout, 7 runs each
    PYTHONPATH=. python benchmarks/cli_startup.py --runs 15
    python benchmarks/cli_startup.py --root /path/to/other/checkout  # e.g. the code before a change

Each command runs as `python -m hpd.apps.cli ...` (what the `hpd` console script runs) in --root
with PYTHONPATH set to it, so two checkouts can be compared on one machine and one interpreter.
The last column says whether the command imported torch (the seconds it costs are the point).
Prints a markdown table; the figures depend on the machine and its load: compare columns of one
run, not runs of different days.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# What each case runs after `python`; the probe appended to it reports whether torch was imported.
CASES = {
    "python -c pass (interpreter alone)": ["-c", "pass"],
    "import hpd": ["-c", "import hpd"],
    "hpd --help": ["-m", "hpd.apps.cli", "--help"],
    "hpd train --help": ["-m", "hpd.apps.cli", "train", "--help"],
}

_PROBE = (
    "import runpy, sys, atexit\n"
    "atexit.register(lambda: sys.stderr.write('\\nTORCH=%d\\n' % ('torch' in sys.modules)))\n"
    "args = sys.argv[1:]\n"
    "if args[0] == '-c':\n"
    "    sys.argv = ['-c']; exec(compile(args[1], '<case>', 'exec'), {'__name__': '__main__'})\n"
    "else:\n"
    "    sys.argv = [args[1], *args[2:]]; runpy.run_module(args[1], run_name='__main__', alter_sys=True)\n"
)


def _imports_torch(python: str, args: list[str], env: dict[str, str]) -> bool:
    """Whether the case imports torch (run once more with a probe; not timed)."""
    proc = subprocess.run([python, "-c", _PROBE, *args], env=env, cwd=env["PYTHONPATH"], capture_output=True, text=True)
    return "TORCH=1" in proc.stderr


def measure(python: str, args: list[str], env: dict[str, str], runs: int) -> list[float]:
    """Wall seconds of `runs` fresh processes of `python *args` (output discarded)."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        proc = subprocess.run([python, *args], env=env, cwd=env["PYTHONPATH"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
        times.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            raise SystemExit(f"`{' '.join(args)}` failed: {proc.stderr.decode()[-500:]}")
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1], help="Checkout to measure.")
    ap.add_argument("--runs", type=int, default=7, help="Processes per command (the median is shown).")
    ap.add_argument("--python", default=sys.executable, help="Interpreter to run.")
    a = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(a.root.resolve())}
    print(f"checkout {a.root.resolve()}, {a.runs} runs each, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}\n")
    print("| command | median s | min s | max s | imports torch |")
    print("| --- | ---: | ---: | ---: | --- |")
    for name, args in CASES.items():
        measure(a.python, args, env, 1)  # warm the file cache
        times = measure(a.python, args, env, a.runs)
        torch = "yes" if _imports_torch(a.python, args, env) else "no"
        print(f"| {name} | {statistics.median(times):.3f} | {min(times):.3f} | {max(times):.3f} | {torch} |")


if __name__ == "__main__":
    main()
