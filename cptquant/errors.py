"""User-facing errors: the CLI prints their message as one line and exits with code 2."""


class CptqError(Exception):
    """Bad input or an environment problem the user can fix. Never a bug in cptquant."""


def first_line(exc: BaseException, empty: str = "") -> str:
    """The first line of `exc`'s message (what a one-line error can quote), or `empty` when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else empty


class VerificationFailed(Exception):
    """A quality or speed threshold did not hold (exit code 1 in `cptq verify`)."""
