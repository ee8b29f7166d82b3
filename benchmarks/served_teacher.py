"""A served teacher (vLLM, `teacher.server`) against the in-process teacher, the cache and SFT.

On the bundled recipe (`hpd demo`'s student and data shape: batch 32, data.max_length 160, the
bundled teacher `hpd/assets/teacher`), this process trains on CPU 0 with one torch thread and the
engine serves on CPU 1 with one thread (`taskset`), so the two never share a core:

1. step time (median of each run's steps after the first `--warmup`) of `sft` without a teacher,
   `hpd` with the teacher in process, `hpd` from a top-K cache and `hpd` from the server (the
   next step's request sent while the current one trains); the ratio to the SFT step;
2. one request of the recipe's batch (32 sequences) at K = 0, 8, 32: seconds and bytes on the
   wire per scored token (JSON), the in-process teacher forward of the same batch beside it;
3. HPD's sample `y_hat` outside the served top-K: the fraction, and what it does to the loss and
   gradient of one batch against the in-process teacher (same draws), with the tail estimate and
   with the samples scored exactly (`teacher.server_exact_samples`);
4. `hpd cache-teacher --server` with one server, then two (the second on CPU 0), and in process.

Needs the engine (`make engine`). Prints the tables and writes OUT/results.md and OUT/results.json.

    python benchmarks/served_teacher.py --out /tmp/bench-served --steps 30
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path


def _step_stats(run_dir: Path, warmup: int) -> dict:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["type"] == "train"]
    times = [r["step_time_s"] for r in train if r["step"] > warmup]
    outside = [r["frac_sample_outside_topk"] for r in train if "frac_sample_outside_topk" in r]
    return {"median_step_s": statistics.median(times), "mean_step_s": statistics.fmean(times), "steps": len(times),
            "tokens_per_s": sum(r["tokens"] for r in train if r["step"] > warmup) / sum(times),
            "frac_sample_outside_topk": statistics.fmean(outside) if outside else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/bench-served"))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--top-k", type=int, default=8, help="top-K of the cache and the served teacher")
    ap.add_argument("--per-task", type=int, default=200, help="training problems per task")
    ap.add_argument("--cache-examples", type=int, default=0, help="sequences cached (0 = all training problems)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"
    os.sched_setaffinity(0, {0})  # the trainer on CPU 0; the engine goes on CPU 1
    import numpy as np
    import torch

    torch.set_num_threads(1)
    from hpd.data.collate import build_batch
    from hpd.data.encode import encode_file
    from hpd.apps.demo import BUNDLED_TEACHER, student_config, write_task_data
    from hpd.engine import EngineServer
    from hpd.models.loading import load_model
    from hpd.objectives import get_objective
    from hpd.teachers.served import TeacherServers, exact_scorer, topk_teacher
    from hpd.teachers.cache import TeacherCache, build_teacher_cache
    from hpd.training.trainer import train as run_training

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    train, eval_ = write_task_data(out, args.per_task, 30, args.seed)
    K = args.top_k

    def cfg(name, objective, extra):
        return student_config(out / "runs" / name, BUNDLED_TEACHER, train, eval_, objective=objective, steps=args.steps,
                              seed=args.seed, extra=["log.every=1", "log.diagnostics_every=1000000", "log.eval_every=0",
                                                     "log.progress=false", "log.tensorboard=off", "save.every=0", *extra])

    probe = cfg("probe", "hpd", [])
    results: dict = {"settings": vars(args) | {"out": str(out)}}
    serve_kw = dict(max_model_len=256, max_logprobs=64, threads=1, kv_cache_gib=0.25)
    t0 = time.perf_counter()
    with EngineServer(BUNDLED_TEACHER, cpus="1", log=out / "engine-a.log", **serve_kw) as server:
        results["engine_start_s"] = round(time.perf_counter() - t0, 1)
        cache_dir = out / f"cache-k{K}"
        if not (cache_dir / "manifest.json").is_file():
            build_teacher_cache(BUNDLED_TEACHER, [train, eval_], cache_dir, top_k=K, data=probe.data, log=None)

        # 1. step times
        methods = {
            "sft (no teacher)": ("sft", "sft", ["teacher.path=none"]),
            "hpd, teacher in process": ("hpd-online", "hpd", []),
            f"hpd, cache (K={K})": ("hpd-cache", "hpd", [f"teacher.cache={cache_dir}"]),
            f"hpd, served (K={K}, prefetch)": ("hpd-served", "hpd", ["teacher.path=none", f"teacher.server={server.url}",
                                                                    f"teacher.server_top_k={K}"]),
            f"hpd, served (K={K}, exact samples)": ("hpd-served-exact", "hpd", [
                "teacher.path=none", f"teacher.server={server.url}", f"teacher.server_top_k={K}",
                "teacher.server_exact_samples=true"]),
        }
        steps = {}
        for label, (name, objective, extra) in methods.items():
            run = out / "runs" / name
            if not (run / "final").is_dir():
                run_training(cfg(name, objective, extra))
            steps[label] = _step_stats(run, args.warmup)
        sft = steps["sft (no teacher)"]["mean_step_s"]
        results["steps"] = steps

        # 2. one request of the recipe's batch, and the in-process forward of it
        teacher, tok = load_model(str(BUNDLED_TEACHER), dtype="float32")
        examples = encode_file(str(train), tok, probe.data)[0][:probe.optim.batch_size]
        seqs = [e.prompt_ids + e.completion_ids for e in examples]
        b = build_batch([e.prompt_ids for e in examples], [e.completion_ids for e in examples], pad_id=tok.pad_token_id)
        with torch.no_grad():
            teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            t = time.perf_counter()
            for _ in range(3):
                logits = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
            forward_s = (time.perf_counter() - t) / 3
        pool = TeacherServers(server.url)
        pool.score(seqs, 8)  # warm
        scored_tokens = sum(len(s) - 1 for s in seqs)
        wire = {}
        for k in (0, 8, 32):
            before, times = pool.bytes_received, []
            for _ in range(3):
                t = time.perf_counter()
                pool.score(seqs, k)
                times.append(time.perf_counter() - t)
            wire[k] = {"request_s": statistics.median(times), "bytes_per_token": (pool.bytes_received - before) / 3 / scored_tokens}
        results["wire"] = {"in_process_forward_s": forward_s, "batch": len(seqs), "scored_tokens": scored_tokens,
                           "by_k": wire}

        # 3. y_hat outside the top-K: the loss and gradient of one batch against the in-process teacher
        student = load_model("hpd/assets/students/llama-2x96", dtype="float32")[0]
        params = list(student.parameters())
        obj = get_objective("hpd")
        ids, mask, labels = b["input_ids"], b["attention_mask"], b["labels"]

        def loss_grad(view):
            o = obj(student(input_ids=ids, attention_mask=mask).logits, view, labels,
                    generator=torch.Generator().manual_seed(5))
            g = torch.cat([x.flatten() for x in torch.autograd.grad(o.loss, params)])
            return o, g

        ref, gref = loss_grad(logits)
        topk_rows = {}
        for k, exact in ((8, False), (32, False), (64, False), (8, True)):
            view = topk_teacher(pool.score(seqs, k), ids.shape[1], k, 264,
                                score=exact_scorer(pool, seqs, ids.shape[1]) if exact else None)
            o, g = loss_grad(view)
            topk_rows[f"{k}, exact samples" if exact else k] = {"frac_sample_outside_topk": float(o.metrics.get("frac_sample_outside_topk", float("nan"))),
                            "loss_rel_diff": abs(float(o.loss.detach()) - float(ref.loss.detach())) / abs(float(ref.loss.detach())),
                            "grad_rel_diff": float((g - gref).norm() / gref.norm()),
                            "grad_cosine": float(torch.nn.functional.cosine_similarity(g, gref, dim=0))}
        results["outside_topk"] = topk_rows

        # 4. the cache by engines: one server, two servers, in process
        n = args.cache_examples
        data = [train]
        if n:
            sub = out / "data" / f"cache-{n}.jsonl"
            sub.write_text("".join(train.read_text().splitlines(keepends=True)[:n]))
            data = [sub]
        builds = {}
        t = time.perf_counter()
        build_teacher_cache(BUNDLED_TEACHER, data, out / "cache-inproc", top_k=K, data=probe.data, batch_size=32,
                            overwrite=True, log=None)
        builds["in process (1 core)"] = time.perf_counter() - t
        t = time.perf_counter()
        build_teacher_cache(BUNDLED_TEACHER, data, out / "cache-1", top_k=K, data=probe.data, batch_size=32,
                            overwrite=True, log=None, servers=server.url)
        builds["1 server"] = time.perf_counter() - t
        with EngineServer(BUNDLED_TEACHER, cpus="0", log=out / "engine-b.log", **serve_kw) as second:
            os.sched_setaffinity(0, {0, 1})
            t = time.perf_counter()
            build_teacher_cache(BUNDLED_TEACHER, data, out / "cache-2", top_k=K, data=probe.data, batch_size=32,
                                overwrite=True, log=None, servers=[server.url, second.url])
            builds["2 servers"] = time.perf_counter() - t
        c1, c2 = TeacherCache(out / "cache-1"), TeacherCache(out / "cache-2")
        results["cache"] = {"sequences": c1.manifest["examples"], "positions": c1.manifest["positions"],
                            "seconds": builds, "speedup_2_servers": builds["1 server"] / builds["2 servers"],
                            "same_label_logp": bool(np.array_equal(
                                np.concatenate([s[3]["label_logp"] for s in c1._shards]),
                                np.concatenate([s[3]["label_logp"] for s in c2._shards])))}

    lines = [f"Bundled recipe: batch {probe.optim.batch_size}, data.max_length {probe.data.max_length}, {args.steps} steps "
             f"(the steps after the first {args.warmup}), trainer on CPU 0 (1 thread), vLLM {serve_kw} on CPU 1; engine start "
             f"{results['engine_start_s']} s.", "",
             "| method | median step s | mean step s | x sft (mean) | tokens/s | y_hat outside top-K |",
             "|---|---:|---:|---:|---:|---:|"]
    for label, s in steps.items():
        frac = s["frac_sample_outside_topk"]
        lines.append(f"| {label} | {s['median_step_s']:.3f} | {s['mean_step_s']:.3f} | {s['mean_step_s'] / sft:.2f} | "
                     f"{s['tokens_per_s']:.0f} | "
                     f"{'' if frac is None else f'{frac:.4f}'} |")
    w = results["wire"]
    lines += ["", f"One request of the batch ({w['batch']} sequences, {w['scored_tokens']} scored tokens); the in-process "
                  f"teacher forward of it: {w['in_process_forward_s']:.3f} s.", "",
              "| K | request s | bytes on the wire per token |", "|---:|---:|---:|"]
    for k, v in w["by_k"].items():
        lines.append(f"| {k} | {v['request_s']:.3f} | {v['bytes_per_token']:.0f} |")
    lines += ["", "HPD on one batch, served top-K vs the in-process teacher (same draws):", "",
              "| K | y_hat outside top-K | loss rel. diff | grad rel. diff | grad cosine |", "|---:|---:|---:|---:|---:|"]
    for k, v in topk_rows.items():
        lines.append(f"| {k} | {v['frac_sample_outside_topk']:.4f} | {v['loss_rel_diff']:.2e} | {v['grad_rel_diff']:.2e} | "
                     f"{v['grad_cosine']:.6f} |")
    c = results["cache"]
    lines += ["", f"Cache build (top-{K}, {c['sequences']} sequences, {c['positions']} positions): "
                  + ", ".join(f"{k} {v:.1f} s" for k, v in c["seconds"].items())
                  + f"; 2 servers / 1 server speed-up {c['speedup_2_servers']:.2f}x; label log-probs identical: "
                  + str(c["same_label_logp"])]
    table = "\n".join(lines)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(table)


if __name__ == "__main__":
    main()
