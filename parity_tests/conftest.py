"""The parity suite's end-of-run summary: the largest difference seen per quantity and precision.

Each parity test attaches its measured differences to its report's `user_properties` (see
`parity_harness.record`); reports travel from pytest-xdist workers to the controller with their
user_properties, so the table below covers every test, whichever process ran it.
"""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # parity_harness, under any import mode


@pytest.fixture(autouse=True, scope="module")
def default_compile_level():
    """Parity compiles at XLA's default optimization level. tests/ compiles at level 0 (tests/conftest.py), and
    `jax_disable_most_optimizations` is not part of JAX's in-memory compilation caches' keys: a worker that ran a
    tests/ module may hold its level-0 programs, so they are dropped as each parity module starts (the on-disk
    cache keys on the compile options and keeps the two levels apart)."""
    import jax

    assert not jax.config.read("jax_disable_most_optimizations"), "parity must compile at the default level"
    jax.clear_caches()
    yield


USER_PROPERTY = "parity"  # = parity_harness.USER_PROPERTY (not imported: it pulls in torch and JAX)
QUANTITY_ORDER = ("logits_cl", "heatmap", "scaled", "mask", "masked_images", "logits_am",
                  "loss_cl", "loss_am", "loss_ex", "loss_total", "batch_stats", "grads",
                  "adam_params", "adam_param_change", "adam_batch_stats")


def _measurements(terminalreporter):
    """(precision, quantity) -> [max abs, max rel, max tolerance, count, tests]."""
    table = {}
    for reports in terminalreporter.stats.values():
        for report in reports:
            if getattr(report, "when", None) != "call":
                continue
            for key, value in getattr(report, "user_properties", ()):
                if key != USER_PROPERTY:
                    continue
                try:
                    precision, quantity, abs_diff, rel_diff, tolerance = json.loads(value)
                except (TypeError, ValueError):
                    continue
                row = table.setdefault((precision, quantity), [0.0, 0.0, 0.0, 0, set()])
                row[0] = max(row[0], abs_diff)
                row[1] = max(row[1], rel_diff)
                row[2] = max(row[2], tolerance)
                row[3] += 1
                row[4].add(report.nodeid)
    return table


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    table = _measurements(terminalreporter)
    if not table:
        return

    def order(key):
        precision, quantity = key
        rank = QUANTITY_ORDER.index(quantity) if quantity in QUANTITY_ORDER else len(QUANTITY_ORDER)
        return (precision != "float64", rank, quantity)

    terminalreporter.write_sep("=", "parity: gain_jax vs gain_torch_ref, largest difference per quantity")
    terminalreporter.write_line("relative = max|jax - torch| / max|torch| per tensor (each gradient and "
                                "parameter leaf on its own)")
    header = f"{'precision':<9} {'quantity':<18} {'max abs':>10} {'max rel':>10} {'tolerance':>9} " \
             f"{'compared':>8} {'tests':>5}"
    terminalreporter.write_line(header)
    for key in sorted(table, key=order):
        abs_diff, rel_diff, tolerance, count, tests = table[key]
        terminalreporter.write_line(f"{key[0]:<9} {key[1]:<18} {abs_diff:>10.2e} {rel_diff:>10.2e} "
                                    f"{tolerance:>9.0e} {count:>8} {len(tests):>5}")
