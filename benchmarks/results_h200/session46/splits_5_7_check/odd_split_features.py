"""Session 46 (NOTES.md v48a): every cell where the unruled model (all split counts) picks 5 or 7 ways, its time over the
pick without them, with the stages per slice and the KB of partial tiles the last slice sums."""
import json, sys, math
from fp4_compile.ops import cuda_wgmma as W
OLD = (1, 2, 3, 4, 6, 8)
rows = []
for path in sys.argv[1:]:
    d = json.load(open(path)); cl = {int(k): v for k, v in d['env']['cluster_ctas'].items()}; sms = d['env']['sms']
    for c in d['cells']:
        m, n, k, us = c['m'], c['n'], c['k'], c['us']
        old = W.launch_config(m, n, k, sms, cl, splits=OLD)
        for lab, t in us.items():
            cfg = W.LaunchConfig.from_label(lab)
            if cfg.splits in (5, 7) and cfg == W.launch_config(m, n, k, sms, cl):
                sps = math.ceil(k / 64) / cfg.splits
                red_kb = (cfg.splits - 1) * cfg.bn * 128 * cfg.wm * 4 / 1024
                rows.append((t / us[old.label], c['shape'], c['mode'], m, lab, old.label, round(sps, 1), red_kb))
for r in sorted(rows):
    print(f"{r[0]:.3f} {r[1]:>11} {r[2]} M={r[3]:<4} {r[4]:10} (old {r[5]:10}) stages/split {r[6]:6} reduce {r[7]:.0f} KB  ratio {r[6]/r[7]*100:.1f}")
