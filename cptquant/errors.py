"""User-facing errors: the CLI prints their message as one line and exits with code 2."""


class CptqError(Exception):
    """Bad input or an environment problem the user can fix. Never a bug in cptquant."""


class VerificationFailed(Exception):
    """A quality or speed threshold did not hold (exit code 1 in `cptq verify`)."""
