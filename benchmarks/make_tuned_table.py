"""Write fp4_compile/ops/tuned_h100.py from a benchmarks/tune.py result: python benchmarks/make_tuned_table.py tune.json"""

import json
import os
import pprint
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(path, out=os.path.join(ROOT, "fp4_compile", "ops", "tuned_h100.py")):
    d = json.load(open(path))
    th = dict(d["thresholds"])
    th["dequant_shapes"] = [list(x) for x in dict.fromkeys(tuple(x) for x in th.get("dequant_shapes", []))]
    table = {"about": "H100 SXM (132 SMs), torch 2.11, triton 3.6: best configs from benchmarks/tune.py "
                      "(graph timings over rotating weights); see benchmarks/NOTES.md",
             "env": d["env"], "thresholds": th, "quant_config": d.get("quant_config", {}),
             "best": {k: {kk: v[kk] for kk in ("mode", "n", "k", "m", "cfg", "us", "bf16_us", "speedup")}
                      for k, v in d["best"].items()}}
    src = ('"""Tuned Triton GEMM configs for H100 (generated from benchmarks/tune.py output; see benchmarks/NOTES.md).'
           '\n\nRegenerate: python benchmarks/tune.py, then python benchmarks/make_tuned_table.py tune.json.\n"""\n\n'
           "# fmt: off\nTABLE = " + pprint.pformat(table, width=120, sort_dicts=True) + "\n")
    open(out, "w").write(src)
    print(f"wrote {out}: {len(table['best'])} entries")


if __name__ == "__main__":
    main(sys.argv[1])
