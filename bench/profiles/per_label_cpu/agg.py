import collections
import glob
import gzip
import json
import os
import re
import sys

OUT = os.environ.get("PROFILE_DIR", "/tmp/profile_work")  # traces and dumps go here

for which in sys.argv[1:]:
    p = glob.glob(f"{OUT}/trace_{which}/**/*perfetto_trace.json.gz", recursive=True)[0]
    ev = json.load(gzip.open(p))
    ev = ev["traceEvents"] if isinstance(ev, dict) else ev
    tot = collections.Counter()
    n = collections.Counter()
    for e in ev:
        if e.get("ph") != "X":
            continue
        name = e["name"]
        if name.startswith("$") or name.startswith("ThunkExecutor") or "PjRt" in name or "Execute" in name:
            continue
        k = re.sub(r"\.\d+$", "", name)
        tot[k] += e.get("dur", 0)
        n[k] += 1
    s = sum(tot.values())
    print(f"== {which}: op time summed {s / 5e3:.1f} ms/step (2 threads may overlap)")
    for k, t in tot.most_common(14):
        print(f"  {t / 5e3:8.2f} ms  x{n[k] / 5:<5.0f} {k}")
