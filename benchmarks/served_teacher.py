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
4. `hpd cache-teacher --server` with one server, then two (the second on CPU 0), and in process,
   `--rounds` times in turn, with each build's CPU seconds (this process, the servers).

Each request's CPU seconds are the client's (this process) and the server's (the engine's process
group, from /proc): on a shared machine they are the figures that compare, not the wall time.

`--recipe smollm2 --model DIR` measures part 1 (and the request table of part 2) at the SmolLM2
shape instead (configs/smollm2-135m-to-10l.yaml: the 30-layer SmolLM2-135M-Instruct teacher in
DIR, served; a 10-layer student made of every third of its layers, `save_student_from_teacher`;
batch 4, max_length 160, the recipe's chat answers, the first 4 x --steps of them), the methods run in turn `--rounds` times so
that a change of load falls on all of them.

Needs the engine (`make engine`). Prints the tables and writes OUT/results.md and OUT/results.json.

    python benchmarks/served_teacher.py --out /tmp/bench-served --steps 30
    python benchmarks/served_teacher.py --recipe smollm2 --model models/smollm2 --out /tmp/bench-served-smol --steps 12
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path


def group_cpu_seconds(pgid: int) -> float:
    """The engine's CPU seconds (its process group; imported late: torch after OMP_NUM_THREADS is set)."""
    from hpd.responses.vllm_generate import group_cpu_seconds as cpu

    return cpu(pgid)


def _engine(model, log: Path, args, serve_kw: dict):
    """The teacher's engine on CPU 1 (a context manager: started on entry, stopped on exit), with the
    model worker in the engine-core process when `--worker-in-engine-core`."""
    from hpd.engine import EngineServer

    server = EngineServer(model, cpus="1", log=log, **serve_kw)
    return server.worker_in_engine_core() if args.worker_in_engine_core else server


def _step_stats(run_dir: Path, warmup: int) -> dict:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["type"] == "train"]
    times = [r["step_time_s"] for r in train if r["step"] > warmup]
    outside = [r["frac_sample_outside_topk"] for r in train if "frac_sample_outside_topk" in r]
    cpu = [r["cpu_s"] for r in train if r["step"] >= warmup]  # cumulative: the steps after warmup
    return {"median_step_s": statistics.median(times), "mean_step_s": statistics.fmean(times), "steps": len(times),
            "cpu_s_per_step": (cpu[-1] - cpu[0]) / (len(cpu) - 1),
            "tokens_per_s": sum(r["tokens"] for r in train if r["step"] > warmup) / sum(times),
            "frac_sample_outside_topk": statistics.fmean(outside) if outside else None}


SMOL_DATA = Path(__file__).resolve().parent / "results" / "smollm2-recipe" / "data"


def _wire_table(pool, url_pgid: int, seqs, forward_s: float, ks=(0, 8, 32)) -> dict:
    """One request of `seqs` at each K (median of 3 after a warm-up): wall s, the client's and the
    server's CPU s, bytes on the wire per scored token."""
    pool.score(seqs, 8)  # warm
    scored_tokens = sum(len(s) - 1 for s in seqs)
    wire = {}
    for k in ks:
        before, times, client, server = pool.bytes_received, [], [], []
        for _ in range(3):
            c, g, t = time.process_time(), group_cpu_seconds(url_pgid), time.perf_counter()
            pool.score(seqs, k)
            times.append(time.perf_counter() - t)
            client.append(time.process_time() - c)
            server.append(group_cpu_seconds(url_pgid) - g)
        wire[k] = {"request_s": statistics.median(times), "client_cpu_s": statistics.median(client),
                   "server_cpu_s": statistics.median(server),
                   "bytes_per_token": (pool.bytes_received - before) / 3 / scored_tokens}
    return {"in_process_forward_s": forward_s, "batch": len(seqs), "scored_tokens": scored_tokens, "by_k": wire}


def _wire_lines(w: dict) -> list[str]:
    lines = ["", f"One request of the batch ({w['batch']} sequences, {w['scored_tokens']} scored tokens); the in-process "
                 f"teacher forward of it: {w['in_process_forward_s']:.3f} s.", "",
             "| K | request s | server CPU s | client CPU s | bytes on the wire per token |", "|---:|---:|---:|---:|---:|"]
    for k, v in w["by_k"].items():
        lines.append(f"| {k} | {v['request_s']:.3f} | {v['server_cpu_s']:.3f} | {v['client_cpu_s']:.3f} | "
                     f"{v['bytes_per_token']:.0f} |")
    return lines


def _forward_s(teacher, b, repeats: int = 3) -> float:
    import torch

    with torch.no_grad():
        teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        t = time.perf_counter()
        for _ in range(repeats):
            teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
    return (time.perf_counter() - t) / repeats


def smollm2(args) -> None:
    """Step times at the SmolLM2 shape (see the module docstring), the methods in turn `--rounds` times."""
    import torch

    from hpd.config import load_config
    from hpd.data.collate import build_batch
    from hpd.data.encode import encode_file
    from hpd.models.loading import load_model
    from hpd.models.from_teacher import save_student_from_teacher
    from hpd.teachers.served import TeacherServers
    from hpd.teachers.cache import build_teacher_cache
    from hpd.training.trainer import train as run_training

    out, K, model = args.out, args.top_k, Path(args.model).resolve()
    out.mkdir(parents=True, exist_ok=True)
    root = Path(__file__).resolve().parents[1]
    student = save_student_from_teacher(str(model), "every:3", out / "student-10l")
    # The rows the runs read (steps x batch 4, one epoch), so that the cache covers no more than they need.
    # (The eval file is checked against the cache too, though no run evaluates: 4 held-out rows.)
    train, eval_ = out / "data" / "train.jsonl", out / "data" / "eval.jsonl"
    train.parent.mkdir(exist_ok=True)
    for dst, src, n in ((train, "teacher_chat_train.jsonl", 4 * args.steps), (eval_, "teacher_chat_heldout.jsonl", 4)):
        dst.write_text("".join((SMOL_DATA / src).read_text().splitlines(keepends=True)[:n]))

    def cfg(name, extra):
        return load_config(str(root / "configs" / "smollm2-135m-to-10l.yaml"), [
            f"output_dir={out / 'runs' / name}", f"max_steps={args.steps}", f"seed={args.seed}", f"student.path={student}",
            "student.init_from_teacher=null", f"teacher.path={model}", f"data.train={train}", f"data.eval={eval_}",
            "log.every=1", "log.diagnostics_every=1000000", "log.eval_every=0", "log.progress=false",
            "save.every=0", *extra])

    probe = cfg("probe", [])
    results: dict = {"settings": vars(args) | {"out": str(out), "model": str(model), "student": str(student)}}
    serve_kw = dict(max_model_len=256, max_logprobs=64, threads=1, kv_cache_gib=0.5)
    t0 = time.perf_counter()
    with _engine(model, out / "engine.log", args, serve_kw) as server:
        results["engine_start_s"] = round(time.perf_counter() - t0, 1)
        cache_dir = out / f"cache-k{K}"
        if not (cache_dir / "manifest.json").is_file():
            t = time.perf_counter()
            build_teacher_cache(str(model), [train, eval_], cache_dir, top_k=K, data=probe.data, batch_size=16, log=None,
                                servers=server.url)
            results["cache_build_s"] = time.perf_counter() - t
        methods = {
            "sft (no teacher)": ("sft", ["objective.name=sft", "teacher.path=none"]),
            "hpd, teacher in process": ("hpd-online", []),
            f"hpd, cache (K={K})": ("hpd-cache", ["teacher.path=none", f"teacher.cache={cache_dir}"]),
            f"hpd, served (K={K}, prefetch)": ("hpd-served", ["teacher.path=none", f"teacher.server={server.url}",
                                                             f"teacher.server_top_k={K}"]),
        }
        rounds: list[dict] = []
        for r in range(args.rounds):
            row = {}
            for label, (name, extra) in methods.items():
                run = out / "runs" / f"{name}-r{r}"
                g = group_cpu_seconds(server.proc.pid)
                if not (run / "final").is_dir():
                    run_training(cfg(f"{name}-r{r}", extra))
                row[label] = _step_stats(run, args.warmup) | {
                    "server_cpu_s_per_step": (group_cpu_seconds(server.proc.pid) - g) / args.steps if "served" in name else None}
                print(f"round {r} {label}: {row[label]}", flush=True)
            rounds.append(row)
        results["rounds"] = rounds

        teacher, tok = load_model(str(model), dtype="float32")
        examples = encode_file(str(train), tok, probe.data)[0][:probe.optim.batch_size]
        seqs = [e.prompt_ids + e.completion_ids for e in examples]
        b = build_batch([e.prompt_ids for e in examples], [e.completion_ids for e in examples], pad_id=tok.pad_token_id)
        results["wire"] = _wire_table(TeacherServers(server.url), server.proc.pid, seqs, _forward_s(teacher, b))

    labels = list(rounds[0])
    lines = [f"SmolLM2 shape: {model.name} (30 layers) served, a 10-layer student (every:3), batch "
             f"{probe.optim.batch_size}, data.max_length {probe.data.max_length}; {args.steps} steps a run (the steps after "
             f"the first {args.warmup}), {args.rounds} rounds of the methods in turn; trainer on CPU 0 (1 thread), "
             f"vLLM {serve_kw}{' with its worker in the engine core' if args.worker_in_engine_core else ''} on CPU 1; engine start {results['engine_start_s']} s.", "",
             "| method | round | median step s | mean step s | x sft (mean, same round) | trainer CPU s / step | "
             "server CPU s / step |", "|---|---:|---:|---:|---:|---:|---:|"]
    for label in labels:
        for r, row in enumerate(rounds):
            st, sft = row[label], row["sft (no teacher)"]["mean_step_s"]
            server_cpu = st["server_cpu_s_per_step"]
            lines.append(f"| {label} | {r} | {st['median_step_s']:.3f} | {st['mean_step_s']:.3f} | "
                         f"{st['mean_step_s'] / sft:.2f} | {st['cpu_s_per_step']:.3f} | "
                         f"{'' if server_cpu is None else f'{server_cpu:.3f}'} |")
    lines += _wire_lines(results["wire"])
    table = "\n".join(lines)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/bench-served"))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--top-k", type=int, default=8, help="top-K of the cache and the served teacher")
    ap.add_argument("--per-task", type=int, default=200, help="training problems per task")
    ap.add_argument("--cache-examples", type=int, default=0, help="sequences cached (0 = all training problems)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=2, help="times each condition runs, in turn with the others")
    ap.add_argument("--recipe", choices=["bundled", "smollm2"], default="bundled")
    ap.add_argument("--parts", default="steps,topk,cache", help="the bundled recipe's parts to run: steps (1), "
                    "topk (2 and 3), cache (4)")
    ap.add_argument("--skip-exact", action="store_true", help="leave out the exact-samples run of part 1")
    ap.add_argument("--worker-in-engine-core", action="store_true",
                    help="run the model worker inside the engine-core process (EngineServer.worker_in_engine_core)")
    ap.add_argument("--model", default=None, help="--recipe smollm2: the SmolLM2-135M-Instruct model directory")
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"
    os.sched_setaffinity(0, {0})  # the trainer on CPU 0; the engine goes on CPU 1
    import numpy as np
    import torch

    torch.set_num_threads(1)
    if args.recipe == "smollm2":
        if not args.model:
            ap.error("--recipe smollm2 needs --model DIR (SmolLM2-135M-Instruct)")
        return smollm2(args)
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
    parts = set(args.parts.split(","))
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
    with _engine(BUNDLED_TEACHER, out / "engine-a.log", args, serve_kw) as server:
        results["engine_start_s"] = round(time.perf_counter() - t0, 1)
        cache_dir = out / f"cache-k{K}"
        if not (cache_dir / "manifest.json").is_file():
            build_teacher_cache(BUNDLED_TEACHER, [train, eval_], cache_dir, top_k=K, data=probe.data, log=None)

        # 1. step times
        if "steps" in parts:
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
            # In turn, `--rounds` times (the exact-samples run, ten times the others' cost, once).
            steps: dict[str, list[dict]] = {label: [] for label in methods}
            for r in range(args.rounds):
                for label, (name, objective, extra) in methods.items():
                    if "exact" in name and (r or args.skip_exact):
                        continue
                    run = out / "runs" / f"{name}-r{r}"
                    g = group_cpu_seconds(server.proc.pid)
                    if not (run / "final").is_dir():
                        run_training(cfg(f"{name}-r{r}", objective, extra))
                    steps[label].append(_step_stats(run, args.warmup) | {
                        "server_cpu_s_per_step": (group_cpu_seconds(server.proc.pid) - g) / args.steps if "served" in name else None})
                    print(f"round {r} {label}: {steps[label][-1]}", flush=True)
            results["steps"] = steps

        # 2. one request of the recipe's batch, and the in-process forward of it
        teacher, tok = load_model(str(BUNDLED_TEACHER), dtype="float32")
        examples = encode_file(str(train), tok, probe.data)[0][:probe.optim.batch_size]
        seqs = [e.prompt_ids + e.completion_ids for e in examples]
        b = build_batch([e.prompt_ids for e in examples], [e.completion_ids for e in examples], pad_id=tok.pad_token_id)
        forward_s = _forward_s(teacher, b)
        with torch.no_grad():
            logits = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
        pool = TeacherServers(server.url)
        results["wire"] = _wire_table(pool, server.proc.pid, seqs, forward_s)

        # 3. y_hat outside the top-K: the loss and gradient of one batch against the in-process teacher
        if "topk" in parts:
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
        if "cache" in parts:
            n = args.cache_examples
            data = [train]
            if n:
                sub = out / "data" / f"cache-{n}.jsonl"
                sub.write_text("".join(train.read_text().splitlines(keepends=True)[:n]))
                data = [sub]
            # The second engine (on CPU 0) is up throughout and idle outside its builds; the conditions run
            # in turn, `--rounds` times, so that a change of load falls on each.
            builds: dict[str, list[dict]] = {"in process (1 core)": [], "1 server": [], "2 servers": []}
            second = EngineServer(BUNDLED_TEACHER, cpus="0", log=out / "engine-b.log", **serve_kw)
            if args.worker_in_engine_core:
                second.worker_in_engine_core()
            with second:
                engines = [server.proc.pid, second.proc.pid]
                for r in range(args.rounds):
                    for label, urls, cpus in (("in process (1 core)", None, {0}), ("1 server", server.url, {0}),
                                              ("2 servers", [server.url, second.url], {0, 1})):
                        os.sched_setaffinity(0, cpus)
                        g = [group_cpu_seconds(p) for p in engines]
                        c, t = time.process_time(), time.perf_counter()
                        build_teacher_cache(BUNDLED_TEACHER, data, out / f"cache-{label.split()[0]}", top_k=K, data=probe.data,
                                            batch_size=32, overwrite=True, log=None, servers=urls)
                        builds[label].append({"wall_s": time.perf_counter() - t, "client_cpu_s": time.process_time() - c,
                                              "server_cpu_s": sum(group_cpu_seconds(p) for p in engines) - sum(g)})
                        print(f"cache build round {r} {label}: {builds[label][-1]}", flush=True)
                os.sched_setaffinity(0, {0})
            c1, c2 = TeacherCache(out / "cache-1"), TeacherCache(out / "cache-2")
            wall = {k: statistics.fmean(b["wall_s"] for b in v) for k, v in builds.items()}
            results["cache"] = {"sequences": c1.manifest["examples"], "positions": c1.manifest["positions"],
                                "builds": builds, "seconds": wall, "speedup_2_servers": wall["1 server"] / wall["2 servers"],
                                "speedup_2_servers_by_round": [a["wall_s"] / b["wall_s"] for a, b in
                                                               zip(builds["1 server"], builds["2 servers"])],
                                "same_label_logp": bool(np.array_equal(
                                    np.concatenate([s[3]["label_logp"] for s in c1._shards]),
                                    np.concatenate([s[3]["label_logp"] for s in c2._shards])))}


    lines = [f"Bundled recipe: batch {probe.optim.batch_size}, data.max_length {probe.data.max_length}, {args.steps} steps "
             f"(the steps after the first {args.warmup}), {args.rounds} rounds of the methods in turn; trainer on CPU 0 "
             f"(1 thread), vLLM {serve_kw}{' with its worker in the engine core' if args.worker_in_engine_core else ''} on CPU 1; engine start {results['engine_start_s']} s."]
    if "steps" in results:
        lines += ["", "| method | round | median step s | mean step s | x sft (mean, same round) | trainer CPU s / step | "
                  "server CPU s / step | y_hat outside top-K |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, runs in results.get("steps", {}).items():
        for r, s in enumerate(runs):
            frac, server_cpu = s["frac_sample_outside_topk"], s["server_cpu_s_per_step"]
            sft = results["steps"]["sft (no teacher)"][r]["mean_step_s"]
            lines.append(f"| {label} | {r} | {s['median_step_s']:.3f} | {s['mean_step_s']:.3f} | {s['mean_step_s'] / sft:.2f} | "
                         f"{s['cpu_s_per_step']:.3f} | {'' if server_cpu is None else f'{server_cpu:.3f}'} | "
                         f"{'' if frac is None else f'{frac:.4f}'} |")
    if "topk" in parts:
        lines += _wire_lines(results["wire"])
        lines += ["", "HPD on one batch, served top-K vs the in-process teacher (same draws):", "",
                  "| K | y_hat outside top-K | loss rel. diff | grad rel. diff | grad cosine |", "|---:|---:|---:|---:|---:|"]
        for k, v in results["outside_topk"].items():
            lines.append(f"| {k} | {v['frac_sample_outside_topk']:.4f} | {v['loss_rel_diff']:.2e} | {v['grad_rel_diff']:.2e} | "
                         f"{v['grad_cosine']:.6f} |")
    c = results.get("cache")
    lines += [] if c is None else ["", f"Cache build (top-{K}, {c['sequences']} sequences, {c['positions']} positions), {args.rounds} rounds in "
                  f"turn; 2 servers / 1 server speed-up {c['speedup_2_servers']:.2f}x (by round: "
                  + ", ".join(f"{x:.2f}x" for x in c["speedup_2_servers_by_round"])
                  + f"); label log-probs identical: {c['same_label_logp']}", "",
              "| build | round | wall s | client CPU s | servers' CPU s |", "|---|---:|---:|---:|---:|"]
    for label, runs in (c or {}).get("builds", {}).items():
        for r, b in enumerate(runs):
            lines.append(f"| {label} | {r} | {b['wall_s']:.1f} | {b['client_cpu_s']:.1f} | {b['server_cpu_s']:.1f} |")
    table = "\n".join(lines)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(table)


if __name__ == "__main__":
    main()
