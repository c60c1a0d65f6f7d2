"""Per-op time of traces written by trace.py: python agg.py cls union ... (summed over the 5 traced steps)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # bench/profiles
from profile_common import OUT, aggregate_trace

for which in sys.argv[1:]:
    tot, n = aggregate_trace(f"{OUT}/trace_{which}")
    s = sum(tot.values())
    print(f"== {which}: op time summed {s / 5e3:.1f} ms/step (2 threads may overlap)")
    for k, t in tot.most_common(14):
        print(f"  {t / 5e3:8.2f} ms  x{n[k] / 5:<5.0f} {k}")
