"""Two CPU processes under ``accelerate launch`` (gloo): DDP training runs, each rank
sees different pairs, and both ranks end with identical weights."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from _train_helpers import tiny_data, tiny_model

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import sys, torch
    from ddspo_fast.train import Trainer, TrainConfig
    model, data, out = sys.argv[1:4]
    cfg = TrainConfig(model=model, data=data, output_dir=out, mixed_precision="no",
                      lora_rank=4, learning_rate=1e-3, batch_size=1, grad_accum=2,
                      max_steps=2, checkpoint_every=2, log_every=1, progress=False,
                      tensorboard=False, save_final=True, device="cpu")
    tr = Trainer(cfg)
    ids = []
    step = tr.train_step
    def spy(batch):
        ids.extend(batch["id"])
        return step(batch)
    tr.train_step = spy
    summary = tr.train()
    rank = tr.accelerator.process_index
    torch.save({"weights": {n: p.detach() for n, p in tr.policy.named_parameters()
                            if p.requires_grad},
                "ids": ids, "world": tr.accelerator.num_processes, "steps": summary["steps"]},
               f"{out}/rank{rank}.pt")
""")


def test_two_process_ddp_ranks_agree(tmp_path):
    script = tmp_path / "train2.py"
    script.write_text(SCRIPT)
    model, data = tiny_model("sd15"), tiny_data("sd15", 8)
    out = tmp_path / "out"
    # --multi_gpu makes accelerate start one process per rank (torchrun); without a GPU,
    # and with device="cpu", they form a gloo process group on the CPU.
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", "29517", str(script), model, data, str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    a, b = (torch.load(out / f"rank{i}.pt") for i in range(2))
    assert a["world"] == b["world"] == 2 and a["steps"] == b["steps"] == 2
    assert len(a["ids"]) == len(b["ids"]) == 4 and not set(a["ids"]) & set(b["ids"])
    assert a["weights"].keys() == b["weights"].keys()
    # Bit-equal by construction: both ranks apply the same all-reduced gradient with the
    # same optimizer ops on the same CPU.
    for n in a["weights"]:
        torch.testing.assert_close(a["weights"][n], b["weights"][n], rtol=0, atol=0)
    # the weights moved, and the main process saved a checkpoint and the LoRA weights
    assert any(v.abs().sum() > 0 for n, v in a["weights"].items() if "lora_B" in n)
    assert (out / "checkpoints" / "checkpoint-2" / "rng-rank1.safetensors").is_file()
    assert (out / "pytorch_lora_weights.safetensors").is_file()
