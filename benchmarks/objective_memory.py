"""Peak memory and time of one forward+backward of a distillation loss, chunked vs unchunked.

The shape defaults to SmolLM2-135M's head (H=576, V=49152) over a batch of B=4 sequences of T=1024
tokens. Both paths start from the same student hidden states `(B, T, H)` (requires grad), the
student LM head `(V, H)` (requires grad) and the teacher's hidden states and head (no grad):

- unchunked: student and teacher logits `(B, T, V)` are materialized, the loss is the reference
  `objective(student_logits, teacher_logits, labels)`, autograd does the backward;
- chunked: `objective.chunked(hidden, W, HeadTeacher(...), labels, chunk_size=C)`.

Each measurement runs in a fresh subprocess, so the peak resident memory (ru_maxrss) of one
forward+backward, minus the resident memory just before it, is the extra memory the loss needs.
Time is the median of `--repeats` further runs in the same process.

    python benchmarks/objective_memory.py                    # the full table (about 2 minutes)
    python benchmarks/objective_memory.py --T 128 --repeats 1  # a quick look
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(args) -> dict:
    import torch

    from hpd.objectives import HeadTeacher, get_objective

    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    B, T, H, V = args.B, args.T, args.H, args.V
    h = (torch.randn(B, T, H, generator=g) * 0.5).requires_grad_()
    W = (torch.randn(V, H, generator=g) * 0.05).requires_grad_()
    th, tW = torch.randn(B, T, H, generator=g) * 0.5, torch.randn(V, H, generator=g) * 0.05
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, : T // 8] = -100  # a prompt
    labels[:, -1] = -100  # aligned labels: the last position predicts nothing (unshifted-looking labels are refused)
    obj = get_objective(args.objective)

    def step(seed: int) -> None:
        h.grad = W.grad = None
        gen = torch.Generator().manual_seed(seed)
        if args.chunk_size:
            out = obj.chunked(h, W, HeadTeacher(th, tW), labels, chunk_size=args.chunk_size, generator=gen,
                              diagnostics=False)
        else:
            with torch.no_grad():
                t_logits = th @ tW.T
            out = obj(h @ W.T, t_logits, labels, generator=gen, diagnostics=False)
        out.loss.backward()

    before = rss_mib()
    step(0)
    peak = peak_mib() - before
    times = []
    for i in range(args.repeats):
        t0 = time.perf_counter()
        step(i + 1)
        times.append(time.perf_counter() - t0)
    return {"peak_mib": peak, "time_s": statistics.median(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--H", type=int, default=576)
    ap.add_argument("--V", type=int, default=49152)
    ap.add_argument("--objectives", default="fkl,hpd")
    ap.add_argument("--chunk-size", type=int, default=512, help="positions per chunk of the chunked path")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--objective", default="fkl", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        print(json.dumps(measure(args)))
        return

    rows = []
    for name in args.objectives.split(","):
        res = {}
        for label, chunk in (("unchunked", 0), ("chunked", args.chunk_size)):
            cmd = [sys.executable, __file__, "--_child", "--objective", name, "--chunk-size", str(chunk)]
            for k in ("B", "T", "H", "V", "repeats", "threads"):
                cmd += [f"--{k}", str(getattr(args, k))]
            res[label] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        rows.append((name, res))

    print(f"B={args.B} T={args.T} H={args.H} V={args.V}, chunk={args.chunk_size} positions, "
          f"{args.threads} threads, float32, one forward+backward of the loss")
    print()
    print("| objective | unchunked peak MiB | chunked peak MiB | memory ratio | unchunked s | chunked s | time ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, res in rows:
        u, c = res["unchunked"], res["chunked"]
        print(f"| {name} | {u['peak_mib']:.0f} | {c['peak_mib']:.0f} | {c['peak_mib'] / u['peak_mib']:.3f} | "
              f"{u['time_s']:.2f} | {c['time_s']:.2f} | {c['time_s'] / u['time_s']:.2f} |")


if __name__ == "__main__":
    main()
