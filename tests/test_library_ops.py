"""The Triton backend as ``torch.library`` ops (``torch.ops.rwp_triton.*``, kernels/*.py): each op passes
``opcheck`` (schema, fake impl, AOT dispatch), and the public ops trace into one graph with
``fullgraph=True``, so compiled phases can hold them. Runs on CPU through the Triton interpreter."""

import math

import pytest
import torch
from torch.library import opcheck

from rwp_fast import ops
from rwp_fast.ops.weight_perturb import SegmentTable

pytest.importorskip("triton")
if not torch.cuda.is_available() and ops.dispatch.triton_cpu_refusal("cpu"):
    pytest.skip(ops.dispatch.triton_cpu_refusal("cpu"), allow_module_level=True)
for _module in ("pgd_step", "lsc_loss", "weight_perturb"):  # importing a kernel module registers its ops
    pytest.importorskip(f"rwp_fast.kernels.{_module}")
lib = torch.ops.rwp_triton
# Dynamic shapes are left out: the training shapes are static (drop_last), and a launch grid of a
# symbolic size would specialise anyway.
CHECKS = ("test_schema", "test_faketensor", "test_aot_dispatch_static")


def _logits(b=9, c=10, dtype=torch.float32):
    return (torch.randn(b, c) * 3).to(dtype), torch.randint(0, c, (b,))


def _table(numels=(7, 4101, 1)):
    return SegmentTable.from_numels(list(numels), 4096)


def _table_args(table):
    return (table.offsets, table.chunk_seg, table.chunk_start, table.seg_chunk_start, table.chunk, table.align,
            table.numel)


def _op_cases():
    x = torch.rand(5, 3, 4, 4)
    g = torch.randn_like(x)
    z, y = _logits()
    z_adv = z + torch.randn_like(z)
    _, mask, _, _, lse = lib.lsc_loss_fwd(z, y, 0.0, 2.0)
    _, _, _, _, lse_n, lse_a, kl = lib.lsc_loss_trades_fwd(z, z_adv, y, 6.0, 0.0, 2.0)
    grad_out = torch.tensor(0.7)
    t = _table()
    w, a = torch.randn(t.numel), torch.randn(t.numel)
    scale = torch.rand(t.num_segments)
    return {
        "pgd_step": (x, g, x.clone(), 2 / 255, 8 / 255, "linf", torch.empty_like(x)),
        "pgd_step_": (x.clone(), g, x, 0.1, 0.5, "l2"),
        "pgd_random_init": (x, torch.randn_like(x), 0.5, "l2", torch.rand(5), torch.empty_like(x)),
        "lsc_loss_fwd": (z, y, 0.0, 2.0),
        "lsc_loss_bwd": (grad_out, z, y, lse, mask),
        "lsc_loss_trades_fwd": (z, z_adv, y, 6.0, 0.0, 2.0),
        "lsc_loss_trades_bwd": (grad_out, z, z_adv, y, lse_n, lse_a, kl, mask, 6.0),
        "segment_sq_norm": (w, *_table_args(t)),
        "accumulate_sq_norm_": (a.clone(), w, scale, *_table_args(t)),
        "perturb_axpy_": (w.clone(), a, scale, *_table_args(t), -1),
    }


@pytest.mark.parametrize("name", list(_op_cases()))
def test_opcheck(name):
    opcheck(getattr(lib, name).default, _op_cases()[name], test_utils=CHECKS)


def test_fake_impl_checks_arguments_like_the_kernel():
    """A meta operand dispatches to the fake impl, which must refuse what the kernel refuses."""
    z, y = _logits()
    with pytest.raises(ValueError, match="target"):
        lib.lsc_loss_fwd(z.to("meta"), y[:3].to("meta"), 0.0, 1.0)
    with pytest.raises(ValueError, match="p, q"):
        lib.lsc_loss_fwd(z.to("meta"), y.to("meta"), 2.0, 1.0)


def test_public_ops_trace_into_one_graph():
    """A PGD step, the masked loss and a weight update, all on the triton backend, as one fullgraph:
    no graph break, and the compiled results equal the eager ones."""
    torch.manual_seed(0)
    t = _table((33, 70))
    w0, a = torch.randn(t.numel), torch.randn(t.numel)
    x = torch.rand(4, 3, 5, 5)
    g = torch.randn_like(x)
    z, y = _logits(4, 10)

    def phase(x_adv, w, z):
        ops.pgd_step_(x_adv, g, x, 2 / 255, 8 / 255, "linf", backend="triton")
        mean, loss, mask, count = ops.lsc_loss(z, y, 0.0, 2.2, backend="triton")
        sq = ops.segment_sq_norm(w, t, backend="triton")
        ops.perturb_axpy_(w, a, sq.sqrt(), t, 1, backend="triton")
        return mean * 2, count, sq

    torch._dynamo.reset()
    eager_x, eager_w = x.clone(), w0.clone()
    compiled_x, compiled_w = x.clone(), w0.clone()
    expected = phase(eager_x, eager_w, z)
    got = torch.compile(phase, fullgraph=True, backend="aot_eager")(compiled_x, compiled_w, z)
    assert torch.equal(compiled_x, eager_x) and torch.equal(compiled_w, eager_w)
    for e, c in zip(expected, got):
        assert torch.equal(e, c)
    assert not math.isnan(float(expected[0]))


def test_lsc_loss_backward_traces_into_one_graph():
    """The autograd.Function of lsc_loss around the two library ops: the forward compiles as one graph
    and AOT autograd's backward calls the backward op; both equal eager."""
    z, y = _logits(6, 10)

    def masked_mean(z):
        return ops.lsc_loss(z, y, 0.0, 2.2, backend="triton")[0] * 3

    grads = []
    for fn in (masked_mean, torch.compile(masked_mean, fullgraph=True, backend="aot_eager")):
        torch._dynamo.reset()
        leaf = z.detach().requires_grad_(True)
        out = fn(leaf)
        out.backward()
        grads.append((out.detach(), leaf.grad))
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)
    assert grads[0][1].abs().sum() > 0  # some rows inside the mask


COLD_PROCESS = """
import torch
from rwp_fast import ops

x = torch.rand(4, 3, 5, 5)
g, z, y = torch.randn_like(x), torch.randn(6, 10) * 3, torch.randint(0, 10, (6,))


def user_step(x, g, z):  # a researcher's own compiled loop, composing the public ops
    x_next = ops.pgd_step(x, g, x, 2 / 255, 8 / 255, "linf", backend=BACKEND)
    return x_next, ops.lsc_loss(z, y, 0.0, 2.2, backend=BACKEND)[0]


compiled = torch.compile(user_step, fullgraph=True, backend="aot_eager")
got = compiled(x, g, z)  # the first call of any op in this process: the dispatch has imported nothing yet
BACKEND = "torch"
want = user_step(x, g, z)
torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
print("ok")
"""


@pytest.mark.parametrize("backend", [None, "triton"], ids=["default", "triton"])
def test_public_ops_compile_with_fullgraph_in_a_cold_process(backend):
    """A user's fullgraph-compiled function that calls the public ops first thing in a fresh process: the
    dispatch's backend choice (imports, the environment) must not be traced (Dynamo refuses importlib)."""
    import subprocess
    import sys
    code = f"BACKEND = {backend!r}\n" + COLD_PROCESS
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
