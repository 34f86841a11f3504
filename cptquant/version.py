"""The package's version, in a module of its own: the package root imports the API (api.py), so a module
below it that reads the version from the root would close an import cycle."""

__version__ = "0.1.0"
