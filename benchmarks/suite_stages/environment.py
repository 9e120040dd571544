"""Stage ``environment``: device, versions, commit, and the two ceilings every ratio is read
against: bf16 GEMM TFLOP/s (8192^3, random data) and device-copy GB/s (1 GiB, read + write)."""

from __future__ import annotations

import os
import platform

import torch

from ps3 import bench as ps3_bench
from ps3_kernels.varlen_attention import available_impls

from .base import Shapes, Stage, StageContext, WorkItem, calls_s


def versions(ctx: StageContext) -> None:
    env = ps3_bench.environment("cuda" if ctx.cuda else "cpu")
    info = dict(device=env["device"], torch=env["torch"], triton=env["triton"], python=platform.python_version(),
                commit=env["git_commit"] or os.environ.get("PS3_COMMIT"), peers=available_impls())
    if ctx.cuda:
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = dict(name=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                           memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                           cudnn=torch.backends.cudnn.version())
    for key, value in info.items():
        ctx.set(key, value)


def ceilings(ctx: StageContext) -> None:
    n, numel = (8192, 2**28) if ctx.cuda else (256, 2**22)
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    a, b = (torch.randn(n, n, device=ctx.shapes.device, dtype=dtype) for _ in range(2))  # random data, not zeros
    gemm = ctx.bench(lambda: a @ b)
    src = torch.randn(numel, device=ctx.shapes.device)
    dst = torch.empty_like(src)
    copy = ctx.bench(lambda: dst.copy_(src))
    ctx.set("ceilings", {f"{'bf16' if ctx.cuda else 'fp32'}_gemm_tflops": 2 * n**3 / (gemm.ms * 1e-3) / 1e12,
                         "copy_gb_per_s": 2 * src.numel() * src.element_size() / (copy.ms * 1e-3) / 1e9,
                         "gemm_shape": f"{n}x{n}x{n} {str(dtype)[6:]}", "copy_bytes": 2 * numel * 4,
                         "how": f"median of {gemm.reps} calls ({gemm.timer}); copy counts bytes read + written"})
    ctx.log(f"ceilings {ctx.data['ceilings']}")


def items(sh: Shapes) -> list[WorkItem]:
    return [
        WorkItem("versions and device", 3.0, versions),  # the CUDA context's creation included
        WorkItem("bf16 GEMM and copy ceilings", calls_s(1.4, 25) + calls_s(0.7, 25), ceilings),
    ]


STAGE = Stage("environment", 0.02, __doc__.split("\n\n")[0], items)
