"""The applications built on the `hpd` library: the `hpd` command and what only it needs.

`cli` (the `hpd` command), `tasks` (seeded verifiable tasks and the code sandbox), `verifiers`
(answer checkers for any data file), `evaluate` (generate-and-verify), `plots` (training-dynamics
figures) and `experiments` (runs side by side). They import the library; the library
(`hpd.training.trainer`, `hpd.objectives`, ...) never imports them (tests/test_layout.py checks it).

    >>> from hpd.apps.tasks import get_task
    >>> get_task("capitals").name
    'capitals'
"""
