"""Check encode's VAE memory estimate (ddspo_fast.data.encode.vae_memory_estimate) against
the measured peak: an SD1.x-sized VAE (random weights, the real architecture) encodes
images at several resolutions on the CPU, one process per size, and the growth of the
process's peak RSS is compared with the estimate (with and without its margin).

    python benchmarks/vae_memory.py [--sizes 256,512] [--out benchmarks/results/vae-memory-cpu.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys

_CHILD = r"""
import gc, json, resource, sys, types, torch
torch.set_num_threads(1)
from diffusers import AutoencoderKL
from ddspo_fast.data.encode import ESTIMATE_MARGIN, vae_memory_estimate
res, n = int(sys.argv[1]), int(sys.argv[2])
vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512),
                    down_block_types=("DownEncoderBlock2D",) * 4,
                    up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2,
                    latent_channels=4, sample_size=512).eval()
adapter = types.SimpleNamespace(pipe=types.SimpleNamespace(vae=vae), vae_scale_factor=8)
x = torch.randn(n, 3, res, res)
gc.collect()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with torch.no_grad():
    vae.encode(x).latent_dist.sample()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
est = vae_memory_estimate(adapter, (res, res), n, torch.float32)
print(json.dumps({"resolution": res, "images": n, "measured_mib": round((peak - base) / 1024, 1),
                  "estimate_mib": round(est / 2**20, 1),
                  "estimate_without_margin_mib": round(est / ESTIMATE_MARGIN / 2**20, 1)}))
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="256,512")
    p.add_argument("--images", type=int, default=1)
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "vae-memory-cpu.json"))
    args = p.parse_args(argv)
    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        r = subprocess.run([sys.executable, "-c", _CHILD, str(size), str(args.images)],
                           capture_output=True, text=True, check=True,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
        row = json.loads(r.stdout.strip().splitlines()[-1])
        row["estimate_over_measured"] = round(row["estimate_mib"] / row["measured_mib"], 2)
        rows.append(row)
        print(row)
    from ddspo_fast._version import __version__
    from ddspo_fast.fsio import atomic_write_json
    import torch

    atomic_write_json(args.out, {
        "what": "encode's VAE memory estimate vs the measured peak RSS growth of one VAE "
                "encode (SD1.x VAE architecture, random weights, fp32, CPU, 1 thread)",
        "device": f"cpu: {platform.processor() or platform.machine()}",
        "command": "python benchmarks/vae_memory.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "torch": torch.__version__, "ddspo_fast": __version__, "rows": rows})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
