"""Sweep the conv kernel's tile configs on VoVNet shapes and split host overhead
from device time. CUDA only. Usage: python benchmarks/tools/sweep_conv_configs.py

Prints, per shape: device time of every config (CUDA-graph replay, so launch
overhead is excluded), cuDNN's folded conv+ReLU for reference, and the
host-inclusive time of the raw launch, the functional op and the module.
"""
import copy
import sys

import torch
import triton
import triton.testing
from torch import nn

from effops import FusedConvBNAct
from effops.ops import conv as C

SHAPES = [(32, 128, 128, 3, 56), (32, 160, 160, 3, 28), (32, 768, 256, 1, 56), (32, 1056, 512, 1, 28), (32, 224, 224, 3, 7)]
CONFIGS = [
    (bm, bn, bk, w, st)
    for bm, bn, bk, w, st in [
        (128, 128, 64, 8, 3), (128, 128, 64, 4, 3), (128, 128, 64, 4, 4), (128, 128, 32, 4, 4), (128, 128, 64, 8, 4),
        (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (64, 64, 64, 4, 4),
        (128, 64, 32, 4, 5), (64, 128, 32, 4, 5), (256, 64, 64, 8, 3), (64, 256, 64, 8, 3), (128, 160, 32, 8, 4),
        (128, 32, 64, 4, 4), (64, 32, 64, 4, 4), (256, 128, 32, 8, 4), (128, 256, 32, 8, 4),
    ]
]
dtype = getattr(torch, sys.argv[1]) if len(sys.argv) > 1 else torch.float16
for n, cin, cout, k, hw in SHAPES:
    x = torch.randn(n, cin, hw, hw, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(cout, cin, k, k, device="cuda", dtype=dtype) * 0.05).contiguous(memory_format=torch.channels_last)
    b = torch.randn(cout, device="cuda")
    out = torch.empty(n, cout, hw, hw, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
    p = k // 2
    flops = 2 * n * hw * hw * cout * cin * k * k
    res = []
    # Each tile in the pointer kernel and, where the conv qualifies (C.tma_eligible: sm_90+,
    # stride-1 "same" convs, aligned NHWC), in the TMA kernel: rows marked "tma".
    tma_ok = C.tma_eligible(x, w, out, [1, 1], [1, 1], 1)
    variants = [(c, False) for c in CONFIGS] + [(c, True) for c in CONFIGS if tma_ok and c[2] * x.element_size() <= 128]
    for (bm, bn, bk, wp, st), tma in variants:
        cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=wp, num_stages=st, TMA=tma)
        fn = lambda: C._run_triton(x, w, None, b, None, out, [1, 1], [p, p], [1, 1], 1, "relu", 0.0, False, config=cfg)
        try:
            fn()
            torch.cuda.synchronize()
            ms = triton.testing.do_bench_cudagraph(fn, rep=50)
        except Exception:  # out of shared memory etc.
            ms = float("inf")
        res.append((ms, (bm, bn, bk, wp, st) + (("tma",) if tma else ())))
    res.sort()
    cud = lambda: torch.cudnn_convolution_relu(x, w, b.to(dtype), (1, 1), (p, p), (1, 1), 1)
    cudnn_ms = triton.testing.do_bench_cudagraph(cud, rep=50)
    print(f"\n{n}x{cin}x{hw}x{hw} k{k} -> {cout}: cudnn folded+relu {cudnn_ms*1e3:.1f} us ({flops/cudnn_ms/1e9:.0f} TFLOP/s)")
    for ms, c in res[:8]:
        print(f"  {c}: {ms*1e3:.1f} us ({flops/ms/1e9:.0f} TFLOP/s)")
    print(f"  worst {res[-1][1]}: {res[-1][0]*1e3:.1f} us")
    best = dict(zip(["BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages"], res[0][1]), TMA=len(res[0][1]) > 5)
    seq = nn.Sequential(nn.Conv2d(cin, cout, k, padding=p, bias=False), nn.BatchNorm2d(cout), nn.ReLU()).eval().cuda().to(dtype)
    mod = FusedConvBNAct.from_modules(*copy.deepcopy(list(seq))).eval()
    with torch.inference_mode():
        raw = lambda: C._run_triton(x, w, None, b, None, out, [1, 1], [p, p], [1, 1], 1, "relu", 0.0, False, config=best)
        op = lambda: C.conv_bn_act(x, w, None, b, padding=p, act="relu")
        modf = lambda: mod(x)
        for name, f in [("raw launch", raw), ("functional op (autotuned)", op), ("module (autotuned)", modf), ("eager seq", lambda: seq(x))]:
            for _ in range(3):
                f()
            torch.cuda.synchronize()
            host = triton.testing.do_bench(f, rep=50)
            graph = triton.testing.do_bench_cudagraph(f, rep=50)
            print(f"  {name:<28} host-inclusive {host*1e3:7.1f} us   graph {graph*1e3:7.1f} us")
