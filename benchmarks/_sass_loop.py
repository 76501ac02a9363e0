"""Instruction mix of the main loop (the backward branch enclosing HGMMA/FFMA) of a dumped SASS file."""
import collections
import re
import sys


def loop_mix(path):
    lines = open(path).read().splitlines()
    labels = {l.strip().rstrip(':'): i for i, l in enumerate(lines) if re.match(r'^\.L_x_\d+:', l.strip())}
    best = None
    for i, l in enumerate(lines):
        m = re.search(r'BRA `\((\.L_x_\d+)\)', l)
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            s = labels[m.group(1)]
            body = "\n".join(lines[s:i + 1])
            if "HGMMA" in body or "HMMA" in body or "FFMA" in body:
                if best is None or (i - s) > (best[1] - best[0]):
                    best = (s, i)
    if best is None:
        return None
    ops = collections.Counter()
    for l in lines[best[0]:best[1] + 1]:
        mm = re.match(r"\s*/\*[0-9a-f]+\*/\s*(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)", l)
        if mm:
            ops[mm.group(1)] += 1
    return ops


if __name__ == "__main__":
    for p in sys.argv[1:]:
        ops = loop_mix(p)
        if ops is None:
            print(p, "no loop")
            continue
        tot = sum(ops.values())
        print(p, "loop instructions:", tot)
        print("  ", ", ".join(f"{k}:{v}" for k, v in ops.most_common(45)))
