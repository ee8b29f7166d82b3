"""The package version, in a module of its own so that any module can read it without importing `hpd`
(whose `__init__` may import it back).

    >>> from hpd.version import __version__
    >>> __version__ == __import__("hpd").__version__
    True
"""

__version__ = "0.1.0"
