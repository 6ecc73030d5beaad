"""The direct-launch cache (`cosattn.launch.Launcher`) against a stand-in for a JIT function: a launch reuses a
compiled kernel only when everything Triton specialises on is the same, and passes the arguments in signature
order. On the GPU, tests/test_attention_gpu.py compares whole forward/backward results with and without it."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from cosattn import launch


class _Compiled:
    def __init__(self, calls, with_handles=True):
        self.calls = calls
        if with_handles:
            self.function = object()
            self.packed_metadata = object()

    def __getitem__(self, grid):
        return lambda *args: self.calls.append(("direct", grid, args))


class _Jit:
    """Signature (X, Y, n, scale, A: constexpr, B: constexpr)."""

    def __init__(self, with_handles=True):
        names = [("X", False), ("Y", False), ("n", False), ("scale", False), ("A", True), ("B", True)]
        self.params = [SimpleNamespace(name=n, is_constexpr=c) for n, c in names]
        self.calls = []
        self.compiled = _Compiled(self.calls, with_handles)

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.calls.append(("jit", grid, args, kwargs))
            return self.compiled

        return run


@pytest.fixture
def gpu_like(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(launch, "FAST_LAUNCH", True)


def _kinds(fn):
    return [c[0] for c in fn.calls]


def test_reuses_compiled_kernel_with_args_in_signature_order(gpu_like):
    fn = _Jit()
    lk = launch.Launcher(fn)
    x, y = torch.zeros(8), torch.zeros(8)
    lk((3, 2), (x, y, 5, 0.5), {"B": 7, "A": 1}, num_warps=4, num_stages=2)
    lk((3, 2), (x, y, 5, 0.5), {"B": 7, "A": 1}, num_warps=4, num_stages=2)
    assert _kinds(fn) == ["jit", "direct"]
    assert fn.calls[0][3] == {"B": 7, "A": 1, "num_warps": 4, "num_stages": 2}
    _, grid, args = fn.calls[1]
    assert grid == (3, 2, 1)
    assert args[:4] == (x, y, 5, 0.5) and args[4:] == (1, 7)  # constexprs A, B in signature order


def test_cache_is_bounded(gpu_like, monkeypatch):
    monkeypatch.setattr(launch, "MAX_ENTRIES", 4)
    fn = _Jit()
    lk = launch.Launcher(fn)
    x = torch.zeros(4)
    for n in range(10):
        lk((1, 1), (x, x, n, 0.5), {"A": 1, "B": 2}, num_warps=4, num_stages=2)
    assert len(lk.cache) <= 4 and _kinds(fn) == ["jit"] * 10
    lk((1, 1), (x, x, 9, 0.5), {"A": 1, "B": 2}, num_warps=4, num_stages=2)
    assert _kinds(fn)[-1] == "direct"


@pytest.mark.parametrize(
    "change",
    ["int", "dtype", "alignment", "constexpr", "warps", "stages", "descriptor block"],
)
def test_any_specialisation_change_goes_through_the_jit(gpu_like, change):
    fn = _Jit()
    lk = launch.Launcher(fn)
    base = torch.zeros(64)
    x, y = base[:32], torch.zeros(8)
    call = dict(args=(x, y, 5, 0.5), constexprs={"A": 1, "B": 7}, num_warps=4, num_stages=2)
    lk((3, 2), call["args"], call["constexprs"], num_warps=4, num_stages=2)
    if change == "int":
        call["args"] = (x, y, 16, 0.5)
    elif change == "dtype":
        call["args"] = (x.double(), y, 5, 0.5)
    elif change == "alignment":
        call["args"] = (base[1:33], y, 5, 0.5)  # 4 bytes past a 16-byte boundary
    elif change == "constexpr":
        call["constexprs"] = {"A": 2, "B": 7}
    elif change == "warps":
        call["num_warps"] = 8
    elif change == "stages":
        call["num_stages"] = 3
    else:
        if launch.TensorDescriptor is None:
            pytest.skip("this Triton has no tensor descriptors")
        t = torch.zeros(4, 16)
        d1 = launch.TensorDescriptor(t, [4, 16], [16, 1], [2, 16])
        d2 = launch.TensorDescriptor(t, [4, 16], [16, 1], [4, 16])
        lk((3, 2), (d1, y, 5, 0.5), call["constexprs"], num_warps=4, num_stages=2)
        lk((3, 2), (d1, y, 5, 0.5), call["constexprs"], num_warps=4, num_stages=2)
        call["args"] = (d2, y, 5, 0.5)
    lk((3, 2), call["args"], call["constexprs"], num_warps=call["num_warps"], num_stages=call["num_stages"])
    assert _kinds(fn)[-1] == "jit"
    # and the same call again is a cache hit
    lk((3, 2), call["args"], call["constexprs"], num_warps=call["num_warps"], num_stages=call["num_stages"])
    assert _kinds(fn)[-1] == "direct"


def test_num_stages_left_to_triton_when_not_given(gpu_like):
    fn = _Jit()
    launch.Launcher(fn)((1, 1), (torch.zeros(4), torch.zeros(4), 5, 0.5), {"A": 1, "B": 2}, num_warps=4)
    assert fn.calls[0][3] == {"A": 1, "B": 2, "num_warps": 4}


@pytest.mark.parametrize("why", ["flag off", "interpreter"])
def test_jit_path_when_disabled(gpu_like, monkeypatch, why):
    if why == "flag off":
        monkeypatch.setattr(launch, "FAST_LAUNCH", False)
    fn = _Jit()
    if why == "interpreter":
        del fn.params  # what the interpreter's functions look like
    lk = launch.Launcher(fn)
    for _ in range(3):
        lk((1, 1), (torch.zeros(4), torch.zeros(4), 5, 0.5), {"A": 1, "B": 2}, num_warps=4, num_stages=2)
    assert _kinds(fn) == ["jit"] * 3


def test_kernel_without_direct_launch_says_so_once(gpu_like, monkeypatch, caplog):
    monkeypatch.setattr(launch, "_unsupported_said", False)
    fn = _Jit(with_handles=False)
    lk = launch.Launcher(fn)
    with caplog.at_level(logging.WARNING, logger="cosattn.launch"):
        for _ in range(3):
            lk((1, 1), (torch.zeros(4), torch.zeros(4), 5, 0.5), {"A": 1, "B": 2}, num_warps=4, num_stages=2)
        launch.Launcher(_Jit(with_handles=False))(
            (1, 1), (torch.zeros(4), torch.zeros(4), 5, 0.5), {"A": 1, "B": 2}, num_warps=4, num_stages=2
        )
    assert _kinds(fn) == ["jit"] * 3
    assert sum("direct kernel launches unavailable" in r.message for r in caplog.records) == 1


def test_scalar_after_pointer_layout_required(gpu_like):
    # a tensor among the scalars: not cached (every launch through the JIT), never a wrong reuse
    fn = _Jit()
    lk = launch.Launcher(fn)
    x = torch.zeros(4)
    for _ in range(2):
        lk((1, 1), (x, 3, x, 0.5), {"A": 1, "B": 2}, num_warps=4, num_stages=2)
    assert _kinds(fn) == ["jit", "jit"]


def test_cdiv_and_next_power_of_2():
    for a in range(1, 300):
        for b in (1, 2, 3, 16, 64):
            assert launch.cdiv(a, b) == -(-a // b) == (a + b - 1) // b
    assert [launch.next_power_of_2(n) for n in (1, 2, 3, 16, 17, 100, 128, 129)] == [1, 2, 4, 16, 32, 128, 128, 256]


def test_length_change_within_a_specialisation_class_launches_directly(gpu_like):
    # decoding: the key length grows every step; Triton recompiles only when the value 1, the residue mod 16 or
    # the width changes, so only those changes may go through the JIT
    fn = _Jit()
    lk = launch.Launcher(fn)
    x = torch.zeros(4)
    expect = []
    for n, path in [(5, "jit"), (21, "direct"), (37, "direct"), (16, "jit"), (32, "direct"), (1, "jit"), (17, "jit")]:
        lk((1, 1), (x, x, n, 0.5), {"A": 1, "B": 2}, num_warps=4, num_stages=2)
        expect.append(path)
        assert _kinds(fn) == expect, n
        assert fn.calls[-1][2][2] == n  # the launch got this call's own value
    lk((1, 1), (x, x, 2**31 + 5, 0.5), {"A": 1, "B": 2}, num_warps=4, num_stages=2)  # 64-bit
    assert _kinds(fn)[-1] == "jit"


def test_descriptor_shape_change_within_class(gpu_like):
    if launch.TensorDescriptor is None:
        pytest.skip("this Triton has no tensor descriptors")
    fn = _Jit()
    lk = launch.Launcher(fn)
    y = torch.zeros(4)
    t = torch.zeros(40, 16)
    for rows, path in [(4, "jit"), (4, "direct"), (20, "direct"), (8, "jit")]:
        desc = launch.TensorDescriptor(t[:rows], [rows, 16], [16, 1], [2, 16])
        lk((1, 1), (desc, y, 5, 0.5), {"A": 1, "B": 2}, num_warps=4, num_stages=2)
        assert _kinds(fn)[-1] == path, rows
