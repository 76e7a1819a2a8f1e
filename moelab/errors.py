"""Errors a user can cause. The CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """Bad input from the user (config, paths, data). Message says what is wrong and what to do."""


def first_line(exc: BaseException, limit: int = 160) -> str:
    """A library exception's message cut to its first line (at most `limit` characters), or its type
    name when it has none: the reason part of a one-line error."""
    text = str(exc)
    return text.splitlines()[0][:limit] if text.strip() else type(exc).__name__


def write_errors() -> tuple[type[BaseException], ...]:
    """What a failed write of model files raises: OSError from Python, RuntimeError from
    torch.save, SafetensorError from safetensors (a full disk or a quota reaches us as either)."""
    from safetensors import SafetensorError

    return OSError, RuntimeError, SafetensorError


def cannot_write(what: str, exc: BaseException, kept: str, again: str, elsewhere: str) -> OSError:
    """One-line OSError for a failed write of `what`: the reason (the last line of the library's
    message), what is still intact (`kept`), the fix and the command to run `again`. The fix is to
    make room (a full disk or quota, which torch and safetensors also report without an errno),
    or `elsewhere` where the path itself is refused (no permission, read-only, not a folder). The
    CLI prints it without a traceback."""
    import errno

    why = (exc.strerror if isinstance(exc, OSError) else None) or str(exc).strip().splitlines()[-1]
    path_refused = isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT,
                                                             errno.ENOTDIR, errno.EISDIR)
    return OSError(f"cannot write {what} ({why}); {kept}: {elsewhere if path_refused else 'make room'}, then {again}")
