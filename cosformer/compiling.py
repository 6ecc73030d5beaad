"""`compile_model`: `torch.compile(model, fullgraph=True)` with the one Inductor setting that keeps a second sequence
length from crashing.

With dynamic shapes (what dynamo switches to when a compiled model meets a second input size), Inductor's
memory-coalescing analysis for Triton tiling (`triton.coalesce_tiling_analysis`, on by default) fails an assertion
in `tiling_utils.get_pw_red_splits` on any kernel whose loop sizes include an expression such as `s - 1`: the
product of its pointwise sizes `s0*(s1 - 1)` is not recognised as equal to the expanded numel `s0*s1 - s0`. A
language model's loss produces exactly that: `x[:, :-1]` feeds the model, `x[:, 1:]` is the target. The minimal
trigger, found on torch 2.11, is an embedding of `x[:, :-1]` plus a position embedding, a linear layer and
`cross_entropy(..., x[:, 1:])`, run at two sequence lengths (docs/benchmarks/NOTES.md has the repro). The
analysis only picks tile shapes, so turning it off changes no result; the speed it costs is measured in NOTES.md.
"""

from __future__ import annotations

import torch
from torch import nn

# Inductor options applied by compile_model (see the module docstring for why)
INDUCTOR_OPTIONS = {"triton.coalesce_tiling_analysis": False}


def compile_model(model: nn.Module, *, dynamic: bool | None = None, mode: str | None = None) -> nn.Module:
    """`torch.compile(model, fullgraph=True, dynamic=dynamic, mode=mode)` plus `INDUCTOR_OPTIONS`.

    dynamic: None (default) compiles for the first shapes seen and switches to dynamic shapes on the next ones;
    False recompiles for every new shape (up to dynamo's cache limit). mode: "default", "reduce-overhead" (CUDA
    graphs) or "max-autotune", as in torch.compile (a mode is passed as its option set, since torch.compile takes
    either a mode or options, not both)."""
    options = dict(torch._inductor.list_mode_options(mode or "default"))
    options.update(INDUCTOR_OPTIONS)
    return torch.compile(model, fullgraph=True, dynamic=dynamic, options=options)
