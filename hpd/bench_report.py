"""Moved to `hpd.apps.bench_report`; this old path works for one release (see `hpd._moved`)."""

from hpd._moved import alias

alias(__name__, "hpd.apps.bench_report")
