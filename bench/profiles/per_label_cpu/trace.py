import collections
import glob
import gzip
import json
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(__file__, "../../..")))  # bench/, for gain_overhead
sys.path.insert(0, os.path.abspath(os.path.join(__file__, "../../../..")))  # the repository
import gain_overhead as go
import jax
import jax.numpy as jnp
import numpy as np
import optax

import gain_jax as gj

OUT = os.environ.get("PROFILE_DIR", "/tmp/profile_work")  # traces and dumps go here

B, S, C = 32, 64, 20
rng = np.random.default_rng(0)
model = gj.build_model("small_cnn", C, dropout_rate=0.5)
images = jnp.asarray(rng.normal(size=(B, S, S, 3)).astype(np.float32))
variables = model.init(jax.random.PRNGKey(0), images[:1])
tx = optax.adam(1e-4)


def fresh():
    return gj.create_train_state(jax.tree_util.tree_map(jnp.copy, variables), tx)


key0, on = jax.random.PRNGKey(0), jnp.float32(1.0)
labels = go.labels_with(2, B, C, rng)
which = sys.argv[1]
if which == "cls":
    st = fresh()
    batch = {"image": images, "labels": jnp.asarray(labels)}
    f = go.make_classification_step(model).lower(st, batch, key0).compile()
    extra = ()
else:
    case = go.Case(which, which, [labels], 0)
    cfg, batch, shape = go.gain_batch(case, images, labels)
    st = fresh()
    f = gj.make_train_step(model, cfg).lower(st, batch, key0, on).compile()
    extra = (on,)
for _i in range(3):
    st, o = f(st, batch, key0, *extra)
    jax.block_until_ready(o)
d = f"{OUT}/trace_{which}"
with jax.profiler.trace(d, create_perfetto_trace=True):
    for _i in range(5):
        st, o = f(st, batch, key0, *extra)
        jax.block_until_ready(o)
p = glob.glob(f"{d}/**/*perfetto_trace.json.gz", recursive=True)[0]
ev = json.load(gzip.open(p))
ev = ev["traceEvents"] if isinstance(ev, dict) else ev
tot = collections.Counter()
cnt = collections.Counter()
for e in ev:
    if e.get("ph") == "X":
        tot[e["name"]] += e.get("dur", 0)
        cnt[e["name"]] += 1
print(which, "top ops (ms per step, 5 steps):")
for n, t in tot.most_common(30):
    print(f"  {t / 5e3:8.2f}  x{cnt[n] // 5:<4} {n[:110]}")
