"""The Triton ops as torch.compile and AOTInductor see them, traced here without a GPU.

Where Triton compiles (not its interpreter), ``lisa_kernels::triton_direct`` and ``::triton_direct_backward`` are
``torch.library.triton_op``s whose launches go through ``wrap_triton``: torch.export keeps each op as one node, and
the functional trace that Inductor and AOTInductor make of it (``aot_export_module``) holds every kernel launch
as a ``triton_kernel_wrapper_functional`` node, which Inductor compiles and AOTInductor packages. This test makes
that trace on fake CUDA tensors for a simulated H100 (``lisa_kernels.testing.traced_gpu``: Triton compiles for
sm_90, nothing runs), with a dynamic batch, in a helper process without Triton's interpreter, and checks:

* the exported graph keeps the op, and its batch stays symbolic;
* the functional trace holds the kernels of the forward and backward launches, in order (the list in the
  launcher's docstring, lisa_kernels/triton_direct.py), and no op of the package is left in it;
* each grid that depends on the batch is symbolic, and torch's analysis of the kernels finds that they do not
  write q, k, v or the tables (only their own buffers are cloned);
* each candidate of each autotuned kernel was compiled for sm_90 by the spill pruning while tracing;
* each kernel's source as Inductor emits it (the transitive closure of its calls) compiles for sm_90 with the
  traced arguments, without spills;
* torch.compile's AOTAutograd cache keys a graph with the op by every kernel's source.

On a GPU, benchmarks/gpu_session.sh compiles the same model with AOTInductor and runs it (``check-aoti``).
"""
from __future__ import annotations

import os

import pytest
import torch

from lisa_kernels import triton_direct as TD

pytestmark = [pytest.mark.skipif(not TD.HAS_TRITON, reason="triton is not installed"),
              pytest.mark.skipif(torch.cuda.is_available(), reason="a real GPU runs the AOTInductor check "
                                 "(benchmarks/gpu_session.sh check-aoti); this one simulates a GPU")]


@pytest.fixture(scope="module", autouse=True)
def _stop_the_compile_helper():
    """The helper process ends with this module, so that coverage.py has its data before the report."""
    yield
    from lisa_kernels.testing import stop_helper
    stop_helper()


def _kernel_name(kernel) -> str:
    while hasattr(kernel, "fn"):          # an Autotuner -> its JITFunction -> the Python function
        kernel = kernel.fn
    return kernel.__name__


def _trace(cfg: dict) -> dict:
    """In the helper process (Triton compiles): export a LiSA forward and backward on fake CUDA tensors with a
    dynamic batch, trace it as Inductor does, and report what the traces hold."""
    from torch._functorch.aot_autograd import aot_export_module
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table, triton_kernel_wrapper_functional
    from torch._subclasses.fake_tensor import FakeTensorMode

    import lisa_kernels
    from lisa_kernels import ops, testing

    assert ops._COMPILED, "the helper process imported Triton's interpreter"
    dtype = getattr(torch, cfg["dtype"])
    grid, E, M, boundary = tuple(cfg["grid"]), cfg["E"], cfg["M"], cfg["boundary"]
    options = dict(grid=grid, num_extra=E, causal=cfg["causal"], boundary=boundary, backend="triton")
    table = tuple(s if boundary == "circular" else 2 * s - 1 for s in grid)
    B, H, N = 3, 2, E + torch.Size(grid).numel()

    class Train(torch.nn.Module):
        """The forward op, and its backward op on a given output gradient (autograd's engine needs a GPU)."""

        def forward(self, q, k, v, rpe, rpe_extra, grad_out):
            out = lisa_kernels.lisa_attention(q, k, v, rpe, rpe_extra=rpe_extra, **options)
            saved = torch.ops.lisa_kernels.triton_direct.default(
                q, k, v, rpe, rpe_extra, list(grid), E, "elu1", True, 1e-6, cfg["causal"], boundary, 1.0)
            grads = torch.ops.lisa_kernels.triton_direct_backward.default(
                q, k, v, rpe, rpe_extra, *saved, grad_out, list(grid), E, "elu1", True, 1e-6, cfg["causal"],
                boundary, 1.0)
            return (out,) + tuple(grads)

    report = {}
    with testing.traced_gpu("h100") as sim:
        with FakeTensorMode():
            mk = lambda *shape: torch.randn(*shape, device="cuda", dtype=dtype)  # noqa: E731
            q, k, v, go = mk(B, H, N, cfg["Dk"]), mk(B, H, N, cfg["Dk"]), mk(B, H, N, cfg["Dv"]), mk(B, H, N, cfg["Dv"])
            args = (q, k, v, mk(H, M, *table), mk(H, M, 3) if cfg["rpe_extra"] else None, go)
        batch = torch.export.Dim("batch", min=1, max=1024)
        dynamic = ({0: batch}, {0: batch}, {0: batch}, None, None, {0: batch})
        ep = torch.export.export(Train(), args, dynamic_shapes=dynamic)
        report["exported_ops"] = sorted({str(n.target) for n in ep.graph.nodes if "lisa_kernels" in str(n.target)})
        inputs = [n.meta["val"] for n in ep.graph.nodes if n.op == "placeholder"]
        gm, _ = aot_export_module(ep.graph_module, inputs, trace_joint=False)
        launches = []
        for node in gm.graph.nodes:
            if node.target is triton_kernel_wrapper_functional:
                kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
                launches.append(dict(kernel=_kernel_name(kernel),
                                     symbolic_grid=any(isinstance(x, torch.fx.Node)
                                                       for g in node.kwargs["grid"] for x in g),
                                     cloned=sorted(node.kwargs["tensors_to_clone"])))
        report["launches"] = launches
        # each tuned kernel's candidates (the launcher's list) and the compiles the pruning made while tracing
        report["candidates"] = {fn.base_fn.__name__: len(fn.configs) for fn in TD._TUNED.values()}
        report["compiles"] = {name: c["compiles"] for name, c in sim.stats.items()}
        report["inductor_source"] = _compile_inductor_sources(gm)
        report["left_ops"] = sorted({str(n.target) for n in gm.graph.nodes if "lisa_kernels" in str(n.target)})
        outs = [o.meta["val"] for o in [n for n in gm.graph.nodes if n.op == "output"][0].args[0]]
        report["out_shapes"] = [[str(s) for s in o.shape] for o in outs]
        report["batch_symbolic"] = isinstance(outs[0].shape[0], torch.SymInt)
    # what keys torch.compile's AOTAutograd cache for a graph that calls the op: every kernel's source
    from torch._library.triton import get_triton_kernels_for_op
    report["cache_kernels"] = sorted(_kernel_name(k) for k in get_triton_kernels_for_op("lisa_kernels::triton_direct"))
    return report


def _compile_inductor_sources(gm) -> dict:
    """Each kernel of the trace as Inductor emits it (its source and the transitive closure of what it calls:
    torch's own codegen), written to a module and compiled for the simulated GPU with the traced arguments and
    its first candidate; returns {kernel: (registers, spilled bytes)}."""
    import importlib.util
    import tempfile

    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table, triton_kernel_wrapper_functional
    from torch._inductor.codegen.wrapper import user_defined_triton_kernel_transitive_closure_source_code
    from triton.runtime.autotuner import Autotuner

    def value(x):            # what the spill pruning compiles for, in place of a traced tensor or size
        return TD._compilable(x.meta["val"]) if isinstance(x, torch.fx.Node) else x

    done = {}
    with tempfile.TemporaryDirectory() as tmp:
        for node in gm.graph.nodes:
            if node.target is not triton_kernel_wrapper_functional:
                continue
            kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
            jit = kernel.fn if isinstance(kernel, Autotuner) else kernel
            if jit.__name__ in done:
                continue
            path = os.path.join(tmp, f"emitted{jit.__name__}.py")
            with open(path, "w") as f:
                f.write("import triton\nimport triton.language as tl\n\n@triton.jit\n"
                        + user_defined_triton_kernel_transitive_closure_source_code(jit))
            spec = importlib.util.spec_from_file_location(f"emitted{jit.__name__}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            args = {k: value(v) for k, v in {**kernel_side_table.get_constant_args(node.kwargs["constant_args_idx"]),
                                              **node.kwargs["kwargs"]}.items()}
            config = kernel.configs[0].all_kwargs() if isinstance(kernel, Autotuner) else {}
            compiled = getattr(module, jit.__name__).warmup(**args, **config, grid=(1,))
            compiled._init_handles()
            done[jit.__name__] = (int(compiled.n_regs), int(compiled.n_spills))
    return done


FORWARD = ["_prep_kernel", "_fwd_kernel"]
TUNED = {"_fwd_kernel", "_bwd_dkv_kernel", "_bwd_dq_kernel", "_bwd_walk_kernel"}
PER_TOKEN = {"_prep_kernel", "_fwd_kernel", "_bwd_prep_kernel", "_bwd_dkv_kernel", "_bwd_dq_kernel",
             "_bwd_extra_kernel"}        # grids over tokens (the walkers and folds loop over the batch)
# never written: the ops' inputs and the token index; by the backward, also the tensors the forward saved
READ_ONLY = {"Q", "K", "V", "RPE", "REX", "GO", "AIX", "NBX", "NB2", "AI2", "WIX", "DELTAS"}
SAVED = {"O", "RES", "DEN", "R", "MX"}

CASES = {
    # bf16 dots, two groups, an extra token with its rpe_extra (the extra-token gradient kernel), 2D grid
    "bf16-M2-extra": dict(dtype="bfloat16", grid=[3, 4], E=1, rpe_extra=True, M=2, Dk=16, Dv=32, causal=False,
                          boundary="zero"),
    # tf32x3 dots, circular tables (the table-gradient kernel), causal, 1D grid, Dk != Dv
    "fp32-circular-causal": dict(dtype="float32", grid=[7], E=0, rpe_extra=False, M=1, Dk=8, Dv=4, causal=True,
                                 boundary="circular"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_triton_ops_trace_to_their_kernels(case):
    from lisa_kernels.testing import _helper

    cfg = CASES[case]
    report = _helper().submit(_trace, cfg).result()
    assert report["exported_ops"] == ["lisa_kernels.triton_direct.default",
                                      "lisa_kernels.triton_direct_backward.default"]
    assert report["left_ops"] == [], "an op of the package was not traced into its kernels"
    backward = ["_bwd_prep_kernel", "_bwd_dkv_kernel", "_bwd_dq_kernel", "_bwd_walk_kernel"]
    backward += ["_bwd_extra_kernel"] if cfg["E"] and cfg["rpe_extra"] else []
    backward += ["_table_fold_kernel"] + (["_table_grad_kernel"] if cfg["boundary"] == "circular" else [])
    # lisa_attention's forward, the forward op again (its saved tensors), then the backward op
    assert [x["kernel"] for x in report["launches"]] == FORWARD + FORWARD + backward
    # no input is written (q, k, v would be outputs of the trace), and the batch stays symbolic
    B, H, N = "s", "2", str(cfg["E"] + torch.Size(cfg["grid"]).numel())
    table = [str(s if cfg["boundary"] == "circular" else 2 * s - 1) for s in cfg["grid"]]
    expected = [[B, H, N, str(cfg["Dv"])], [B, H, N, str(cfg["Dk"])], [B, H, N, str(cfg["Dk"])],
                [B, H, N, str(cfg["Dv"])], [H, str(cfg["M"])] + table] + ([[H, str(cfg["M"]), "3"]] if cfg["rpe_extra"]
                                                                           else [["0"]])
    assert report["batch_symbolic"]
    assert [[x[0] if x[0].isdigit() else "s"] + x[1:] for x in report["out_shapes"]] == expected
    # every kernel compiles for sm_90 from the source Inductor emits for it, without spilling
    assert sorted(report["inductor_source"]) == sorted(set(FORWARD + backward))
    assert all(spills == 0 for _, spills in report["inductor_source"].values()), report["inductor_source"]
    for launch in report["launches"]:
        backward_kernel = launch["kernel"] not in FORWARD
        assert not (READ_ONLY | (SAVED if backward_kernel else set())) & set(launch["cloned"]), \
            f"{launch['kernel']} is taken to write an input"
        assert launch["cloned"], f"{launch['kernel']} writes nothing?"
        assert launch["symbolic_grid"] == (launch["kernel"] in PER_TOKEN), launch
        if launch["kernel"] in TUNED:
            assert report["compiles"].get(launch["kernel"], 0) >= report["candidates"][launch["kernel"]] >= 2, \
                "a candidate was not compiled for sm_90 by the spill pruning"
    assert report["cache_kernels"] == sorted(FORWARD + ["_bwd_prep_kernel", "_bwd_dkv_kernel", "_bwd_dq_kernel",
                                                        "_bwd_walk_kernel", "_bwd_extra_kernel", "_table_fold_kernel",
                                                        "_table_grad_kernel"])


def test_traced_gpu_refuses_what_it_cannot_simulate():
    from lisa_kernels.testing import traced_gpu

    with pytest.raises(ValueError, match="NVIDIA"):
        with traced_gpu("mi300x"):
            pass
    if os.environ.get("TRITON_INTERPRET") == "1":        # (CI: the interpreter's kernels cannot be compiled)
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            with traced_gpu("h100"):
                pass
