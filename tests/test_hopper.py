"""cosattn.hopper on the CPU: both Gluon passes compile for sm_90 (a fake driver stands in for the GPU: Triton's own
code generation and ptxas, no launch), with warpgroup MMAs and no spills at the configured tiles; the eligibility
rule; and the dispatch in ops.attention_backward (off by default, taken only when switched on and eligible).
Their numbers are checked on a GPU: tests/test_hopper_gpu.py."""

import json
import os
import subprocess
import sys

import pytest
import torch
import triton

import cosattn.ops as ops

hopper = pytest.importorskip("cosattn.hopper")


# Compiled in a child process with TRITON_INTERPRET=0: under the interpreter Triton's own library functions
# (the reductions' combine functions) become interpreted ones, which Gluon's code generator refuses.
_COMPILE = r"""
import json, os, re, subprocess, sys, tempfile
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from cosattn import hopper

class Sm90:  # what Triton's JIT asks of the active driver before it compiles: an sm_90 target
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)
    def get_current_device(self):
        return 0
    def get_current_stream(self, device=None):
        return 0

def resources(cubin):
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    return {key: int(val) for key, val in re.findall(r"(REG|STACK|LOCAL):(\d+)", out)}

driver.set_active(Sm90())
warm = lambda fn, *a, **kw: fn.warmup(*a, grid=(1,), **kw)
d, causal = int(sys.argv[1]), sys.argv[2] == "1"
b, h, hk, m, n = 2, 4, 2, 256, 256
q = torch.zeros(b, h, m, d, dtype=torch.bfloat16)
k = torch.zeros(b, hk, n, d, dtype=torch.bfloat16)
lse = torch.zeros(b, h, m)
bm, bn, warps, nbuf = hopper.DKDV_CONFIG[d]
dkdv = hopper.dkdv_launch(q, k, k, q, lse, lse, k, k, causal=causal, dk_scale=0.7, block_m=bm, block_n=bn,
                          warps=warps, num_buf=nbuf, launch=warm)
bm, bn, warps, nbuf = hopper.DQ_CONFIG[d]
dq = hopper.dq_launch(q, k, k, q, lse, lse, q, causal=causal, qk_scale=14.4, scale=10.0, block_m=bm, block_n=bn,
                      warps=warps, num_buf=nbuf, launch=warm)
print(json.dumps({name: dict(wgmma=c.asm["ptx"].count("wgmma.mma_async"), tma="cp.async.bulk.tensor" in c.asm["ptx"],
                             **resources(c.asm["cubin"])) for name, c in (("dkdv", dkdv), ("dq", dq))}))
"""


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [64, 128])
def test_both_passes_compile_for_sm90_without_spills(d, causal):
    """Triton's code generation and ptxas for sm_90, a fake driver standing in for the GPU (nothing is launched)."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    run = subprocess.run([sys.executable, "-c", _COMPILE, str(d), str(int(causal))], capture_output=True, text=True,
                         env=env, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    for kernel, products in (("dkdv", 4), ("dq", 3)):
        res = got[kernel]
        # every product a warpgroup MMA (one instruction per 16-wide k step), the tiles by TMA, no local memory;
        # no stack frame either, but for the d=128 dk/dv tiles (measured fastest under Triton 3.6, where they have
        # none) which take 48 bytes under later releases
        assert res["wgmma"] >= products and res["tma"], res
        stack = 64 if (kernel, d) == ("dkdv", 128) and not triton.__version__.startswith("3.6") else 0
        assert res["LOCAL"] == 0 and res["STACK"] <= stack, res


def _plain(d=64, m=256, n=256, dtype=torch.bfloat16, **over):
    q = torch.zeros(1, 2, m, d, dtype=dtype)
    k = torch.zeros(1, 2, n, d, dtype=dtype)
    kw = dict(mask=None, bias=None, slopes=None, scales=None, q_seg=None, use_max=False, l2norm=True, groups=1,
              k_inline=False, bias_grad=False, scale_grad=False)  # fmt: skip
    kw.update(over)
    return (q, k, k, q), kw


def test_eligibility(monkeypatch):
    args, kw = _plain()
    assert not hopper.eligible(*args, **kw)  # a CPU tensor: no sm_90 device
    monkeypatch.setattr(hopper, "_capability_ok", lambda device: True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert hopper.eligible(*args, **kw)
    t = torch.zeros(1)
    for option in (dict(mask=t), dict(bias=t), dict(slopes=t), dict(scales=t), dict(q_seg=t), dict(use_max=True),
                   dict(l2norm=False), dict(groups=2), dict(k_inline=True), dict(bias_grad=True),
                   dict(scale_grad=True)):  # fmt: skip
        assert not hopper.eligible(*args, **{**kw, **option}), option
    for shape in (dict(d=32), dict(d=96), dict(m=250), dict(n=200), dict(dtype=torch.float32)):
        args2, kw2 = _plain(**shape)
        assert not hopper.eligible(*args2, **kw2), shape
    q, k, v, do = args
    assert not hopper.eligible(q, k, v, do.transpose(-1, -2).contiguous().transpose(-1, -2), **kw)  # d not unit
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not hopper.eligible(*args, **kw)


@pytest.mark.parametrize("switched_on", [False, True])
def test_dispatch_only_when_switched_on_and_eligible(monkeypatch, device, switched_on):
    """The Hopper path replaces both Triton passes when switched on and eligible (its outputs are returned); off,
    or not eligible, the Triton passes run."""
    calls = []

    def fake_backward(q_s, q, k, k_hat, v, do, lse, delta, dq, dk, dv, *, causal, qk_scale, scale):
        calls.append(causal)
        for t in (dq, dk, dv):
            t.fill_(7.0)

    monkeypatch.setattr(hopper, "backward", fake_backward)
    monkeypatch.setattr(hopper, "eligible", lambda *a, **kw: True)
    monkeypatch.setattr(hopper, "HOPPER_BWD", switched_on)
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(1, 2, 32, 16, generator=g).to(device) for _ in range(4))
    o, lse = ops.attention_forward(q, k, v, None, None, None, None, None, None, True, 10.0, True, 1)
    dq, dk, dv, db, ds = ops.attention_backward(do, q, k, v, o, lse, None, None, None, None, None, None, True, 10.0,
                                                True, 1, False, False)  # fmt: skip
    assert calls == ([True] if switched_on else [])
    assert bool((dq == 7.0).all()) == switched_on and db is None and ds is None


def test_off_by_default():
    assert hopper.HOPPER_BWD is (os.environ.get("COSATTN_HOPPER_BWD", "0") == "1")
