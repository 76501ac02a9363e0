"""Split counts 3, 5, 6 on shapes whose best power-of-two split leaves SMs idle (10240x8192: 40 tiles of 256 rows,
2 splits = 80 CTAs, 4 = 160; 5120x13824: 20 tiles x 4 = 80), W4A16, every tile, in CUDA graphs over rotating
weights (wgmma_tuning.sweep_shape with cuda_wgmma.SPLITS widened). Writes each cell as it is timed."""
import json, os, time
import torch
from fp4_compile.ops import cuda_wgmma, wgmma_tuning

cuda_wgmma.SPLITS = (1, 2, 3, 4, 5, 6, 8)
out_path = os.path.join(os.environ.get("OUT", "."), "splits_3_6.json")
cells = []
t0 = time.time()
shapes = [(10240, 8192), (5120, 13824), (8192, 8192), (14336, 4096)]
for n, k in shapes:
    for cell in wgmma_tuning.sweep_shape(n, k, (16, 32, 64, 128), modes=("w4a16",), rounds=3):
        us = cell["us"]
        pow2 = {l: t for l, t in us.items() if int(l.split("s")[1].rstrip("w")) in (1, 2, 4, 8)}
        best2 = min(pow2, key=pow2.get)
        print(cell["shape"], cell["m"], "best", cell["best"], us[cell["best"]], "best pow2", best2, pow2[best2],
              "model pick", cell["pick"], us.get(cell["pick"]), "errors", cell["errors"], f"{time.time() - t0:.0f}s",
              flush=True)
        cells.append(cell)
        json.dump({"gpu": torch.cuda.get_device_name(0), "cells": cells}, open(out_path, "w"), indent=1)
