"""The examples run as their docstrings say they do."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from autopar.launch import free_port

STEPS = 3


def single_device_losses(example) -> list[float]:
    """The unsplit model trained as examples/train_torchrun.py trains its parts."""
    model = example.build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for ids in example.batches(STEPS):
        loss = example.next_token_loss(model(ids), ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def torchrun(root, *args: str) -> list[str]:
    """examples/train_torchrun.py on 4 ranks; rank 0's output lines."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4",
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
        str(root / "examples" / "train_torchrun.py"), *args,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout.splitlines()


def step_losses(lines: list[str]) -> list[float]:
    return [float(line.split()[-1]) for line in lines if line.startswith("step ")]


@pytest.mark.multiprocess
def test_train_torchrun_under_torchrun_matches_the_unsplit_model_and_resumes(
    request, monkeypatch, tmp_path
):
    """Steps 0-1 under dp=2 tp=2, saved; step 2 resumed from the checkpoint under tp=2 pp=2."""
    root, checkpoint = request.config.rootpath, str(tmp_path / "ckpt")
    lines = torchrun(root, "--steps", str(STEPS - 1), "--dp", "2", "--tp", "2",
                     "--checkpoint", checkpoint)  # fmt: skip
    assert lines[0].startswith("autopar plan: dp=2 tp=2 pp=1"), lines
    resumed = torchrun(root, "--steps", str(STEPS), "--tp", "2", "--pp", "2",
                       "--checkpoint", checkpoint, "--resume")  # fmt: skip
    assert resumed[0].startswith("autopar plan: dp=1 tp=2 pp=2"), resumed
    assert resumed[1] == f"resumed from {checkpoint} at step {STEPS - 1}", resumed
    losses = step_losses(lines) + step_losses(resumed)
    monkeypatch.syspath_prepend(str(root / "examples"))
    import train_torchrun

    assert losses == pytest.approx(single_device_losses(train_torchrun), rel=1e-5)
