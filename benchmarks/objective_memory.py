"""Peak memory and time of one forward+backward of a distillation loss, chunked vs unchunked.

The shape defaults to SmolLM2-135M's head (H=576, V=49152) over a batch of B=4 sequences of T=1024
tokens. Both paths start from the same student hidden states `(B, T, H)` (requires grad), the
student LM head `(V, H)` (requires grad) and the teacher's hidden states and head (no grad):

- unchunked: student and teacher logits `(B, T, V)` are materialized, the loss is the reference
  `objective(student_logits, teacher_logits, labels)`, autograd does the backward;
- chunked: `objective.chunked(hidden, W, HeadTeacher(...), labels, chunk_size=C)`.

- liger (`--liger`, CUDA): Liger-Kernel's `LigerFusedLinearJSD` (JSD, beta 0.5) on the same
  hidden states and heads, a fused kernel for reference (another objective than the rows').

Each measurement runs in a fresh subprocess, so the peak resident memory (ru_maxrss) of one
forward+backward, minus the resident memory just before it, is the extra memory the loss needs;
with `--device cuda` it is the peak of allocated GPU memory above what was allocated before.
Time is the median of `--repeats` further runs in the same process.

    python benchmarks/objective_memory.py                    # the full table (about 2 minutes)
    python benchmarks/objective_memory.py --T 128 --repeats 1  # a quick look
    python benchmarks/objective_memory.py --device cuda --T 8192 --liger --json mem.json  # on a GPU
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
    dev = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    B, T, H, V = args.B, args.T, args.H, args.V
    h = (torch.randn(B, T, H, generator=g) * 0.5).to(dev).requires_grad_()
    W = (torch.randn(V, H, generator=g) * 0.05).to(dev).requires_grad_()
    th, tW = (torch.randn(B, T, H, generator=g) * 0.5).to(dev), (torch.randn(V, H, generator=g) * 0.05).to(dev)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, : T // 8] = -100  # a prompt
    labels[:, -1] = -100  # aligned labels: the last position predicts nothing (unshifted-looking labels are refused)
    labels = labels.to(dev)
    obj = get_objective(args.objective) if args.objective != "liger" else None
    liger = None
    if args.objective == "liger":
        from liger_kernel.transformers import LigerFusedLinearJSD

        liger = LigerFusedLinearJSD(jsd_beta=0.5)

    def step(seed: int) -> None:
        h.grad = W.grad = None
        gen = torch.Generator(device=dev).manual_seed(seed)
        if liger is not None:
            loss = liger(h.view(-1, H), W, th.view(-1, H), tW, labels.view(-1))
            loss.backward()
            return
        if args.chunk_size:
            out = obj.chunked(h, W, HeadTeacher(th, tW), labels, chunk_size=args.chunk_size, generator=gen,
                              diagnostics=False)
        else:
            with torch.no_grad():
                t_logits = th @ tW.T
            out = obj(h @ W.T, t_logits, labels, generator=gen, diagnostics=False)
        out.loss.backward()

    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() / 2**20 if cuda else rss_mib()
    step(0)
    if cuda:
        torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_mib()) - before
    times = []
    for i in range(args.repeats):
        t0 = time.perf_counter()
        step(i + 1)
        if cuda:
            torch.cuda.synchronize()
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
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--liger", action="store_true", help="also Liger-Kernel's fused linear JSD (CUDA; skipped with a "
                                                          "message when it does not import)")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    ap.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--objective", default="fkl", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        print(json.dumps(measure(args)))
        return

    def child(name: str, chunk: int) -> dict:
        cmd = [sys.executable, __file__, "--_child", "--objective", name, "--chunk-size", str(chunk)]
        for k in ("B", "T", "H", "V", "repeats", "threads", "device"):
            cmd += [f"--{k}", str(getattr(args, k))]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:  # e.g. out of memory: a row that says so, not a lost table
            return {"error": (res.stderr.strip().splitlines() or ["?"])[-1][:200]}
        return json.loads(res.stdout)

    rows = []
    for name in args.objectives.split(","):
        rows.append((name, {label: child(name, chunk) for label, chunk in (("unchunked", 0),
                                                                             ("chunked", args.chunk_size))}))
    liger = None
    if args.liger:
        liger = child("liger", 0)
        if "error" in liger:
            print(f"Liger-Kernel's fused JSD not measured: {liger['error']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": {k: getattr(args, k) for k in ("B", "T", "H", "V", "chunk_size", "device")},
                       "rows": dict(rows), "liger_fused_jsd": liger}, f, indent=1)
    if any("error" in r for _, res in rows for r in res.values()):
        for name, res in rows:
            for label, r in res.items():
                if "error" in r:
                    print(f"{name} {label}: failed ({r['error']})")
        rows = [(n, res) for n, res in rows if not any("error" in r for r in res.values())]

    print(f"B={args.B} T={args.T} H={args.H} V={args.V}, chunk={args.chunk_size} positions, "
          f"{args.threads} threads, float32 on {args.device}, one forward+backward of the loss")
    print()
    print("| objective | unchunked peak MiB | chunked peak MiB | memory ratio | unchunked s | chunked s | time ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, res in rows:
        u, c = res["unchunked"], res["chunked"]
        print(f"| {name} | {u['peak_mib']:.0f} | {c['peak_mib']:.0f} | {c['peak_mib'] / u['peak_mib']:.3f} | "
              f"{u['time_s']:.2f} | {c['time_s']:.2f} | {c['time_s'] / u['time_s']:.2f} |")
    if liger is not None and "error" not in liger:
        print(f"| liger fused JSD (reference) | | {liger['peak_mib']:.0f} | | | {liger['time_s']:.2f} | |")


if __name__ == "__main__":
    main()
