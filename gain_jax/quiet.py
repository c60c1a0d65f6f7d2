"""A quiet console: keep TensorFlow's, absl's and tfds' start-up chatter out of the program's output.

TensorFlow (2.19 and later) logs through absl's C++ logging before anything can configure it, so that
`TF_CPP_MIN_LOG_LEVEL` no longer hides "All log messages before absl::InitializeLog() is called are written
to STDERR", oneDNN's "You may see slightly different numerical results" (an INFO line: oneDNN stays on, the
message is hidden, not the numerics changed) and cpu_feature_guard's instruction-set notice. tfds adds
"`FeatureConnector.dtype` is deprecated" warnings through absl's Python logging, progress bars while it
builds a data set, and "Downloading and preparing dataset ..." lines on stdout.

    from gain_jax import quiet
    quiet.quiet_libraries(verbose=args.verbose)  # before gain_jax.data (and TensorFlow) is imported
    import gain_jax.data as gd

`gain_jax.data` calls `quiet_libraries()` itself when the program has not, so that importing it and
building a pipeline prints nothing by default. This module imports neither TensorFlow nor tfds.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from typing import BinaryIO

# C++ log lines written while TensorFlow is imported that quiet mode drops; anything else (C++ warnings
# and errors, Python tracebacks) is written back to stderr.
_IMPORT_NOISE = (
    re.compile(r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$"),
    re.compile(r"^I\d{4} [\d:. ]+\d+ [\w.]+:\d+\] "),  # absl INFO lines: oneDNN, cpu_feature_guard, ...
    re.compile(r"^To enable the following instructions: .* rebuild TensorFlow with the appropriate compiler "
               r"flags\.$"),  # second line of cpu_feature_guard's INFO
)
# absl Python log messages quiet mode drops whatever the absl verbosity
_ABSL_NOISE = ("is deprecated. Please change your code to use NumPy with the field",)
_LIBRARY_LOGGERS = ("absl", "tensorflow")

_state = {"verbose": None, "env_set": False, "levels": {}}


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if _state["verbose"]:
            return True
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is the library's to report
            return True
        return not any(noise in message for noise in _ABSL_NOISE)


_FILTER = _DropNoise()


def quiet_libraries(verbose: bool = False) -> None:
    """Silence (or with `verbose`, restore) TensorFlow's, absl's and tfds' logs and progress bars.

    Call it before TensorFlow is imported (before `import gain_jax.data`) for the import-time messages; the
    rest (log levels, tfds' progress bars) takes effect whenever it is called. An environment variable the
    user set (TF_CPP_MIN_LOG_LEVEL) is left as it is.
    """
    verbose = bool(verbose)
    _state["verbose"] = verbose
    if verbose:
        if _state["env_set"]:
            os.environ.pop("TF_CPP_MIN_LOG_LEVEL", None)
            _state["env_set"] = False
        for name, level in _state["levels"].items():
            logging.getLogger(name).setLevel(level)
        _state["levels"].clear()
    else:
        # Still honoured by older TensorFlow builds and TSL code paths; hides INFO and WARNING, not errors.
        if "TF_CPP_MIN_LOG_LEVEL" not in os.environ:
            os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
            _state["env_set"] = True
        for name in _LIBRARY_LOGGERS:
            logger = logging.getLogger(name)
            _state["levels"].setdefault(name, logger.level)
            logger.setLevel(logging.ERROR)
    absl_logger = logging.getLogger("absl")
    if _FILTER not in absl_logger.filters:
        absl_logger.addFilter(_FILTER)
    _apply_to_imported_libraries()


def is_verbose() -> bool:
    """False unless `quiet_libraries(verbose=True)` was the last call."""
    return bool(_state["verbose"])


def quiet_unless_chosen() -> None:
    """`quiet_libraries()` if the program has not called it: what `gain_jax.data` does on import."""
    if _state["verbose"] is None:
        quiet_libraries(verbose=False)


def _apply_to_imported_libraries() -> None:
    """tfds' progress bars, if tfds is imported (else `after_import` does it)."""
    tfds = sys.modules.get("tensorflow_datasets")
    if tfds is None or not hasattr(tfds, "disable_progress_bar"):
        return
    if _state["verbose"]:
        tfds.enable_progress_bar()
    else:
        tfds.disable_progress_bar()


def after_import() -> None:
    """Settings that need TensorFlow/tfds imported; called by `gain_jax.data` right after importing them."""
    if _state["verbose"] is not None:
        _apply_to_imported_libraries()


def _is_import_noise(line: str) -> bool:
    return any(pattern.match(line) for pattern in _IMPORT_NOISE)


def _drop_import_noise(captured: bytes) -> bytes:
    lines = captured.decode("utf-8", "replace").splitlines(keepends=True)
    return "".join(line for line in lines if not _is_import_noise(line.rstrip("\r\n"))).encode("utf-8")


@dataclasses.dataclass
class Fd2Capture:
    """What `capture_fd2` yields. `file` receives what is written to fd 2 inside the block when `redirected`
    (fd 2 could be redirected); `write_back` maps the captured bytes to what is written back to fd 2 at the
    end (everything, unless the block sets another)."""

    file: BinaryIO
    redirected: bool
    write_back: Callable[[bytes], bytes]


@contextlib.contextmanager
def capture_fd2(write_back: Callable[[bytes], bytes] = lambda captured: captured) -> Iterator[Fd2Capture]:
    """Redirect file descriptor 2 to a temporary file inside the block (C++ logs included, not only
    `sys.stderr`), then restore it and write `capture.write_back(captured bytes)` to it. When fd 2 cannot be
    redirected, the block runs with fd 2 as it is and nothing is captured."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        saved = None
    with tempfile.TemporaryFile(mode="w+b") as captured:
        capture = Fd2Capture(captured, saved is not None, write_back)
        if saved is None:
            yield capture
            return
        try:
            os.dup2(captured.fileno(), 2)
            try:
                yield capture
            finally:
                try:
                    sys.stderr.flush()
                except (OSError, ValueError):
                    pass
                os.dup2(saved, 2)
                captured.seek(0)
                kept = capture.write_back(captured.read())
                if kept:
                    os.write(2, kept)
        finally:
            os.close(saved)


@contextlib.contextmanager
def filtered_import_stderr() -> Iterator[None]:
    """Hold what is written to file descriptor 2 (C++ logs included) inside the block, then write back all
    of it but the known start-up noise. A no-op when verbose, or when fd 2 cannot be redirected."""
    if _state["verbose"] or _state["verbose"] is None:
        yield
        return
    with capture_fd2(_drop_import_noise):
        yield


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """Python-level stdout muted in quiet mode (tfds prints "Downloading and preparing dataset ..." and
    "... downloaded and prepared" there while building a data set)."""
    if _state["verbose"]:
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield


def current_settings() -> dict:
    """For tests and `--verbose` diagnostics: the choice made and the levels in force."""
    return {"verbose": _state["verbose"], "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL"),
            **{f"logger:{name}": logging.getLogger(name).level for name in _LIBRARY_LOGGERS}}


__all__ = ["Fd2Capture", "after_import", "capture_fd2", "current_settings", "filtered_import_stderr", "is_verbose",
           "quiet_libraries", "quiet_stdout", "quiet_unless_chosen"]
