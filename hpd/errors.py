"""User-facing errors.

`HPDError` is raised for anything a user can cause and fix (a missing path, a malformed data row,
a vocabulary mismatch, a bad config value). The CLI prints its message without a traceback; the
Python API lets it propagate. It subclasses `ValueError` so that callers catching `ValueError`
(the objective registry's documented contract) also catch it.

    >>> from hpd.errors import HPDError
    >>> try:
    ...     raise HPDError("data file 'x.jsonl' not found: check data.train")
    ... except ValueError as e:
    ...     print(e)
    data file 'x.jsonl' not found: check data.train
"""


class HPDError(ValueError):
    """An error the user can fix; its message says what is wrong and how to fix it."""


class DivergedError(HPDError):
    """Training stopped because the loss or gradient norm stayed non-finite (`optim.max_bad_steps`).

    A result of the settings rather than a mistake in them: `hpd bench` records such a run as
    failed at its learning rate (a diverged grid point) and goes on; every other error stops it."""
