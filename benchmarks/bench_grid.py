"""The seed-0 learning-rate grid of a `hpd bench` condition as one table: every method x rate,
validation accuracy (what picks the rate) and test accuracy, from the runs finished so far.

`hpd bench --report` prints the tuned tables once the grid is complete; this prints the grid
itself, complete or not, so a partial bench says which rate each finished method preferred.

    hpd bench --starts pretrained --data gold-epochs,traces-epochs --lr-grid 0.033,0.1,0.333,1 \\
        --out /tmp/rep --archive benchmarks/results/bench --report     # restores the archived runs
    python benchmarks/bench_grid.py /tmp/rep pretrained-gold-epochs
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def grid(out: Path, condition: str) -> dict[str, dict[float, tuple[float, float]]]:
    """method -> lr -> (validation accuracy, test accuracy), seed-0 runs that are scored."""
    table: dict[str, dict[float, tuple[float, float]]] = {}
    for run in sorted((out / "runs" / condition).glob("*/lr*-s0")):
        val, test = run / "eval-val.json", run / "eval-test.json"
        if not (val.is_file() and test.is_file()):
            continue
        lr = float(run.name[2:].rsplit("-s", 1)[0])
        acc = lambda p: json.loads(p.read_text())["accuracy"]  # noqa: E731
        table.setdefault(run.parent.name, {})[lr] = (acc(val), acc(test))
    return table


def main(out: str, condition: str) -> None:
    table = grid(Path(out), condition)
    rates = sorted({lr for by in table.values() for lr in by})
    print(f"Seed 0, {condition}: validation accuracy % / test accuracy % (mean of the tasks' problems) per rate; "
          "* = the rate validation picks among those finished\n")
    print("| method | " + " | ".join(f"{lr:.2g}" for lr in rates) + " |")
    print("|---|" + "---:|" * len(rates))
    for method, by in table.items():
        best = max(by, key=lambda lr: (by[lr][0], lr))  # a tie: the higher rate (the bench: nearest its base rate)
        cells = [f"{100 * by[lr][0]:.1f} / {100 * by[lr][1]:.1f}" + ("*" if lr == best and len(by) > 1 else "")
                 if lr in by else "-" for lr in rates]
        print(f"| {method} | " + " | ".join(cells) + " |")
    print(f"\n{sum(len(by) for by in table.values())} seed-0 runs finished")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python benchmarks/bench_grid.py OUT CONDITION")
    main(*sys.argv[1:])
