"""Group the traced op time of both sides (written by profile_step.py) by kind, and count what XLA did to the
weight-gradient convolutions. Usage: python bench/profiles/vgg16_union_cpu/group.py [--top 40]
"""
import argparse
import collections
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # bench/profiles
import profile_common as pc

# torch groups that match a JAX group one to one (the rest are compared as sums, see the report)
SAME = {"conv forward", "max-pool + its backward", "Adam update (+ gradient sums)", "transposes/copies (layout)"}
INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*)$")
COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")


def parse_hlo(text: str):
    """{instruction name: its line} and {computation name: its lines}."""
    instructions, computations, current = {}, collections.defaultdict(list), None
    for line in text.splitlines():
        header = COMPUTATION.match(line)
        if header and "=" not in line.split("(")[0]:
            current = header.group(1)
            continue
        match = INSTRUCTION.match(line)
        if match and current:
            instructions[match.group(1)] = match.group(2)
            computations[current].append(line)
    return instructions, computations


def body(line: str, computations) -> str:
    """The instruction's line and the lines of the computations it calls (one level: fusions)."""
    called = re.findall(r"calls=%?([\w.\-]+)", line)
    return "\n".join([line] + [sub for name in called for sub in computations.get(name, [])])


def conv_kind(text: str) -> str:
    for line in text.splitlines():
        if " convolution(" not in line:
            continue
        shape = re.search(r"= f32\[([\d,]+)\]", line) or re.search(r"^f32\[([\d,]+)\]", line.strip())
        window = re.search(r"window=\{size=(\d+)x(\d+)", line)
        dims = [int(d) for d in shape.group(1).split(",")] if shape else []
        if len(dims) == 4 and dims[1:3] == [3, 3] and window and window.group(1) != "3":
            return "conv weight-gradient"
        if "transpose(" in line:
            return "conv input-gradient"
        return "conv forward"
    return ""


def jax_group(name: str, line: str, text: str) -> str:
    """The kind of a traced JAX op, from its HLO instruction (and fusion body) and JAX's op_name metadata."""
    if line is None:
        return "runtime waits / other"
    op_name = " ".join(re.findall(r'op_name="([^"]*)"', text))
    if " convolution(" in text:
        return conv_kind(text)
    if "state_opt_state" in line or op_name == "jit(train_step)/add":  # optax: mu, nu, params (fused grad sums)
        return "Adam update (+ gradient sums)"
    if (" dot(" in text or "ynn" in name) and ("head" in op_name or "fc_" in op_name):
        return "head (dense) VJP" if "transpose(" in op_name else "head (dense) forward"
    if "reduce_max" in op_name or name.startswith("iota_reduce") or (
            name.startswith("transpose_copy") and op_name.endswith("features/transpose")):
        return "max-pool + its backward"  # forward reduce_max + window transpose; argmax of the custom VJP
    if name.startswith("copy") or "transpose" in name:
        return "transposes/copies (layout)"
    return "elementwise/other fusions"


def torch_group(op: str) -> str:
    """The kind of a torch op from its name and input shapes ("aten::name [[shape], ...]"); batch is 4 and
    no parameter's first dimension is 4, so elementwise ops on parameter-shaped tensors are the optimizer's
    (and autograd's gradient sums, which XLA fuses into its Adam fusions)."""
    name, _, shapes = op.partition(" ")
    first_dim = re.match(r"\[\[(\d+)", shapes)
    if name in ("aten::mkldnn_convolution", "aten::_convolution", "aten::convolution", "aten::conv2d"):
        return "conv forward"
    if "convolution_backward" in name:
        return "conv backward (input + weight)"
    if "max_pool" in name:
        return "max-pool + its backward"
    if name.startswith(("Optimizer.", "aten::_foreach")) or (first_dim and first_dim.group(1) != "4" and name in (
            "aten::sqrt", "aten::div", "aten::add", "aten::add_", "aten::addcdiv_", "aten::addcmul_",
            "aten::lerp_", "aten::mul_", "aten::div_", "aten::sqrt_", "aten::zero_", "aten::fill_")):
        return "Adam update (+ gradient sums)"
    if name in ("aten::addmm", "aten::mm", "aten::linear", "aten::matmul", "aten::t", "aten::bmm") or (
            "TBackward" in name or "AddmmBackward" in name or "MmBackward" in name):
        return "head (dense) fwd + VJP"
    if name in ("aten::copy_", "aten::contiguous", "aten::clone", "aten::to_dense", "aten::transpose",
                "aten::permute", "aten::to_mkldnn"):
        return "transposes/copies (layout)"
    return "elementwise/other"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--top", type=int, default=0, help="also list the top N ops of each side")
    args = parser.parse_args()
    steps = json.load(open(f"{pc.OUT}/vgg16_union_steps.json"))
    n = steps["traced_steps"]
    instructions, computations = parse_hlo(open(f"{pc.OUT}/vgg16_union_hlo.txt").read())
    total, count = pc.aggregate_trace(f"{pc.OUT}/vgg16_union_jax", strip_suffix=False)
    jax_ms, layout_ms, layout_count = collections.Counter(), collections.Counter(), collections.Counter()
    groups = {name: jax_group(name, line, body(line, computations)) for name, line in instructions.items()}
    tops = []
    for name, us in total.items():
        line = instructions.get(name)
        group = groups.get(name, "runtime waits / other")
        jax_ms[group] += us / n / 1e3
        tops.append((us / n / 1e3, name, group, count[name] / n))
        if group == "transposes/copies (layout)":  # what the layout op feeds
            users = {groups[user] for user, user_line in instructions.items()
                     if re.search(rf"[(,] ?%?{re.escape(name)}[,)]", user_line)}
            kind = " + ".join(sorted(users)) or "(outputs)"
            if "state_params" in line and name.startswith("copy"):
                kind = "parameter copy (donated buffer read after its update)"
            layout_ms[kind] += us / n / 1e3
            layout_count[kind] += 1
    torch_ops = json.load(open(f"{pc.OUT}/vgg16_union_torch_ops.json"))
    torch_ms = collections.Counter()
    for op, entry in torch_ops.items():
        torch_ms[torch_group(op)] += entry["self_us"] / n / 1e3
    print(f"wall (untraced, median): JAX {steps['wall_ms']['jax']:.1f} ms, torch {steps['wall_ms']['torch']:.1f} ms; "
          f"load average {steps['load_average']:.1f}")
    for side, ms in (("JAX (op time summed over threads)", jax_ms), ("torch (self CPU time)", torch_ms)):
        s = sum(ms.values())
        print(f"\n{side}: {s:.1f} ms/step")
        for group, value in ms.most_common():
            print(f"  {group:<34} {value:8.1f} ms {100 * value / s:5.1f}%")
    print("\nJAX layout ops by what they feed (ms/step, ops)")
    for kind, value in layout_ms.most_common():
        print(f"  {value:8.1f} ms {layout_count[kind]:4d}  {kind[:110]}")
    if args.top:
        print("\nJAX top ops (ms/step, group)")
        for ms, name, group, calls in sorted(tops, reverse=True)[:args.top]:
            print(f"  {ms:8.1f} x{calls:<3.0f} {name:<32} {group}")
        print("\ntorch top ops (self ms/step)")
        ranked = sorted(torch_ops.items(), key=lambda item: -item[1]["self_us"])[:args.top]
        for op, entry in ranked:
            print(f"  {entry['self_us'] / n / 1e3:8.1f} x{entry['count'] / n:<4.0f} {op[:120]}")
    # what XLA made of the weight-gradient convolutions
    entry = [line for line in computations.get(next(c for c in computations if c.startswith("main")), [])]
    kinds = collections.Counter()
    for line in entry:
        match = INSTRUCTION.match(line)
        if not match:
            continue
        name = match.group(1)
        kinds["ynn fusion" if "__ynn_fusion" in line else name.split(".")[0]] += 1
    weight_convs = [line for lines in computations.values() for line in lines
                    if " convolution(" in line and conv_kind(line) == "conv weight-gradient"]
    print(f"\nentry computation: {sum(kinds.values())} instructions; "
          + ", ".join(f"{k} {v}" for k, v in kinds.most_common(14)))
    print(f"weight-gradient convolutions: {len(weight_convs)}; e.g.")
    for line in weight_convs[:3]:
        print("  " + re.sub(r", metadata=.*", "", line.strip())[:300])


if __name__ == "__main__":
    main()
