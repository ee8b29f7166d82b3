"""A cached teacher: run the teacher once over the training sequences, train without it.

Over 600 lines: the builder and the reader share one on-disk format (the shards, the manifest's
fields, the fingerprints, the digests) and each checks what the other writes: one module keeps the
format in one place.

`build_teacher_cache` (`hpd cache-teacher`) tokenizes the data exactly as training does
(`hpd.data.encode.encode_file`), runs the teacher over every sequence once and stores, at each response
position (where the sequence has a label):

- the teacher's log-probability of the sequence token (float32: one-hot objectives are exact),
- its top-K token ids (uint16 when the vocabulary fits, else int32) and their log-probabilities
  (float16 by default; `dtype="float32"` for exactness),
- the log of its mass outside the top-K (float32),

all at the loss temperature, in memory-mapped `.npy` shards, with a manifest holding a fingerprint
of every sequence (a hash of its token ids), of the teacher's weights and of the tokenizer, K, the
vocabulary size, the bytes per token and the sha256 of every array file. The cache is written to
a temporary directory renamed into place, one builder at a time (`.CACHE.lock`). A reader checks
the index arrays against their digests when it opens the cache and each shard when a batch first
reads it (once per process; `benchmarks/teacher_cache_verify.py` sets the cost against a training
step), so a damaged or altered shard is an error that says so, never a different teacher.
A run with `teacher.cache=CACHE` never loads the teacher: `TeacherCache` maps each
training example to its cached rows by the hash of its token ids (so a mismatch of data, tokenizer,
max_length or template is found before training, and says what differs) and hands the objective a
`hpd.objectives.TopKTeacher` per batch. Built with `student=` (`--student DIR`), the cache holds the
teacher's view over its own tokenization of each response, for a run across tokenizers
(`hpd.teachers.cross_tokenizer.CachedCrossTokenizerTeacher`), keyed by the student's sequences and the
teacher's tokenizer.

    >>> from hpd.config import DataConfig
    >>> from hpd.teachers.cache import TeacherCache, build_teacher_cache
    >>> out = build_teacher_cache("hpd/assets/teacher", ["examples/tiny.jsonl"], "/tmp/hpd-doc-cache",
    ...                           top_k=8, data=DataConfig(max_length=64), overwrite=True, log=None)
    >>> cache = TeacherCache(out)
    >>> cache.top_k, cache.manifest["bytes_per_token"]
    (8, 40)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from hpd.errors import HPDError
from hpd.files import check_output, recover_replaced_dir, replace_dir, temp_dir_for
from hpd.fingerprints import sequence_hash, tokenizer_fingerprint, weights_fingerprint

# The fingerprint a cache records of its teacher (the name it has always had here).
teacher_fingerprint = weights_fingerprint

FORMAT = "hpd-teacher-cache-1"
_DATA_KEYS = ("prompt_field", "completion_field", "messages_field", "on_bad_row", "max_length", "chat_template")
LOGP_DTYPES = {"float16": np.float16, "float32": np.float32}
ARRAYS = ("label_logp", "tail_logp", "topk_ids", "topk_logp")  # per shard
INDEX_ARRAYS = ("offsets", "hashes", "starts")  # per cache


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes (what the manifest records of each array file)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


# Files this process has checked against their manifest digest: (path, size, mtime_ns). Each shard
# is hashed once per process, however many `TeacherCache`s read it.
_VERIFIED: set[tuple[str, int, int]] = set()


# --------------------------------------------------------------------------------------------
# Fingerprints
# --------------------------------------------------------------------------------------------


def _response_span(prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> tuple[int, int]:
    """(first position, number of positions) that carry a label in `hpd.data.collate.build_batch`."""
    start = max(len(prompt_ids) - 1, 0)
    return start, max(len(prompt_ids) + len(completion_ids) - 1 - start, 0)


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------


def build_teacher_cache(teacher: str | os.PathLike, data_files: Sequence[str | os.PathLike], out: str | os.PathLike, *,
                        top_k: int = 32, data: Any = None, temperature: float = 1.0, dtype: str = "float16",
                        vocab_size: int | None = None, batch_size: int = 16, teacher_dtype: str = "float32",
                        shard_positions: int = 1 << 22, chunk_size: int = 1024, overwrite: bool = False,
                        trust_remote_code: bool = False, device: str = "auto", servers: Any = None,
                        student: Any = None, log: Callable[[str], None] | None = print) -> Path:
    """Run `teacher` once over every sequence of `data_files`; write the cache to `out`; return it.

    data:            the `data` config section (`hpd.config.DataConfig`) whose fields say how the
                     files are read and tokenized; default: `DataConfig()`. Use the run's own.
    top_k:           teacher tokens kept per position, besides the sequence token (0 = only it:
                     enough for sft/orkl). Capped at the vocabulary size.
    temperature:     the loss temperature (`objective.temperature`) of the runs that will read it.
    dtype:           storage of the top-K log-probabilities: float16 (default) or float32.
    vocab_size:      the vocabulary to normalize over (default: the teacher's LM-head rows; set it
                     to the shared size when the student's head has fewer padding rows).
    shard_positions: positions per shard file (shards hold whole examples).
    device:          where the teacher runs: "auto" (this process's GPU under `accelerate launch`,
                     else the first GPU if there is one, else the CPU), "cpu", "cuda", "cuda:1", ...
    servers:         teacher inference servers (`URL[,URL...]` or a `hpd.teachers.served.TeacherServers`)
                     that score the sequences instead of a model here (the batches spread over them;
                     `teacher` then only gives the tokenizer and the fingerprint); temperature 1 only.
    student:         a cache across tokenizers (`teacher.cross_tokenizer`): the student's tokenizer (a
                     model or tokenizer directory, "tiny" for the byte tokenizer, or a tokenizer object).
                     The data is encoded as that run encodes it (the student's tokens, the teacher's own
                     prompt), each response's text re-tokenized by the teacher (`hpd.teachers.alignment.
                     align_response`), and the teacher's view stored over its own tokens, found by the
                     student's sequence; the teacher's tokenizer is saved with it and keys it.
    """
    from hpd.config import DataConfig
    from hpd.models.hub import resolve_model_path

    data = data if data is not None else DataConfig()
    if dtype not in LOGP_DTYPES:
        raise HPDError(f"cache dtype must be one of {', '.join(LOGP_DTYPES)}, got {dtype!r}")
    if top_k < 0 or batch_size < 1 or shard_positions < 1 or not (temperature > 0 and math.isfinite(temperature)):
        raise HPDError(f"bad cache settings: top_k={top_k} (>= 0), batch_size={batch_size} (>= 1), "
                       f"shard_positions={shard_positions} (>= 1), temperature={temperature} (> 0)")
    if not data_files:
        raise HPDError("no data files to cache: pass --data FILE (the run's data.train, and data.eval if it has one)")
    teacher = resolve_model_path(str(teacher), role="teacher")  # a Hub id -> its local snapshot
    if not Path(teacher).exists():
        raise HPDError(f"teacher '{teacher}' does not exist: pass a Hugging Face model directory or a .gguf file")
    out = Path(out)
    check_output(out, {"teacher": teacher, **{f"data file {f}": f for f in data_files}}, what="the cache directory")
    procs = _Processes()
    lock = _writers_lock(out, procs, log)  # one builder per cache directory; a killed one's leftovers cleaned
    try:
        return _build(teacher, data_files, out, procs, top_k=top_k, data=data, temperature=temperature, dtype=dtype,
                      vocab_size=vocab_size, batch_size=batch_size, teacher_dtype=teacher_dtype,
                      shard_positions=shard_positions, chunk_size=chunk_size, overwrite=overwrite,
                      trust_remote_code=trust_remote_code, device=device, servers=servers, student=student, log=log)
    finally:
        if lock is not None:
            lock.release()


def _build(teacher: str, data_files: Sequence[str | os.PathLike], out: Path, procs: "_Processes", *, top_k: int,
           data: Any, temperature: float, dtype: str, vocab_size: int | None, batch_size: int, teacher_dtype: str,
           shard_positions: int, chunk_size: int, overwrite: bool, trust_remote_code: bool, device: str,
           servers: Any, student: Any, log: Callable[[str], None] | None) -> Path:
    """`build_teacher_cache`'s work, under the lock on `out`'s builders."""
    from hpd.data.collate import build_batch
    from hpd.data.encode import encode_file
    from hpd.models.head import final_hidden_states, lm_head_of
    from hpd.models.loading import load_model
    from hpd.training.progress import Progress

    if out.exists() and not overwrite:
        raise HPDError(f"'{out}' already exists: choose another --out, or pass --force to replace it")
    t0 = time.perf_counter()
    served = None
    if servers is not None:
        from hpd.models.loading import load_saved_tokenizer
        from hpd.teachers.served import TeacherServers

        if abs(temperature - 1.0) > 1e-12:
            raise HPDError(f"teacher servers return log-probabilities at temperature 1, not {temperature:g}: "
                           "build the cache from the model (--teacher DIR without --server)")
        served = servers if isinstance(servers, TeacherServers) else TeacherServers(servers, log=log)
        tokenizer = load_saved_tokenizer(teacher, trust_remote_code=trust_remote_code)
        info = served.check(tokenizer, vocab_size, top_k, student=f"the tokenizer of {teacher}")
        V, K = info["vocab_size"], info["top_k"]
        teacher_dtype = "served"
        transform = None  # the engine runs the model's own forward, its logit transform included
    else:
        dev = procs.device() if device == "auto" else _parse_device(device)
        model, tokenizer = load_model(str(teacher), dtype=teacher_dtype, trust_remote_code=trust_remote_code)
        model.to(dev).eval().requires_grad_(False)
        head = lm_head_of(model)  # weight, bias and the model's logit transform (a softcap, a scale)
        rows = head.vocab_size
        V = int(vocab_size) if vocab_size is not None else rows
        if not 0 < V <= rows:
            raise HPDError(f"vocab_size={V} must be in [1, {rows}] (the teacher's LM-head rows)")
        K = min(top_k, V)
        W = head.weight.detach()[:V].float()
        b = None if head.bias is None else head.bias.detach()[:V].float()
        transform = {"scale": head.transform.scale, "softcap": head.transform.softcap}

    s_tok = _student_tokenizer(student, trust_remote_code) if student is not None else None
    examples, files = [], []
    for f in data_files:
        enc, stats = encode_file(str(f), s_tok or tokenizer, data, teacher_tokenizer=tokenizer if s_tok else None)
        files.append({"path": str(f), "examples": len(enc), "rows": stats.rows, "skipped": stats.skipped,
                      "truncated": stats.truncated})
        examples += enc
    # The sequences the teacher scores: the examples' own, or across tokenizers the teacher's
    # prompt and its tokens of each response's text, exactly as `hpd.teachers.cross_tokenizer` builds them.
    if s_tok is not None:
        from hpd.teachers.alignment import align_response, special_markers, token_bytes

        s_bytes, t_bytes = token_bytes(s_tok), token_bytes(tokenizer)
        markers = special_markers(t_bytes)
        seqs = [(list(e.teacher_prompt_ids), align_response(e.completion_ids, s_bytes, tokenizer, t_bytes,
                                                            markers).teacher_ids) for e in examples]
    else:
        seqs = [(e.prompt_ids, e.completion_ids) for e in examples]
    spans = [_response_span(p, c) for p, c in seqs]
    counts = np.asarray([n for _, n in spans], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    hashes = np.asarray([sequence_hash(e.prompt_ids, e.completion_ids) for e in examples], dtype=np.int64)
    teacher_hashes = np.asarray([sequence_hash(p, c) for p, c in seqs], dtype=np.int64) if s_tok is not None else None
    total = int(offsets[-1])

    # Shards: consecutive examples up to shard_positions positions each (at least one example).
    shard_starts = [0]
    for i in range(1, len(examples)):
        if offsets[i] - offsets[shard_starts[-1]] + counts[i] > shard_positions:
            shard_starts.append(i)
    shard_bounds = [(s, e) for s, e in zip(shard_starts, shard_starts[1:] + [len(examples)])]

    # Under `accelerate launch` process r builds shards r, r + world, ...; the main process writes
    # the rest once all are done. The teacher's batches never cross a shard, so a shard's bytes do
    # not depend on how many processes built the cache.
    token = procs.same(uuid.uuid4().hex[:8])
    tmp = temp_dir_for(out, token)
    out.parent.mkdir(parents=True, exist_ok=True)
    id_dtype = np.uint16 if V <= 1 << 16 else np.int32
    try:
        if procs.is_main:
            tmp.mkdir()
        procs.barrier()
        shards = []
        for j, (s, e) in enumerate(shard_bounds):
            d = tmp / f"shard-{j:05d}"
            P = int(offsets[e] - offsets[s])
            arrays = None
            if j % procs.world == procs.rank:
                d.mkdir()
                arrays = {
                    "label_logp": np.lib.format.open_memmap(d / "label_logp.npy", "w+", np.float32, (P,)),
                    "tail_logp": np.lib.format.open_memmap(d / "tail_logp.npy", "w+", np.float32, (P,)),
                    "topk_ids": np.lib.format.open_memmap(d / "topk_ids.npy", "w+", id_dtype, (P, K)),
                    "topk_logp": np.lib.format.open_memmap(d / "topk_logp.npy", "w+", LOGP_DTYPES[dtype], (P, K)),
                }
            shards.append({"dir": d.name, "first_example": s, "end_example": e, "first_position": int(offsets[s]),
                           "positions": P, "arrays": arrays})
        shard_of = np.zeros(len(examples), dtype=np.int64)
        for j, (s, e) in enumerate(shard_bounds):
            shard_of[s:e] = j

        # This process's shards, each longest first (so batches pad little); every example's rows go
        # where its offsets say.
        def length(i: int) -> int:
            return -(len(seqs[i][0]) + len(seqs[i][1]))

        batches = [order[k:k + batch_size] for j, (s, e) in enumerate(shard_bounds) if j % procs.world == procs.rank
                   for order in [sorted(range(s, e), key=length)] for k in range(0, len(order), batch_size)]
        mine = sum(e - s for j, (s, e) in enumerate(shard_bounds) if j % procs.world == procs.rank)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        # On stderr, with an ETA (hpd.training.progress), on the main process (its share of the shards); quiet
        # when log is None.
        progress = Progress(mine, "cache-teacher" + (f" (process 0 of {procs.world})" if procs.world > 1 else ""),
                            unit="sequence", enabled=log is not None and procs.is_main)
        def score_model(idx: list[int]):
            """(label log-probs (N,), tail (N,), top-K ids (N, K), log-probs (N, K)) of the response
            positions of examples `idx`, in order, from the teacher model here."""
            with torch.inference_mode():
                batch = build_batch([seqs[i][0] for i in idx], [seqs[i][1] for i in idx],
                                    pad_id=pad_id)
                batch = {k: v.to(dev) for k, v in batch.items()}
                hidden = final_hidden_states(model, batch["input_ids"], batch["attention_mask"])  # (B, T, H)
                sel = torch.cat([torch.arange(spans[i][0], spans[i][0] + spans[i][1]) + r * hidden.shape[1]
                                 for r, i in enumerate(idx)]).to(dev)
                h = hidden.reshape(-1, hidden.shape[-1])[sel]  # (N, H): the response positions, in order
                labels = batch["input_ids"].reshape(-1)[sel + 1]  # (N,) the sequence tokens they predict
                label_lp, tail_lp, ids, lp = [], [], [], []
                for c in range(0, h.shape[0], chunk_size):
                    z = h[c:c + chunk_size].float() @ W.T
                    if b is not None:
                        z += b
                    head.transform.apply_(z)
                    logp = torch.log_softmax(z / temperature, -1)  # (C, V)
                    y = labels[c:c + chunk_size]
                    inside = y < V
                    label_lp.append(torch.where(inside, logp.gather(1, y.clamp(max=V - 1)[:, None]).squeeze(1), 0.0))
                    vals, top = logp.topk(K, -1)
                    tail_lp.append(logp.scatter(1, top, float("-inf")).logsumexp(-1))
                    ids.append(top)
                    lp.append(vals)
                return (torch.cat(label_lp).cpu().numpy(), torch.cat(tail_lp).cpu().numpy(), torch.cat(ids).cpu().numpy(),
                        torch.cat(lp).cpu().numpy())

        def score_served(idx: list[int]):
            """`score_model`'s result from the servers (one request per batch)."""
            got = served.score([list(seqs[i][0]) + list(seqs[i][1]) for i in idx], K,
                               first=[spans[i][0] for i in idx])  # the response's positions only are read
            parts = [(g.label_logp[s:s + n], g.tail[s:s + n], g.topk_ids[s:s + n], g.topk_logp[s:s + n])
                     for i, g in zip(idx, got) for s, n in [spans[i]]]
            return tuple(np.concatenate([p[k] for p in parts]) for k in range(4))

        todo = [[i for i in batch_ids if counts[i] > 0] for batch_ids in batches]
        if served is None:
            results = (score_model(idx) if idx else None for idx in todo)
        else:  # requests in flight on every server at once, their answers taken in order
            results = _in_order(lambda idx: served.submit(score_served, idx) if idx else None, todo,
                                window=2 * len(served.urls))
        with progress:
            for batch_ids, idx, result in zip(batches, todo, results):
                if not idx:
                    progress.update(len(batch_ids))
                    continue
                label_lp, tail_lp, ids, lp = result
                at = 0
                for i in idx:
                    sh = shards[shard_of[i]]
                    lo = int(offsets[i]) - sh["first_position"]
                    n = int(counts[i])
                    a = sh["arrays"]
                    a["label_logp"][lo:lo + n] = label_lp[at:at + n]
                    a["tail_logp"][lo:lo + n] = tail_lp[at:at + n]
                    a["topk_ids"][lo:lo + n] = ids[at:at + n].astype(id_dtype)
                    a["topk_logp"][lo:lo + n] = lp[at:at + n].astype(LOGP_DTYPES[dtype])
                    at += n
                progress.update(len(batch_ids))
        for sh in shards:
            arrays = sh.pop("arrays")
            for arr in (arrays or {}).values():
                arr.flush()
        procs.barrier()
        if not procs.is_main:
            return out
        np.save(tmp / "offsets.npy", offsets)
        np.save(tmp / "hashes.npy", hashes)
        np.save(tmp / "starts.npy", np.asarray([s for s, _ in spans], dtype=np.int64))
        index_names = INDEX_ARRAYS
        if teacher_hashes is not None:  # across tokenizers: the teacher sequence of each row, checked at training
            np.save(tmp / "teacher_hashes.npy", teacher_hashes)
            index_names = (*INDEX_ARRAYS, "teacher_hashes")
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        data_bytes = sum(f.stat().st_size for f in tmp.glob("shard-*/*.npy"))
        # What a reader checks each file against (`TeacherCache`): a damaged shard is an error, never a
        # different teacher.
        for sh in shards:
            sh["sha256"] = {name: file_sha256(tmp / sh["dir"] / f"{name}.npy") for name in ARRAYS}
        index_sha256 = {name: file_sha256(tmp / f"{name}.npy") for name in index_names}
        manifest = {
            "format": FORMAT,
            "top_k": K,
            "vocab_size": V,
            "temperature": float(temperature),
            # what the teacher applies to h @ W.T + b (a softcap, a scale), applied to these log-probabilities
            # (a served cache: {"applied_by": "server"}, the engine ran the model's own forward)
            "logit_transform": transform if transform is not None else {"applied_by": "server"},
            "logp_dtype": dtype,
            "id_dtype": np.dtype(id_dtype).name,
            "teacher": {"path": str(Path(teacher).resolve()), "fingerprint": _fingerprint_or_none(teacher),
                        "dtype": teacher_dtype,
                        **({"servers": served.urls, "models": [served.models[u] for u in served.urls]} if served else {})},
            # the tokenizer of the sequences the cache is found by (the student's, across tokenizers)
            "tokenizer": tokenizer_fingerprint(s_tok or tokenizer),
            **({"cross_tokenizer": {"teacher_tokenizer": tokenizer_fingerprint(tokenizer)}} if s_tok is not None else {}),
            "data": {"files": files, "settings": {k: getattr(data, k) for k in _DATA_KEYS}},
            "examples": len(examples),
            "positions": total,
            "sequences": hashlib.sha256(hashes.tobytes()).hexdigest()[:24],
            "index_sha256": index_sha256,
            "shards": shards,
            "bytes": data_bytes,
            # Per cached position: label and tail log-probs (float32) plus K ids and K log-probs.
            "bytes_per_token": 8 + K * (np.dtype(id_dtype).itemsize + np.dtype(LOGP_DTYPES[dtype]).itemsize),
            "build_seconds": round(time.perf_counter() - t0, 3),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        replace_dir(tmp, out)
    except BaseException:
        if procs.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        procs.barrier()  # the others return once the cache is in place
    if log is not None:
        log(f"teacher cache: {len(examples)} sequences, {total} positions, top-{K}, "
            f"{manifest['bytes_per_token']} bytes per token ({data_bytes / 2**20:.1f} MiB) in "
            f"{manifest['build_seconds']:.1f} s -> {out}")
    return out


def _student_tokenizer(student: Any, trust_remote_code: bool):
    """The student's tokenizer of a cache across tokenizers: an object, "tiny" (the byte tokenizer),
    or a model or tokenizer directory (a Hub id resolved to its local snapshot)."""
    if not isinstance(student, (str, os.PathLike)):
        return student
    if str(student) == "tiny":
        from hpd.models.tokenizer import byte_tokenizer

        return byte_tokenizer()
    from hpd.models.hub import resolve_model_path
    from hpd.models.loading import load_saved_tokenizer

    path = resolve_model_path(str(student), role="student")
    if not Path(path).is_dir():
        raise HPDError(f"--student '{student}' is not a directory: pass the student model (or its tokenizer) directory")
    return load_saved_tokenizer(path, trust_remote_code=trust_remote_code)


def _fingerprint_or_none(teacher) -> str | None:
    """The teacher's weights fingerprint; None for a directory without weights (a served teacher's
    tokenizer alone)."""
    try:
        return teacher_fingerprint(teacher)
    except HPDError:
        return None


def _in_order(submit: Callable[[Any], Any], items: Sequence[Any], window: int):
    """`submit(item).result()` of every item in order, with up to `window` submitted ahead."""
    pending: list[Any] = []
    it = iter(items)
    for item in it:
        pending.append(submit(item))
        if len(pending) >= window:
            break
    for item in it:
        head = pending.pop(0)
        yield head.result() if head is not None else None
        pending.append(submit(item))
    for head in pending:
        yield head.result() if head is not None else None


def _writers_lock(out: Path, procs: "_Processes", log: Callable[[str], None] | None):
    """The main process's lock on `out`'s builders (`.OUT.lock` beside it; the `filelock` library, as
    for run directories), or HPDError on every process when another build holds it. Under it, what a
    killed build left goes: half-built `.OUT.tmp-*` directories, and an old cache set aside by an
    interrupted `--force` is put back (the old cache stays until a new one is complete)."""
    from filelock import FileLock, Timeout

    lock = None
    if procs.is_main:
        out.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(out.parent / f".{out.name}.lock"), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            lock = None
    if not procs.same(lock is not None):
        raise HPDError(f"another hpd cache-teacher is writing '{out}': wait for it to end, or pick another --out")
    if procs.is_main:
        for line in recover_replaced_dir(out):
            if log is not None:
                log(f"teacher cache: {line}")
    return lock


def _parse_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise HPDError(f"--device {device!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise HPDError(f"--device {device!r} asks for a GPU but torch sees none: use --device cpu (or auto)")
    return dev


class _Processes:
    """This process among those `accelerate launch` / torchrun started (one alone otherwise)."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank, self.state = 0, None
        if self.world > 1:
            from accelerate import PartialState

            self.state = PartialState(cpu=not torch.cuda.is_available())
            self.rank, self.world = self.state.process_index, self.state.num_processes
        self.is_main = self.rank == 0

    def device(self) -> torch.device:
        """This process's accelerator under a launcher, else the first GPU, else the CPU."""
        if self.state is not None:
            return self.state.device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def same(self, value: Any) -> Any:
        """The main process's `value`, on every process."""
        if self.state is None:
            return value
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value])[0]


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


class TeacherCache:
    """A built cache, memory-mapped: maps examples to their rows and batches to `TopKTeacher`s."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        mf = self.path / "manifest.json"
        if not mf.is_file():
            raise HPDError(f"teacher.cache '{self.path}' is not a teacher cache (no manifest.json): build one with "
                           "`hpd cache-teacher --teacher DIR --data FILE --out CACHE`")
        try:
            self.manifest = json.loads(mf.read_text())
        except (OSError, ValueError) as e:
            raise self._damaged(f"manifest.json cannot be read ({e})") from None
        if not isinstance(self.manifest, dict) or self.manifest.get("format") != FORMAT:
            found = self.manifest.get("format") if isinstance(self.manifest, dict) else None
            raise HPDError(f"teacher cache '{self.path}' has format {found!r}, this hpd reads "
                           f"{FORMAT!r}: rebuild it with `hpd cache-teacher`")
        try:
            self._open()
        except HPDError:
            raise
        except (KeyError, TypeError, ValueError, OSError) as e:  # a manifest or array file not as built
            raise self._damaged(f"{type(e).__name__}: {e}") from None

    def _damaged(self, what: str) -> HPDError:
        return HPDError(f"teacher cache '{self.path}' is damaged: {what}; rebuild it with `hpd cache-teacher ... "
                        "--force`")

    def _verified(self, rel: str, digest: str | None) -> Path:
        """`self.path / rel`, its bytes checked once per process against the manifest's sha256."""
        p = self.path / rel
        try:
            st = p.stat()
        except OSError:
            raise self._damaged(f"{rel} is missing") from None
        ident = (str(p.resolve()), st.st_size, st.st_mtime_ns)
        if digest is not None and ident not in _VERIFIED:
            if file_sha256(p) != digest:
                raise self._damaged(f"{rel} does not match the manifest's sha256 (its bytes changed since the build)")
            _VERIFIED.add(ident)
        return p

    def _open(self) -> None:
        m = self.manifest
        self.top_k = int(m["top_k"])
        self.vocab_size = int(m["vocab_size"])
        self.temperature = float(m["temperature"])
        digests = m.get("index_sha256")
        if digests is None:  # built before shards had digests
            import warnings

            warnings.warn(f"teacher cache '{self.path}' has no file digests (built by an older hpd): its shards cannot "
                          "be checked for damage; rebuild it with `hpd cache-teacher ... --force`", stacklevel=3)
            digests = {}
        self.cross_tokenizer = m.get("cross_tokenizer")  # built across tokenizers: the teacher's tokenizer keys it
        names = (*INDEX_ARRAYS, "teacher_hashes") if self.cross_tokenizer else INDEX_ARRAYS
        index = {name: np.load(self._verified(f"{name}.npy", digests.get(name)), allow_pickle=False)
                 for name in names}
        self.teacher_hashes = index.get("teacher_hashes")
        self.offsets, self.starts, self.hashes = index["offsets"], index["starts"], index["hashes"]
        n, total = int(m["examples"]), int(m["positions"])
        counts = np.diff(self.offsets) if len(self.offsets) else self.offsets
        if (self.offsets.shape != (n + 1,) or self.starts.shape != (n,) or self.hashes.shape != (n,)
                or self.offsets[0] != 0 or self.offsets[-1] != total or (counts < 0).any() or (self.starts < 0).any()
                or (self.teacher_hashes is not None and self.teacher_hashes.shape != (n,))):
            raise self._damaged(f"offsets.npy, starts.npy and hashes.npy do not describe its {n} sequences and "
                                f"{total} positions")
        self._order = np.argsort(self.hashes, kind="stable")  # lookups by binary search, first copy wins
        self._sorted = self.hashes[self._order]
        id_dtype = np.dtype(m["id_dtype"])
        shapes = {"label_logp": ((), np.float32), "tail_logp": ((), np.float32), "topk_ids": ((self.top_k,), id_dtype),
                  "topk_logp": ((self.top_k,), np.dtype(LOGP_DTYPES[m["logp_dtype"]]))}
        self._shards, self._shard_digests, self._checked = [], [], set()
        expected_first = 0
        for sh in m["shards"]:
            d, (s, e, first, P) = sh["dir"], (int(sh[k]) for k in ("first_example", "end_example", "first_position", "positions"))
            if first != expected_first or first != self.offsets[s] or first + P != self.offsets[e]:
                raise self._damaged(f"{d}'s positions do not follow the offsets")
            expected_first = first + P
            arrays = {}
            for name in ARRAYS:
                try:
                    arr = np.load(self.path / d / f"{name}.npy", mmap_mode="r", allow_pickle=False)
                except (OSError, ValueError) as err:  # a cut file cannot be mapped
                    raise self._damaged(f"{d}/{name}.npy cannot be read ({err})") from None
                tail, dtype = shapes[name]
                if arr.shape != (P, *tail) or arr.dtype != dtype:
                    raise self._damaged(f"{d}/{name}.npy holds {arr.dtype}{list(arr.shape)}, the manifest says "
                                        f"{np.dtype(dtype)}{[P, *tail]}")
                arrays[name] = arr
            self._shards.append((s, e, first, arrays))
            self._shard_digests.append(sh.get("sha256") or {})
        if expected_first != total:
            raise self._damaged(f"its shards hold {expected_first} positions, the manifest {total}")
        self._shard_ends = np.asarray([e for _, e, _, _ in self._shards], dtype=np.int64)

    def _check_shard(self, j: int) -> None:
        """Shard `j`'s files against their digests: once per process, when a batch first reads it."""
        if j in self._checked:
            return
        d = self.manifest["shards"][j]["dir"]
        for name in ARRAYS:
            self._verified(f"{d}/{name}.npy", self._shard_digests[j].get(name))
        self._checked.add(j)

    def tokenizer(self):
        """The teacher's tokenizer, saved with the cache (for students that have none of their own)."""
        from hpd.models.loading import load_saved_tokenizer

        tok = load_saved_tokenizer(self.path / "tokenizer")
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return tok

    def describe(self) -> str:
        m = self.manifest
        files = ", ".join(f["path"] for f in m["data"]["files"])
        settings = ", ".join(f"{k}={v}" for k, v in m["data"]["settings"].items())
        return f"built from {files} with {settings}, teacher {m['teacher']['path']}"

    def rows_of(self, examples: Sequence[Any], what: str, data: Any = None) -> list[int]:
        """The cache row of every encoded example; HPDError saying what differs when some are missing.

        data: the run's `data` config section, compared with the cache's to name the difference.
        """
        wanted = np.asarray([sequence_hash(e.prompt_ids, e.completion_ids) for e in examples], dtype=np.int64)
        at = np.searchsorted(self._sorted, wanted).clip(max=max(len(self._sorted) - 1, 0))
        found = (self._sorted[at] == wanted) if len(self._sorted) else np.zeros(len(wanted), dtype=bool)
        if found.all():
            return self._order[at].tolist()
        missing = np.flatnonzero(~found).tolist()
        diffs = []
        if data is not None:
            cached = self.manifest["data"]["settings"]
            diffs = [f"{k}: cache {cached[k]!r}, run {getattr(data, k)!r}" for k in _DATA_KEYS
                     if k in cached and cached[k] != getattr(data, k)]
        example = examples[missing[0]]
        raise HPDError(
            f"teacher cache '{self.path}' does not hold {len(missing)} of the {len(examples)} {what} sequences "
            f"(first: {example.source}); the cache was {self.describe()}"
            + (f"; settings that differ: {'; '.join(diffs)}" if diffs else "; the data or the tokenizer differ")
            + ". Rebuild it for this run: hpd cache-teacher --teacher DIR --data FILE [--data EVAL] --out CACHE "
              "with the run's data settings (--config RUN.yaml takes them from the run config)"
        )

    def check_run(self, *, tokenizer=None, teacher_path: str | None = None, temperature: float | None = None,
                  support: str | None = None, objective: str = "", cross_tokenizer: bool | None = None,
                  teacher_tokenizer=None) -> None:
        """Errors for a run the cache cannot serve: another teacher, tokenizer, temperature, or K = 0.

        cross_tokenizer: whether the run distills across tokenizers (a cache built with or without
        `--student` serves only such runs); teacher_tokenizer: the run's teacher tokenizer, compared
        with the one a cache across tokenizers was built with."""
        m = self.manifest
        if cross_tokenizer is not None and cross_tokenizer != bool(self.cross_tokenizer):
            raise HPDError(
                f"the teacher cache '{self.path}' was built across tokenizers (hpd cache-teacher --student), this run has "
                "teacher.cross_tokenizer=false: set teacher.cross_tokenizer=true, or rebuild the cache without --student"
                if self.cross_tokenizer else
                f"teacher.cross_tokenizer=true needs a cache built across tokenizers, but '{self.path}' was built over "
                "the student's own tokens: rebuild it with `hpd cache-teacher --config RUN.yaml` (the run's "
                "student.path gives the student's tokenizer) or `--student DIR`")
        if tokenizer is not None and tokenizer_fingerprint(tokenizer) != m["tokenizer"]:
            raise HPDError(f"the student's tokenizer differs from the one the teacher cache '{self.path}' was built "
                           f"with ({m['teacher']['path']}): "
                           + ("a cache across tokenizers is found by the student's sequences; rebuild it with this "
                              "student (--student DIR)" if self.cross_tokenizer else "logit distillation needs one tokenizer"))
        if (teacher_tokenizer is not None and self.cross_tokenizer
                and tokenizer_fingerprint(teacher_tokenizer) != self.cross_tokenizer["teacher_tokenizer"]):
            raise HPDError(f"the teacher's tokenizer differs from the one the teacher cache '{self.path}' was built with "
                           f"({m['teacher']['path']}): the cache holds another teacher's tokens; rebuild it with "
                           "`hpd cache-teacher --teacher DIR --student DIR ...`")
        if teacher_path is not None and Path(teacher_path).exists() and m["teacher"].get("fingerprint"):
            if teacher_fingerprint(teacher_path) != m["teacher"]["fingerprint"]:
                raise HPDError(f"teacher.path '{teacher_path}' is not the teacher the cache '{self.path}' was built from "
                               f"({m['teacher']['path']}, weights changed or another model): rebuild the cache with "
                               "`hpd cache-teacher --teacher DIR ...`, or point teacher.path at that teacher")
        if "logit_transform" not in m:  # built before hpd applied the teacher's logit transform
            from hpd.models.head import logit_transform_field

            config = Path(m["teacher"]["path"]) / "config.json"
            try:
                field = logit_transform_field(json.loads(config.read_text())) if config.is_file() else None
            except (OSError, ValueError):
                field = None
            if field is not None:
                raise HPDError(f"the teacher cache '{self.path}' was built by an hpd that skipped its teacher's {field}: "
                               "its log-probabilities are another model's; rebuild it with `hpd cache-teacher`")
        if temperature is not None and abs(temperature - self.temperature) > 1e-12:
            raise HPDError(f"the teacher cache '{self.path}' was built at temperature {self.temperature:g}, "
                           f"objective.temperature is {temperature:g}: rebuild it with --temperature {temperature:g}")
        if support in ("pair", "vocab") and self.top_k == 0:
            raise HPDError(f"objective '{objective}' reads the teacher beyond the sequence token, but the teacher cache "
                           f"'{self.path}' holds no top-K tokens: rebuild it with --top-k K (e.g. 32)")

    def teacher(self, rows: Sequence[int], labels: torch.Tensor):
        """The cached teacher of a batch: `rows` (B,) cache rows of its sequences, `labels (B, T)`.

        Returns a `TopKTeacher` of `(B, T)` / `(B, T, K)` tensors on the CPU.
        """
        from hpd.objectives import IGNORE_INDEX, TopKTeacher

        B, T = labels.shape
        K = self.top_k
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self.hashes)):
            raise HPDError(f"cache rows {rows.tolist()} are not rows of the teacher cache '{self.path}' "
                           f"({len(self.hashes)} sequences)")
        first, counts, starts = self.offsets[rows], self.offsets[rows + 1] - self.offsets[rows], self.starts[rows]
        # Every cached position of the batch at once: its batch row, its column, its cache position.
        row_of = np.repeat(np.arange(B), counts)
        within = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
        col, src = starts[row_of] + within, first[row_of] + within
        t = np.arange(T)
        span = (t >= starts[:, None]) & (t < (starts + counts)[:, None])
        bad = np.flatnonzero((starts + counts > T) | ((labels.cpu().numpy() != IGNORE_INDEX) & ~span).any(1))
        if len(bad):
            raise HPDError(f"batch row {bad[0]} does not have the response positions of cache row {rows[bad[0]]}: the "
                           "batch was not built from the cached sequences")
        label_lp, tail = torch.zeros(B, T), torch.zeros(B, T)
        ids, lp = torch.zeros(B, T, K, dtype=torch.long), torch.zeros(B, T, K)
        # Filled through numpy views: one copy from the memory map, with the dtype cast on the way.
        out = {"label_logp": label_lp.numpy(), "tail_logp": tail.numpy(), "topk_ids": ids.numpy(), "topk_logp": lp.numpy()}
        shard = np.searchsorted(self._shard_ends, rows, side="right")[row_of]
        for j in np.unique(shard):
            self._check_shard(int(j))
            _, _, first_pos, a = self._shards[j]
            at = shard == j
            r, c, local = row_of[at], col[at], src[at] - first_pos
            for name, dest in out.items():
                dest[r, c] = a[name][local]
        if K and int(ids.max()) >= self.vocab_size:  # ids past the vocabulary would index out of the student's logits
            raise self._damaged(f"it holds token id {int(ids.max())} for a vocabulary of {self.vocab_size}")
        return TopKTeacher(label_lp, ids, lp, tail, self.vocab_size, self.temperature)


__all__ = ["FORMAT", "TeacherCache", "build_teacher_cache", "teacher_fingerprint", "tokenizer_fingerprint"]
