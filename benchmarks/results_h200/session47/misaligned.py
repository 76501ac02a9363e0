"""Which input of user_gpu_review's strided_and_shaped_inputs faults (misaligned address)? Each variant runs in
a child process with CUDA_LAUNCH_BLOCKING=1, so the first failing launch names its case."""
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = ["contiguous", "rows_16B_apart", "rows_128B_apart", "rows_8B_apart", "base_8B_misaligned", "transposed",
            "expand_rows", "expand_3d_beams", "lead_3d", "permuted_4d", "fp16_rows_16B_apart", "fp16_expand_rows"]

CHILD = r'''
import sys, torch
sys.path.insert(0, {here!r})
sys.argv = ["x"]
import user_gpu_review as R
variant = {variant!r}
for backend in R.BACKENDS:
    for n, k in ((1000, 1040), (4096, 4096)):
        layer = R.make_layer(n, k, backend, seed=11 + n)
        for m in (1, 12, 64, 300):
            seed = 100 * m + n
            make = {{
                "contiguous": lambda: R.rand_x((m, k), seed=seed),
                "rows_16B_apart": lambda: R.rand_x((m, k + 8), seed=seed)[:, :k],
                "rows_128B_apart": lambda: R.rand_x((m, k + 64), seed=seed)[:, :k],
                "rows_8B_apart": lambda: R.rand_x((m, k + 4), seed=seed)[:, :k],
                "base_8B_misaligned": lambda: R.rand_x((m, k + 8), seed=seed)[:, 4:4 + k],
                "transposed": lambda: R.rand_x((k, m), seed=seed).t(),
                "expand_rows": lambda: R.rand_x((1, k), seed=seed).expand(m, k),
                "expand_3d_beams": lambda: R.rand_x((1, 1, k), seed=seed).expand(m, 1, k),
                "lead_3d": lambda: R.rand_x((2, m, k), seed=seed),
                "permuted_4d": lambda: R.rand_x((m, 2, 3, k), seed=seed).permute(1, 0, 2, 3),
                "fp16_rows_16B_apart": lambda: R.rand_x((m, k + 8), torch.float16, seed=seed)[:, :k],
                "fp16_expand_rows": lambda: R.rand_x((1, k), torch.float16, seed=seed).expand(m, k),
            }}[variant]
            x = make()
            label = f"{{backend}} {{n}}x{{k}} M={{m}} {{variant}} stride={{tuple(x.stride())}} [{{R.eager_path_label(layer, m)}}]"
            try:
                with torch.no_grad():
                    out = layer(x)
                    out2 = layer(x)
                torch.cuda.synchronize()
                ref, size = R.layer_reference(layer, x.contiguous())
                err = float(((out.reshape(ref.shape).double() - ref).norm() / ref.norm()))
                same = torch.equal(out, out2)
                print(("ok  " if err < 1e-2 and same else "BAD ") + label + f" rel={{err:.2e}} repeat_equal={{same}}", flush=True)
            except Exception as e:
                print("FAULT " + label + ": " + str(e).splitlines()[0][:200], flush=True)
                sys.exit(3)
'''

for v in VARIANTS:
    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")
    r = subprocess.run([sys.executable, "-c", CHILD.format(here=os.path.join(HERE, "user_gpu"), variant=v)],
                       capture_output=True, text=True, env=env, timeout=150)
    lines = [line for line in r.stdout.splitlines() if not line.startswith("ok  ")]
    ok = sum(line.startswith("ok  ") for line in r.stdout.splitlines())
    print(f"== {v}: rc={r.returncode}, {ok} ok", flush=True)
    for line in lines[-6:]:
        print("   " + line)
    if r.returncode not in (0, 3):
        print("   stderr: " + r.stderr[-1500:])
