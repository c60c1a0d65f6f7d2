"""Root conftest: import order matters in this environment.

`import torchvision` after `import tensorflow` in one process segfaults (tensorflow-cpu 2.21,
torchvision 0.29.1; see docs/design.md, section 5). Importing torchvision first, when it is installed, avoids it
for every test module, whatever order pytest collects them in. Below: a fixture of the torch test modules of both
test folders, and the order of the test files.
"""
import pytest

try:
    import torchvision  # noqa: F401
except ImportError:  # the core tests run without the torch extra
    pass


@pytest.fixture(scope="module")
def torch_one_thread():
    """torch on one thread for a test module (`pytestmark = pytest.mark.usefixtures("torch_one_thread")`), restored
    afterwards. On a busy 2-core machine torch's two OpenMP threads spin-wait on each other at every barrier: tiny
    ops cost ~25 ms each on two threads, ~0.4 ms on one (tests/test_torch_ref.py: 24 CPU-s on two, ~4 on one);
    resnet18's three float64 CAM passes took 3-7 s on 2 threads and 1.0-1.4 s on 1 at load ~4."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Test files, costliest first (CPU-s of each file in the whole suite, profiled on the 2-core CPU at ee9909f and
# after the later cuts; a file not named here runs after these, in collection order). `-n 2 --dist loadfile` gives
# a worker the next file in the queue whenever it is nearly idle; xdist orders that queue by the number of tests, which
# left costly files with few tests (test_parts_study, test_faults, test_bench) to the end, one worker busy alone
# (fresh clone of 8266525, idle: 945 s wall for 1543 CPU-s). Costliest first is the greedy schedule that keeps both
# busy to the end. Refresh the list when a file's cost moves a lot; a wrong order costs time, never correctness.
COSTLIEST_FIRST = (
    "tests/test_train_loop.py", "tests/test_parts_study.py", "tests/test_faults.py", "tests/test_train_cli.py",
    "tests/test_bench.py", "tests/test_packing.py", "tests/test_variants.py", "tests/test_gain.py",
    "parity_tests/test_parity_small_cnn.py", "tests/test_pipeline.py", "parity_tests/test_parity_resnet18.py",
    "tests/test_models.py", "tests/test_convert.py", "tests/test_training.py", "tests/test_readme.py",
    "tests/test_mask_grad.py", "tests/test_experiments.py", "tests/test_train_sweep.py",
    "parity_tests/test_parity_vgg16.py", "parity_tests/test_parity_vgg19.py", "parity_tests/test_parity_cam_methods.py",
    "tests/test_parts_probe.py", "tests/test_data_parts.py", "tests/test_erase_fills.py",
)


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep the order below, not its own
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    rank = {path: position for position, path in enumerate(COSTLIEST_FIRST)}
    items[:] = sorted(items, key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable
