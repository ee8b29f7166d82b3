"""A teacher behind an inference engine: log-probabilities asked of OpenAI-compatible servers.

`TeacherServers` is a pool of servers (vLLM's `/v1/completions`; SGLang and others that return
prompt log-probabilities answer the same way). For token-id sequences it asks for the prompt
log-probabilities (`prompt_logprobs=K`, one generated token) and turns each answer into the
teacher cache's semantics (`hpd.objectives.TopKTeacher`): at every position the exact
log-probability of the sequence token, the top-K tokens with theirs, and the log of the mass
outside the top-K (the tail). So every objective that trains from a cache trains from a server;
with K = the vocabulary every objective is exact.

What it guards against:

- another model served than the student's: `check(...)` compares the served vocabulary (the
  engine's own bound on token ids) and the token ids of a probe text (the engine's `/tokenize`)
  with the student's, and the servers of a pool with each other; a mismatch names both sides;
- a server down, slow or answering garbage: a timeout per request, retries with exponential
  backoff on the next server of the pool, every answer checked (a sequence token's
  log-probability at every position read, K tokens ranked 1..K, finite log-probabilities <= 0) before
  anything is built from it; a server that stays down is an `HPDError` naming it.

`ServedTeacher` (`teacher.server=URL[,URL...]`) is the trainer's `TeacherSource`: `prepare` sends
a micro-batch's request on a thread (so it runs while the student computes on earlier batches),
`view` waits for it.

    >>> from hpd.teachers.served import parse_urls
    >>> parse_urls("http://b:8000, http://c:8000/")
    ['http://b:8000', 'http://c:8000']
"""

from __future__ import annotations

import itertools
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import orjson
import torch

from hpd.errors import HPDError

PROBE_TEXT = "The teacher and the student must read text as the same token ids: 3 + 4 = 7, café, naïve."
SERVE_HINT = "start one with `hpd serve-teacher MODEL_DIR --port PORT`"


def parse_urls(spec: str | Sequence[str]) -> list[str]:
    """`URL[,URL...]` (or a list) as a list of base URLs without a trailing slash."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    urls = [u.strip().rstrip("/") for u in items if u.strip()]
    for u in urls:
        if not u.startswith(("http://", "https://")):
            raise HPDError(f"teacher server '{u}' is not a URL: write it as http://HOST:PORT")
    if not urls:
        raise HPDError("no teacher server given: teacher.server=http://HOST:PORT[,http://HOST2:PORT]")
    return urls


class ServerError(Exception):
    """One failed request (retried; the pool raises `HPDError` when all tries failed)."""

    def __init__(self, msg: str, retry: bool = True):
        super().__init__(msg)
        self.retry = retry


@dataclass
class Scored:
    """One sequence as the teacher sees it, at positions 0..L-2 (position p predicts token p+1).

    label_logp `(L-1,)` float64, topk_ids `(L-1, K)` int64, topk_logp `(L-1, K)` float64 (rank
    order), tail `(L-1,)` float64: log of the mass outside the top-K.
    """

    label_logp: np.ndarray
    topk_ids: np.ndarray
    topk_logp: np.ndarray
    tail: np.ndarray


def parse_prompt_logprobs(entries: Any, seq: Sequence[int], top_k: int, first: int = 0) -> Scored:
    """A server's `prompt_logprobs` for token sequence `seq` as a `Scored`; `ServerError` when it
    is not exactly what was asked (truncated, another sequence, missing tokens, bad numbers).

    first: the first position read (and checked); the positions before it are left zero, as
    padding is in `topk_teacher` (the cache and the trainer read only the response's positions,
    and reading a sequence's prompt cost as much as its response).
    """
    L = len(seq)
    if not isinstance(entries, list) or len(entries) != L:
        got = len(entries) if isinstance(entries, list) else type(entries).__name__
        raise ServerError(f"prompt_logprobs for a {L}-token sequence has {got} entries")
    n = max(L - 1, 0)
    first = min(max(int(first), 0), n)
    m = n - first
    # One pass in Python collects the numbers in the answer's order; numpy then puts each
    # position's top-K in rank order and checks the ranks (the answer's encoding, not the model,
    # is the client's cost: issue 36).
    label, ids, lps, ranks = [], [], [], []
    for p in range(first + 1, L):
        e, tok = entries[p], str(seq[p])
        if not isinstance(e, dict) or tok not in e:
            raise ServerError(f"position {p} lacks the sequence token {seq[p]}'s log-probability")
        c = len(e)
        if c != top_k and c != top_k + 1:  # top_k + 1: the sequence token was outside the top-K
            raise ServerError(f"position {p} has {c} log-probabilities, expected {top_k} or {top_k + 1}")
        try:
            label.append(float(e[tok]["logprob"]))
            for k, v in e.items():
                if c == top_k or k != tok:
                    ids.append(int(k))
                    lps.append(float(v["logprob"]))
                    ranks.append(int(v["rank"]))
        except (TypeError, KeyError, ValueError, AttributeError):
            raise ServerError(f"position {p} holds an entry without a numeric logprob and rank") from None
    out_label, out_ids, out_lp = np.zeros(n), np.zeros((n, top_k), dtype=np.int64), np.zeros((n, top_k))
    out_label[first:] = label
    if top_k and m:
        rank = np.asarray(ranks, dtype=np.int64).reshape(m, top_k)
        order = np.argsort(rank, axis=1, kind="stable")
        rank = np.take_along_axis(rank, order, 1)
        bad = np.flatnonzero((rank != np.arange(1, top_k + 1)).any(1))
        if bad.size:
            r = rank[bad[0]]
            raise ServerError(f"position {first + 1 + int(bad[0])}: ranks {r.tolist()} are not a top-{top_k}")
        out_ids[first:] = np.take_along_axis(np.asarray(ids, dtype=np.int64).reshape(m, top_k), order, 1)
        out_lp[first:] = np.take_along_axis(np.asarray(lps).reshape(m, top_k), order, 1)
    if not (np.isfinite(out_label).all() and np.isfinite(out_lp).all()) or out_label.max(initial=-1) > 1e-4 \
            or out_lp.max(initial=-1) > 1e-4:
        raise ServerError("log-probabilities that are not finite numbers <= 0")
    # The mass outside the top-K, from its complement (float64); clamped at the smallest float32
    # so that a top-K holding (numerically) all the mass leaves a finite, negligible tail.
    tail = np.zeros(n)
    rest = 1.0 - np.exp(out_lp[first:]).sum(-1) if top_k else np.ones(m)
    tail[first:] = np.log(np.maximum(rest, np.finfo(np.float32).tiny))
    return Scored(out_label, out_ids, out_lp, tail)


class TeacherServers:
    """A pool of teacher servers, each request sent to the least busy (see the module docstring).

    timeout: seconds a request may take; retries: further tries (each on the next server, after
    `backoff * 2**i` seconds) before the pool gives up.
    """

    def __init__(self, urls: str | Sequence[str], *, timeout: float = 120.0, retries: int = 3, backoff: float = 1.0,
                 workers_per_server: int = 2, log: Callable[[str], None] | None = None):
        self.urls = parse_urls(urls)
        self.timeout, self.retries, self.backoff = float(timeout), int(retries), float(backoff)
        self.models: dict[str, str] = {}
        self.vocab_size: int | None = None
        self.log = log or (lambda _m: None)
        self._next = itertools.count()
        self._in_flight = [0] * len(self.urls)  # requests on each server now (`_with_retries` picks the least busy)
        self._local = threading.local()
        self._lock = threading.Lock()
        self.bytes_received = 0
        self.requests = 0
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers_per_server * len(self.urls)),
                                       thread_name_prefix="hpd-teacher")

    # ---- one request ----

    def _session(self):
        import requests

        s = getattr(self._local, "session", None)
        if s is None:
            s = self._local.session = requests.Session()
        return s

    def _call(self, url: str, method: str, path: str, payload: dict | None = None, timeout: float | None = None):
        """(status, parsed JSON or None, bytes) of one request; `ServerError` for a network failure."""
        import requests

        try:
            r = self._session().request(method, url + path, json=payload, timeout=(10.0, timeout or self.timeout))
        except requests.Timeout:
            raise ServerError(f"no answer within {timeout or self.timeout:g} s (teacher.server_timeout)") from None
        except requests.RequestException as e:
            raise ServerError(f"cannot reach it ({type(e).__name__}: {str(e)[:160]})") from None
        with self._lock:
            self.bytes_received += len(r.content)
            self.requests += 1
        try:
            body = orjson.loads(r.content)  # 2x the standard library's speed on these answers (issue 36)
        except orjson.JSONDecodeError:
            body = None
        return r.status_code, body, len(r.content)

    def _model(self, url: str) -> str:
        if url not in self.models:
            status, body, _ = self._call(url, "GET", "/v1/models", timeout=30)
            try:
                self.models[url] = body["data"][0]["id"]
            except (TypeError, KeyError, IndexError):
                raise ServerError(f"/v1/models answered {status} without a model id") from None
        return self.models[url]

    def _score_on(self, url: str, sequences: Sequence[Sequence[int]], top_k: int,
                  first: Sequence[int] | None = None) -> list[Scored]:
        payload = {"model": self._model(url), "prompt": [list(map(int, s)) for s in sequences], "max_tokens": 1,
                   "temperature": 0.0, "prompt_logprobs": int(top_k)}
        status, body, _ = self._call(url, "POST", "/v1/completions", payload)
        if status == 400:
            msg = (body or {}).get("error", {}).get("message", "") if isinstance(body, dict) else ""
            hint = f" (restart the server with --max-logprobs {top_k} or more)" if "logprob" in msg.lower() else ""
            raise ServerError(f"refused the request: {msg[:300]}{hint}", retry=False)
        if status != 200:
            raise ServerError(f"answered HTTP {status}")
        try:
            choices = sorted(body["choices"], key=lambda c: c["index"])
        except (TypeError, KeyError):
            raise ServerError("answered without a list of choices (malformed or truncated response)") from None
        if len(choices) != len(sequences):
            raise ServerError(f"answered {len(choices)} choices for {len(sequences)} sequences")
        out = []
        for i, (c, seq) in enumerate(zip(choices, sequences)):
            try:
                out.append(parse_prompt_logprobs(c.get("prompt_logprobs"), seq, top_k, first[i] if first else 0))
            except ServerError as e:
                raise ServerError(f"sequence {i}: {e} (malformed or truncated response)") from None
        return out

    def _with_retries(self, what: str, fn: Callable[[str], Any]) -> Any:
        """`fn(url)` on the pool's servers, the least busy first and then the next in turn, until one
        succeeds; `HPDError` naming them if none does."""
        n = len(self.urls)
        with self._lock:
            # The first try goes to the server with the fewest requests in flight (ties in turn): a
            # server that answers faster takes more of the work, rather than every other request.
            turn = next(self._next)
            start = min(((turn + i) % n for i in range(n)), key=lambda j: self._in_flight[j])
        failures = []
        for attempt in range(self.retries + 1):
            j = (start + attempt) % n
            url = self.urls[j]
            with self._lock:
                self._in_flight[j] += 1
            try:
                return fn(url)
            except ServerError as e:
                failures.append(f"{url}: {e}")
                error = e
                if not e.retry:
                    break
            finally:
                with self._lock:
                    self._in_flight[j] -= 1
            if attempt < self.retries:
                wait = self.backoff * 2 ** attempt
                self.log(f"teacher server {url}: {error}; retrying in {wait:g} s")
                time.sleep(wait)
        raise HPDError(f"the teacher server failed {what} after {len(failures)} tries ({'; '.join(failures[-3:])}); "
                       f"check that it is running ({SERVE_HINT}), or raise teacher.server_timeout / "
                       "teacher.server_retries")

    # ---- what the trainer and the cache ask ----

    def score(self, sequences: Sequence[Sequence[int]], top_k: int, first: Sequence[int] | None = None) -> list[Scored]:
        """Every sequence's `Scored` (sequences of one token or none are scored as empty); `first[i]`:
        the first position of sequence i read from the answer (the ones before it are zero; see
        `parse_prompt_logprobs`), None = all of them."""
        todo = [i for i, s in enumerate(sequences) if len(s) >= 2]
        out = [Scored(np.empty(0), np.empty((0, top_k), dtype=np.int64), np.empty((0, top_k)), np.empty(0))
               for _ in sequences]
        if todo:
            got = self._with_retries("to score a batch", lambda url: self._score_on(
                url, [sequences[i] for i in todo], top_k, None if first is None else [first[i] for i in todo]))
            for i, s in zip(todo, got):
                out[i] = s
        return out

    def score_tokens(self, prefixes: Sequence[Sequence[int]], tokens: Sequence[int]) -> np.ndarray:
        """The teacher's exact `log p(tokens[i] | prefixes[i])` for every i, `(N,)` float64 (one
        request: each prefix with its token appended, the last prompt log-probability read)."""
        if not len(tokens):
            return np.empty(0)
        seqs = [list(p) + [int(t)] for p, t in zip(prefixes, tokens)]
        got = self._with_retries("to score sampled tokens", lambda url: self._score_on(url, seqs, 0))
        return np.asarray([g.label_logp[-1] for g in got])

    def submit(self, fn: Callable, *args) -> Future:
        """Run `fn(*args)` on the pool's threads (requests overlap the caller's compute)."""
        return self.pool.submit(fn, *args)

    def served_vocab_size(self, url: str, guess: int | None = None) -> int:
        """The vocabulary of the model `url` serves: the largest token id + 1 the engine accepts in a
        request (`allowed_token_ids`), checked at `guess` first, else found by bisection."""
        model = self._model(url)

        def accepts(token: int) -> bool:
            status, _, _ = self._call(url, "POST", "/v1/completions",
                                      {"model": model, "prompt": [[0]], "max_tokens": 1, "allowed_token_ids": [token]},
                                      timeout=60)
            if status not in (200, 400):
                raise ServerError(f"answered HTTP {status} to a vocabulary probe")
            return status == 200

        if guess is not None and accepts(guess - 1) and not accepts(guess):
            return guess
        lo, hi = 1, 1 << 10  # accepts(lo - 1) holds; find the first rejected id
        while accepts(hi - 1):
            lo, hi = hi, hi * 2
            if hi > 1 << 24:
                raise ServerError("accepts every token id up to 2**24 in a vocabulary probe")
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if accepts(mid - 1) else (lo, mid)
        return lo - 1 if not accepts(lo - 1) else lo

    def check(self, tokenizer, vocab_size: int | None, top_k: int, student: str = "the student",
              guess: int | None = None) -> dict[str, Any]:
        """Refuse servers whose model does not read text as `tokenizer` does or has another vocabulary
        than `vocab_size` (None: take the first server's), or that cannot return the top-K; return
        what to record (servers, models, vocabulary)."""
        probe = tokenizer.encode(PROBE_TEXT, add_special_tokens=False)
        reference: tuple[str, np.ndarray] | None = None
        for url in self.urls:
            def one(u=url):
                model = self._model(u)
                status, body, _ = self._call(u, "POST", "/tokenize",
                                             {"model": model, "prompt": PROBE_TEXT, "add_special_tokens": False}, timeout=30)
                if status != 200 or not isinstance(body, dict) or "tokens" not in body:
                    raise ServerError(f"/tokenize answered {status} without tokens")
                tokens = body["tokens"]
                if list(tokens) != list(probe):  # before any request holds the probe's ids (they may not be the server's)
                    at = next((i for i, (a, b) in enumerate(zip(tokens, probe)) if a != b), min(len(tokens), len(probe)))
                    raise HPDError(f"teacher server {u} serves {model}, whose tokenizer reads the probe text "
                                   f"{PROBE_TEXT!r} as other token ids than {student}'s (first difference at token {at}: "
                                   f"served {tokens[at:at + 4]}, student {probe[at:at + 4]}): logit distillation needs "
                                   "one tokenizer")
                served_vocab = self.served_vocab_size(u, vocab_size or guess)
                return model, served_vocab, self._score_on(u, [probe], min(top_k, served_vocab))[0]
            model, served_vocab, scored = self._with_retries("the start-up check", one)
            if vocab_size is None:
                vocab_size = served_vocab
            elif served_vocab != vocab_size:
                raise HPDError(f"teacher server {url} serves {model} with a vocabulary of {served_vocab} tokens, but "
                               f"{student}'s loss is over {vocab_size}: serve a teacher with the student's vocabulary")
            if reference is None:
                reference = (url, scored.label_logp)
            elif np.abs(reference[1] - scored.label_logp).max() > 1e-3:
                raise HPDError(f"teacher servers {reference[0]} ({self.models[reference[0]]}) and {url} ({model}) give "
                               "other log-probabilities for the same text: a pool must serve one model")
        self.vocab_size = vocab_size
        return {"servers": self.urls, "models": [self.models[u] for u in self.urls], "vocab_size": vocab_size,
                "top_k": min(top_k, vocab_size)}

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def topk_teacher(scored: Sequence[Scored], T: int, top_k: int, vocab_size: int, temperature: float = 1.0,
                 score: Callable | None = None):
    """The `TopKTeacher` `(B, T)` / `(B, T, K)` of a right-padded batch whose row b is the scored
    sequence b (position p of the batch predicts token p+1, as in `hpd.data.collate.build_batch`); `score`:
    see `TopKTeacher` (`exact_scorer` makes one)."""
    from hpd.objectives import TopKTeacher

    B = len(scored)
    label, tail = np.zeros((B, T), np.float32), np.zeros((B, T), np.float32)
    ids, lp = np.zeros((B, T, top_k), np.int64), np.zeros((B, T, top_k), np.float32)
    for b, s in enumerate(scored):
        n = min(len(s.label_logp), T)
        label[b, :n], tail[b, :n] = s.label_logp[:n], s.tail[:n]
        ids[b, :n], lp[b, :n] = s.topk_ids[:n], s.topk_logp[:n]
    return TopKTeacher(torch.from_numpy(label), torch.from_numpy(ids), torch.from_numpy(lp), torch.from_numpy(tail),
                       vocab_size, temperature, score)


def exact_scorer(servers: TeacherServers, sequences: Sequence[Sequence[int]], T: int) -> Callable:
    """`TopKTeacher.score` for a batch whose row b is `sequences[b]` (padded to T): the teacher's
    log-probability of `tokens (N,)` at flat positions `positions (N,)` of `(B, T)`, asked of the
    servers (position t of row b continues `sequences[b][:t + 1]`)."""

    def score(positions: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        pos, tok = positions.tolist(), tokens.tolist()
        prefixes = [sequences[p // T][:p % T + 1] for p in pos]
        return torch.from_numpy(servers.score_tokens(prefixes, tok)).to(positions.device)

    return score


__all__ = ["PROBE_TEXT", "Scored", "exact_scorer", "ServerError", "TeacherServers", "parse_prompt_logprobs",
           "parse_urls", "topk_teacher"]
