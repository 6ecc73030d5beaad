"""`compile_model` and `compile_in_place`: `torch.compile(..., fullgraph=True)` with the one Inductor setting that
keeps a second sequence length from crashing. `compile_kwargs` is the one place that setting lives.

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


def compile_kwargs(*, dynamic: bool | None = None, mode: str | None = None) -> dict:
    """The keyword arguments of `torch.compile` that `compile_model` and `compile_in_place` pass: fullgraph=True, and
    `mode`'s Inductor options plus `INDUCTOR_OPTIONS` (torch.compile takes either a mode or options, not both, so a
    mode is passed as its option set).

    dynamic: None (default) compiles for the first shapes seen and switches to dynamic shapes on the next ones;
    False recompiles for every new shape (up to dynamo's cache limit). mode: "default", "reduce-overhead" (CUDA
    graphs) or "max-autotune", as in torch.compile."""
    options = dict(torch._inductor.list_mode_options(mode or "default"))
    options.update(INDUCTOR_OPTIONS)
    return dict(fullgraph=True, dynamic=dynamic, options=options)


def compile_model(model: nn.Module, *, dynamic: bool | None = None, mode: str | None = None) -> nn.Module:
    """`torch.compile(model, **compile_kwargs(dynamic=dynamic, mode=mode))`: a new module (an `OptimizedModule`
    whose state_dict keys carry an `_orig_mod.` prefix); `model` itself stays uncompiled."""
    return torch.compile(model, **compile_kwargs(dynamic=dynamic, mode=mode))


def compile_in_place(module: nn.Module, *, dynamic: bool | None = None, mode: str | None = None) -> nn.Module:
    """`module.compile(**compile_kwargs(dynamic=dynamic, mode=mode))`: calling `module` runs the compiled code from
    now on, while its class, its submodules and its state_dict keys stay as they were (checkpoints written with and
    without compilation are interchangeable, and wrappers applied later, DDP or FSDP, see the same module). Only
    `module.__call__` is compiled: its other methods, and direct calls of its submodules, run eagerly. Returns
    `module`."""
    module.compile(**compile_kwargs(dynamic=dynamic, mode=mode))
    return module
