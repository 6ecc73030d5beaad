"""Random streams that side work (sampling, evaluation nets, data-loader seeds) must not disturb: a resumed run is
only exact if everything outside the training step draws from a forked generator."""

from __future__ import annotations

import contextlib

import torch


def fork_rng(device: torch.device | str) -> contextlib.AbstractContextManager:
    """`torch.random.fork_rng` over the CPU generator and, for a CUDA device, that device's generator only (forking
    every visible GPU would cost a synchronisation per device and touch devices the process never uses)."""
    device = torch.device(device)
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
