"""Session 46 (NOTES.md v48a): per sweep cell, the cost model's pick without 5- and 7-way splits (old), with them under
the tree's rule (new), and the best variant timed. Usage: python compare_picks.py sweep.json [...]"""
import json, sys, statistics
from fp4_compile.ops import cuda_wgmma as W
OLD = (1, 2, 3, 4, 6, 8)
for path in sys.argv[1:]:
    d = json.load(open(path))
    cl = {int(k): v for k, v in d['env']['cluster_ctas'].items()}
    sms = d['env']['sms']
    r_new_old, r_new_best, r_old_best = [], [], []
    for c in d['cells']:
        m, n, k, us = c['m'], c['n'], c['k'], c['us']
        old = W.launch_config(m, n, k, sms, cl, splits=OLD).label
        new = W.launch_config(m, n, k, sms, cl).label
        best = min(us.values()); best_old = min(v for l, v in us.items() if W.LaunchConfig.from_label(l).splits in OLD)
        r_new_old.append(us[new] / us[old]); r_new_best.append(us[new] / best); r_old_best.append(us[old] / best)
        print(f"{c['shape']:>11} {c['mode']} M={m:<4} old {old:10} {us[old]:7.2f}  new {new:10} {us[new]:7.2f}  best {c['best']:10} {best:7.2f}  best-old-splits {best_old:7.2f}")
    g = statistics.geometric_mean
    print(path, f"new/old {g(r_new_old):.3f} (max {max(r_new_old):.3f}, min {min(r_new_old):.3f}); new/best {g(r_new_best):.3f}; old/best {g(r_old_best):.3f}")
