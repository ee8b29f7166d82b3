"""Moved to `hpd.apps.demo`; this old path works for one release (see `hpd._moved`)."""

from hpd._moved import alias

alias(__name__, "hpd.apps.demo")
