"""Moved to `hpd.apps.cli`; this old path (`python -m hpd.cli`, `hpd.cli:main`) works for one
release (see `hpd._moved`)."""

if __name__ == "__main__":
    from hpd.apps.cli import main

    main()
else:
    from hpd._moved import alias

    alias(__name__, "hpd.apps.cli")
