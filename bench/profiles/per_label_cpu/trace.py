import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # bench/profiles
import profile_common as pc

pc.add_repository_paths()  # bench/ and the repository
import gain_overhead as go  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import gain_jax as gj  # noqa: E402

B, S, C = 32, 64, 20
setup = pc.small_cnn_setup(B, S, C)
rng, model, images, fresh, key0, on = setup.rng, setup.model, setup.images, setup.fresh, setup.key0, setup.on
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
d = f"{pc.OUT}/trace_{which}"
with jax.profiler.trace(d, create_perfetto_trace=True):
    for _i in range(5):
        st, o = f(st, batch, key0, *extra)
        jax.block_until_ready(o)
tot, cnt = pc.aggregate_trace(d, strip_suffix=False, skip_runtime=False)
print(which, "top ops (ms per step, 5 steps):")
for n, t in tot.most_common(30):
    print(f"  {t / 5e3:8.2f}  x{cnt[n] // 5:<4} {n[:110]}")
