"""gain_jax.quiet's fd-2 capture, the one behind the quiet TensorFlow import and the contained checkpoint
restores: what reaches file descriptor 2 inside the block is held, then written back as `write_back` says."""
import os

from gain_jax import quiet


def test_capture_fd2_holds_fd2_and_writes_back_what_write_back_keeps(capfd):
    with quiet.capture_fd2(lambda captured: captured.replace(b"noise\n", b"")) as capture:
        os.write(2, b"noise\nkept\n")  # below Python: what C++ logging does
        assert capture.redirected
        assert capfd.readouterr().err == ""  # held, not yet written
    assert capfd.readouterr().err == "kept\n"


def test_capture_fd2_writes_everything_back_by_default_and_nothing_when_told(capfd):
    with quiet.capture_fd2():
        os.write(2, b"all of it\n")
    assert capfd.readouterr().err == "all of it\n"
    with quiet.capture_fd2() as capture:
        os.write(2, b"dropped\n")
        capture.write_back = lambda captured: b""
    assert capfd.readouterr().err == ""


def test_filtered_import_stderr_drops_only_the_known_start_up_noise(capfd, monkeypatch):
    noise = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
    monkeypatch.setitem(quiet._state, "verbose", False)  # quiet mode, without touching the loggers
    with quiet.filtered_import_stderr():
        os.write(2, noise + b"a real error\n")
    assert capfd.readouterr().err == "a real error\n"
