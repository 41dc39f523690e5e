"""Peak memory of one lisa_attention call, measured in a fresh process (run by tests/test_memory.py).

    python tests/memory_probe.py '{"backend": "fft", "grid": [64, 64], "B": 1, "H": 1, "Dk": 64, "Dv": 64,
                                   "budget": 8388608}'

prints one JSON line: for a forward call (under no_grad) and for a forward + backward call, the resident-memory
growth (bytes) from just before the call to its peak, and how it was measured. A forward + backward warm-up
call runs first: it pays one-time costs that are not the backend's workspace (MKL / pocketfft buffers and
plans, the autograd engine's thread, lazily loaded code).

Measurement: the kernel's own high-water mark of the resident set (VmHWM in /proc/self/status), reset right
before the call by writing "5" to /proc/self/clear_refs, so even a spike of a microsecond is seen. Where that
reset is not allowed, a thread samples VmRSS every 0.5 ms instead (may miss short spikes: reported as
"sampled"). The parent sets MALLOC_MMAP_THRESHOLD_ so that freed large blocks go back to the system at once:
otherwise glibc keeps freed memory resident, and a second call that reuses it would look free of charge.
"""

import gc
import json
import math
import os
import sys
import threading
import time

import torch


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status("VmHWM") <= _status("VmRSS") + (1 << 20)


class _Sampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.running = _status("VmRSS"), True

    def run(self):
        while self.running:
            self.peak = max(self.peak, _status("VmRSS"))
            time.sleep(0.0005)


def main(cfg):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import lisa_kernels

    torch.set_num_threads(1)
    if cfg.get("python_direct"):          # the direct path's PyTorch ops, not the extension's fused kernel
        lisa_kernels.direct._C_DIRECT = None
    setting = "fft_workspace_bytes" if cfg["backend"] == "fft" else "direct_block_bytes"
    lisa_kernels.set_config(**{setting: cfg["budget"]})
    grid, B, H, Dk, Dv, M = tuple(cfg["grid"]), cfg["B"], cfg["H"], cfg["Dk"], cfg["Dv"], cfg.get("M", 1)
    boundary = cfg.get("boundary", "zero")
    N = math.prod(grid)
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(B, H, N, Dk, generator=gen), torch.randn(B, H, N, Dk, generator=gen)
    v = torch.randn(B, H, N, Dv, generator=gen)
    table = [s if boundary == "circular" else 2 * s - 1 for s in grid]
    rpe = 0.1 * torch.randn(H, M, *table, generator=gen)
    inputs = (q, k, v, rpe)
    for t in inputs:
        t.requires_grad_()
    g = torch.randn(B, H, N, Dv, generator=gen)

    def forward():
        with torch.no_grad():
            return lisa_kernels.lisa_attention(q, k, v, rpe, grid=grid, boundary=boundary, backend=cfg["backend"])

    def forward_backward():
        out = lisa_kernels.lisa_attention(q, k, v, rpe, grid=grid, boundary=boundary, backend=cfg["backend"])
        return out.detach(), torch.autograd.grad(out, inputs, g)

    modes = cfg.get("modes", ["forward", "forward_backward"])
    calls = {"forward": forward, "forward_backward": forward_backward}
    result = calls["forward_backward" if "forward_backward" in modes else "forward"]()     # warm-up
    del result
    report = {}
    for name in modes:
        call = calls[name]
        gc.collect()
        exact = _reset_high_water_mark()
        sampler = None if exact else _Sampler()
        base = _status("VmRSS")
        if sampler:
            sampler.start()
        t0 = time.perf_counter()
        result = call()
        seconds = time.perf_counter() - t0
        if sampler:
            sampler.running = False
            sampler.join()
            peak = sampler.peak
        else:
            peak = _status("VmHWM")
        report[name] = {"growth": peak - base, "base": base, "peak": peak, "retained": _status("VmRSS") - base,
                        "method": "VmHWM" if exact else "sampled", "seconds": seconds}
        del result
    print(json.dumps(report))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
