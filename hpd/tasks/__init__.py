"""Moved to `hpd.apps.tasks`; this old path (and `hpd.tasks.code`, ...) works for one release
(see `hpd._moved`)."""

from hpd._moved import alias

alias(__name__, "hpd.apps.tasks", submodules=("base", "capitals", "code", "dialogue", "math", "sandbox"))
