"""The error types every layer of onellm raises.

One base class, `OneLLMError`; the CLI turns any of them into a one-line message and
a non-zero exit code. `assert` is kept for internal invariants only.
"""

from __future__ import annotations


class OneLLMError(Exception):
    """Base class of every error onellm raises on purpose."""

    exit_code = 1


class InputError(OneLLMError):
    """A user-supplied input (file or array) is not what the model can take.

    The message names the source, what was expected and what was found.
    """

    exit_code = 2

    def __init__(self, source: object, expected: str, found: str) -> None:
        self.source = str(source)
        self.expected = expected
        self.found = found
        super().__init__(f"{self.source}: expected {expected}, found {found}")


class ConfigError(OneLLMError):
    """A model configuration or preset is unknown or malformed."""

    exit_code = 2


class CheckpointError(OneLLMError):
    """A checkpoint is missing, unreadable or does not match the configuration."""


class BundleError(OneLLMError):
    """An exported bundle is missing files, has a bad checksum or an unknown schema."""


class BackendError(OneLLMError):
    """A native backend (onnxruntime, llama.cpp, TensorRT) failed or returned an error code."""


class ParityError(OneLLMError):
    """An exported artifact disagrees with the PyTorch reference beyond its tolerance."""


class ResultFileError(OneLLMError):
    """A results file onellm wrote earlier (a bench.json) is malformed or of another schema.

    The message names the file and the key.
    """

    exit_code = 2


class OutputError(OneLLMError):
    """A file or directory onellm must write (--out, a cache) cannot be written.

    The message names the path and what went wrong (permission, read-only file system,
    missing parent, disk full, a file in the way).
    """


# errno -> what a user reads. Kept to the cases a user can act on; the rest fall back
# to the OS's own wording.
_ERRNO_WORDS = {
    "EACCES": "permission denied",
    "EPERM": "operation not permitted",
    "EROFS": "read-only file system",
    "ENOENT": "no such file or directory",
    "ENOSPC": "no space left on device (disk full)",
    "EDQUOT": "disk quota exceeded",
    "EEXIST": "a file is in the way (it already exists)",
    "ENOTDIR": "a file is in the way (a part of the path is not a directory)",
    "EISDIR": "a directory is in the way",
    "ENAMETOOLONG": "the file name is too long",
    "EMFILE": "too many open files",
    "EIO": "an input/output error from the device",
}


def describe_os_error(exc: OSError) -> str:
    """A few words on an OSError: its errno in plain words and its symbolic name."""
    import errno as _errno

    name = _errno.errorcode.get(exc.errno or -1, "")
    words = _ERRNO_WORDS.get(name) or (exc.strerror or str(exc) or type(exc).__name__).lower()
    return f"{words} ({name})" if name else words


def os_error(exc: OSError, path: object = None, doing: str = "write") -> OneLLMError:
    """An OSError as a one-line `OutputError` naming the path and what went wrong.

    `doing` says what onellm was trying to do ("write", "create the directory", "read").
    """
    where = path if path is not None else (exc.filename if exc.filename is not None else "?")
    return OutputError(f"{where}: cannot {doing}: {describe_os_error(exc)}")
