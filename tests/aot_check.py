"""Compile every effops Triton kernel for real GPU targets, with no GPU present.

Run by ``tests/test_aot_compile.py`` in a fresh process (the test session itself
imports the kernels under ``TRITON_INTERPRET=1``, which never compiles). Prints one
JSON object: case name -> {"shared": bytes, "async_copies": n, "tma": n, "ptx": {...}}
or {"error": ...}; ``ptx`` counts the global-memory instructions by width
(``cp.async`` 16-byte copies, TMA bulk-tensor copies, vector and scalar loads)
and ``wgmma``s.

    python tests/aot_check.py            # JSON
    python tests/aot_check.py --table    # the same, one line per build
"""
import json
import os
import re
import sys
from collections import Counter

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from effops.ops import conv, osa, reparam, se, shuffle  # noqa: E402


def compile_kernel(fn, arg_types, consts, ones=(), num_warps=4, num_stages=3, cc=90):
    """``arg_types``: pointer and float arguments (everything else is i32), for a tuple
    argument a tuple of its entries' types; ``ones``: integer arguments equal to 1 at
    launch (the JIT turns them into constants), every entry of a tuple argument named."""
    sig, cx, attrs = {}, {}, {}

    def leaf(ty, path, one):
        if one:
            cx[path] = 1
            return "constexpr"
        if ty != "fp32" and not ty.startswith("tensordesc"):
            # pointers and ints: what the JIT marks for multiples of 16
            attrs[path] = [["tt.divisibility", 16]]
        return ty

    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name], cx[(i,)] = "constexpr", consts[name]
            continue
        ty = arg_types.get(name, "i32")
        if isinstance(ty, tuple):  # a tuple argument: entries addressed by (argument, entry)
            sig[name] = tuple(leaf(t, (i, j), name in ones) for j, t in enumerate(ty))
        else:
            sig[name] = leaf(ty, (i,), name in ones)
    src = ASTSource(fn, sig, constexprs=cx, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", cc, 32), options=dict(num_warps=num_warps, num_stages=num_stages))


def ptx_memory_ops(ptx: str) -> dict:
    """Global-memory instructions of a build by kind and width, plus wgmma count."""
    c = Counter()
    for width in re.findall(r"cp\.async\.c[ag]\.shared\.global(?:\.L2::\w+)?\s*\[[^\]]*\],\s*\[[^\]]*\],\s*(0x\w+|\d+)", ptx):
        c[f"cp.async.{int(width, 0)}B"] += 1
    for op in re.findall(r"\b(ld\.global(?:\.[a-z0-9:]+)*)", ptx):
        c["ld.global.v4" if ".v4." in op + "." else ("ld.global.v2" if ".v2." in op + "." else "ld.global.scalar")] += 1
    c["tma.load"] = len(re.findall(r"cp\.async\.bulk\.tensor\.\dd\.shared::\w+\.global", ptx))
    c["wgmma"] = ptx.count("wgmma.mma_async")
    return dict(c)


def ptrs(names, t):
    return {n: f"*{t}" for n in names}


# The largest candidate tile (most shared memory) for every dtype and GPU; a small one once.
TILES = {"big": dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
         "small": dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=3)}


def cases():
    for cc in (90, 80):
        for dt in ("fp16", "bf16", "fp32"):
            for tile, cfg in TILES.items():
                if tile == "small" and not (cc == 90 and dt == "fp16"):
                    continue  # the small tile can't overflow anything: compile it once
                if dt == "fp32" and tile == "big":
                    cfg = dict(cfg, BLOCK_M=128)
                osa_segment_counts = (2, 8) if tile == "big" or cc == 90 else (2,)
                blocks = {k: v for k, v in cfg.items() if k.startswith("BLOCK")}
                prec = "tf32" if dt == "fp32" else "ieee"
                for pw in (True, False):
                    types = {**ptrs(["x_ptr", "w_ptr", "res_ptr", "out_ptr"], dt), "scale_ptr": "*fp32",
                             "bias_ptr": "*fp32", "gate_ptr": "*fp32", "psum_ptr": "*fp32", "act_param": "fp32"}
                    consts = dict(KH=1 if pw else 3, KW=1 if pw else 3, HAS_SCALE=True, HAS_BIAS=True, HAS_RES=True,
                                  RES_AFTER_ACT=False, ACT="silu", HAS_GATE=False, SHUFFLE_G=1, CH_SUM=False,
                                  POINTWISE=pw,
                                  IDX64=False, UPCAST_DOT=False, DOT_PRECISION=prec, **blocks)
                    yield (f"conv_{'1x1' if pw else '3x3'}_{dt}_{tile}_sm{cc}", conv._conv_bn_act_kernel, types, consts,
                           ("sxc", "swi", "soc", "src", "stride_h", "stride_w", "dil_h", "dil_w"), cfg, cc)
                    if tile == "big":
                        # An SE gate on the operand load (inverted residual's project conv: fp32 gate,
                        # contiguous [N, C_in]) and a shuffled write (ShuffleNet V1, g = 4).
                        yield (f"conv_gated_{'1x1' if pw else '3x3'}_{dt}_{tile}_sm{cc}", conv._conv_bn_act_kernel,
                               types, dict(consts, HAS_GATE=True, HAS_RES=False, ACT="identity"),
                               ("sxc", "swi", "soc", "sgc", "stride_h", "stride_w", "dil_h", "dil_w"), cfg, cc)
                        yield (f"conv_shuffled_{'1x1' if pw else '3x3'}_{dt}_{tile}_sm{cc}", conv._conv_bn_act_kernel,
                               types, dict(consts, SHUFFLE_G=4, HAS_RES=False, ACT="relu"),
                               ("sxc", "swi", "soc", "stride_h", "stride_w", "dil_h", "dil_w"), cfg, cc)
                        # Per-image channel sums in the epilogue (an SE bottleneck's conv3: BN, no act).
                        yield (f"conv_chsum_{'1x1' if pw else '3x3'}_{dt}_{tile}_sm{cc}", conv._conv_bn_act_kernel,
                               types, dict(consts, CH_SUM=True, HAS_RES=False, ACT="identity"),
                               ("sxc", "swi", "soc", "stride_h", "stride_w", "dil_h", "dil_w"), cfg, cc)
                # The N-segment aggregation: the OSA block's two segments and eight (ELAN-style
                # concats, a VoVNet-99 block with separate stage tensors), each channels_last.
                for n_seg in osa_segment_counts:
                    for per_image in (False, True):
                        types = {"seg_ptrs": (f"*{dt}",) * n_seg,
                                 **{a: ("i32",) * n_seg for a in ("seg_chans", "seg_sn", "seg_sc", "seg_sh", "seg_sw")},
                                 **ptrs(["w_ptr", "res_ptr", "out_ptr"], dt), "scale_ptr": "*fp32",
                                 "bias_ptr": "*fp32", "psum_ptr": "*fp32", "act_param": "fp32"}
                        consts = dict(NUM_SEG=n_seg, HAS_SCALE=True, HAS_BIAS=True, HAS_RES=not per_image, ACT="relu",
                                      PER_IMAGE=per_image, IDX64=False, UPCAST_DOT=False, DOT_PRECISION=prec, **blocks)
                        yield (f"osa_agg_{'per_image' if per_image else 'flat'}_{dt}_{tile}_seg{n_seg}_sm{cc}",
                               osa._osa_agg_kernel, types, consts, ("seg_sc", "swi", "soc", "src"), cfg, cc)
            # The TMA conv kernel (sm_90+ only): every tile the tuner may offer it.
            if cc == 90:
                es = {"fp16": 2, "bf16": 2, "fp32": 4}[dt]
                for cfg in conv._candidates(1024, 1024, es):
                    if not cfg.get("TMA") or (dt == "bf16" and cfg["BLOCK_M"] * cfg["BLOCK_N"] < 32768):
                        continue  # every tile in fp16 and fp32 (BLOCK_K 32 only); bf16 the largest
                    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
                    types = {"x_desc": f"tensordesc<{dt}[{bm}, {bk}]>", "w_desc": f"tensordesc<{dt}[{bn}, {bk}]>",
                             **ptrs(["res_ptr", "out_ptr"], dt), "scale_ptr": "*fp32", "bias_ptr": "*fp32",
                             "act_param": "fp32"}
                    for pw in (True, False):
                        consts = dict(KH=1 if pw else 3, KW=1 if pw else 3, HAS_SCALE=True, HAS_BIAS=True,
                                      HAS_RES=True, RES_AFTER_ACT=False, ACT="relu", SHUFFLE_G=1, UPCAST_DOT=False,
                                      DOT_PRECISION="tf32" if dt == "fp32" else "ieee", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
                        yield (f"conv_tma_{'1x1' if pw else '3x3'}_{dt}_{bm}x{bn}x{bk}_w{cfg['num_warps']}"
                               f"s{cfg['num_stages']}_sm{cc}", conv._conv_bn_act_tma_kernel, types, consts,
                               ("soc", "src"), cfg, cc)
            # Every candidate tile of the fused depthwise kernel (and its heuristic tile): they
            # differ most in shared memory, which is what can fail at launch.
            # fp32 needs the most; half types get the heuristic tiles only.
            dw_tiles = [osa._dw_pw_heuristic(1 << 20, 256), osa._dw_pw_heuristic(64, 32)]
            if dt == "fp32":
                dw_tiles += osa._dw_pw_configs()
            for j, cfg in enumerate(dw_tiles):
                types = {**ptrs(["x_ptr", "dw_ptr", "w_ptr", "out_ptr"], dt), "scale_ptr": "*fp32", "bias_ptr": "*fp32",
                         "act_param": "fp32"}
                consts = dict(DWK=3, HAS_SCALE=True, HAS_BIAS=True, ACT="relu", IDX64=False, UPCAST_DOT=False,
                              DOT_PRECISION="tf32" if dt == "fp32" else "ieee",
                              **{k: v for k, v in cfg.items() if k.startswith("BLOCK")})
                yield (f"dw_pw_{dt}_tile{j}_sm{cc}", osa._dw_pw_kernel, types, consts, ("sxc", "sdw", "swi", "soc"), cfg,
                       cc)
            # Depthwise tiles use almost no shared memory: every tile once (fp16, sm_90), elsewhere
            # the heuristic tiles only.
            dw_conv_tiles = [conv._depthwise_heuristic(256)]
            if cc == 90 and dt == "fp16":
                dw_conv_tiles += conv._depthwise_configs()
            for j, cfg in enumerate(dw_conv_tiles):
                types = {**ptrs(["x_ptr", "w_ptr", "res_ptr", "out_ptr"], dt), "scale_ptr": "*fp32",
                         "bias_ptr": "*fp32", "gate_ptr": "*fp32", "act_param": "fp32"}
                consts = dict(KH=3, KW=3, HAS_SCALE=True, HAS_BIAS=True, HAS_RES=True, RES_AFTER_ACT=True,
                              ACT="relu6", HAS_GATE=False, SHUFFLE_G=1, IDX64=False, BLOCK_P=cfg["BLOCK_P"],
                              BLOCK_C=cfg["BLOCK_C"])
                yield (f"depthwise_{dt}_tile{j}_sm{cc}", conv._depthwise_kernel, types, consts,
                       ("sxc", "sww", "soc", "src", "stride_h", "stride_w", "dil_h", "dil_w"), cfg, cc)  # [C, 1, kh, kw] weight
                if j == 0:  # the heuristic tile with a gate and a shuffled write (g = 2, ShuffleNet V2)
                    yield (f"depthwise_gated_shuffled_{dt}_sm{cc}", conv._depthwise_kernel, types,
                           dict(consts, HAS_GATE=True, SHUFFLE_G=2), ("sxc", "sww", "soc", "src", "sgc", "stride_h",
                                                                      "stride_w", "dil_h", "dil_w"), cfg, cc)
            yield (f"gate_residual_{dt}_sm{cc}", osa._gate_residual_kernel,
                   {**ptrs(["y_ptr", "res_ptr"], dt), "gate_ptr": "*fp32"},
                   dict(HAS_RES=True, IDX64=True, BLOCK_P=64, BLOCK_C=64), ("syc", "src"), {}, cc)
            # Channel shuffle, NHWC in and out (channel strides 1), with its NHWC heuristic tile.
            tile = shuffle._shuffle_heuristic(256, 3136, True)
            yield (f"shuffle_{dt}_sm{cc}", shuffle._shuffle_kernel, ptrs(["x_ptr", "out_ptr"], dt),
                   dict(FLAT_HW=True, IDX64=False, BLOCK_P=tile["BLOCK_P"], BLOCK_C=tile["BLOCK_C"]),
                   ("sxc", "soc"), tile, cc)
        yield (f"ese_gate_sm{cc}", osa._ese_gate_kernel,
               {**ptrs(["psum_ptr", "w_ptr", "b_ptr", "gate_ptr"], "fp32"), "inv_hw": "fp32"},
               dict(HAS_BIAS=True, BLOCK_C=64, BLOCK_K=64), (), {}, cc)
        yield from se_cases(cc)
        yield from reparam_cases(cc)


def se_cases(cc):
    """Squeeze-excite: the pool and the gate pass (NHWC, their heuristic tiles), and the excitation
    (both layers in one launch, and one layer) with the heuristic tiles of batch 1 and 32 for
    ResNet-RS's 2048 -> 512 -> 2048, weights in the model's dtype."""
    for dt in ("fp16", "bf16", "fp32"):
        pool = se._pool_heuristic(1, 256, 3136, True)
        yield (f"se_pool_{dt}_sm{cc}", se._se_pool_kernel, {**ptrs(["x_ptr"], dt), "psum_ptr": "*fp32"},
               dict(FLAT_HW=True, IDX64=False, BLOCK_P=pool["BLOCK_P"], BLOCK_C=pool["BLOCK_C"]), ("sxc",), pool, cc)
        tile = se._shuffle_heuristic(256, 3136, True)
        yield (f"se_apply_{dt}_sm{cc}", se._se_apply_kernel,
               {**ptrs(["x_ptr", "res_ptr", "out_ptr"], dt), "gate_ptr": "*fp32", "act_param": "fp32"},
               dict(HAS_RES=True, ACT="relu", FLAT_HW=True, IDX64=False, BLOCK_P=tile["BLOCK_P"],
                    BLOCK_C=tile["BLOCK_C"]), ("sxc", "sgc", "src", "soc"), tile, cc)
        if dt == "bf16" or (dt == "fp32" and cc == 80):
            continue  # the excitation reads weights in fp32 whatever their dtype: fp16 and fp32 suffice
        for n in (1, 32):
            cfg = se._excite_heuristic(n, 2048, 512)
            for two in (True, False):
                yield (f"se_excite_{'fused' if two else 'layer'}_b{n}_{dt}_sm{cc}", se._se_excite_kernel,
                       {"in_ptr": "*fp32", "out_ptr": "*fp32", "in_scale": "fp32", "act1_param": "fp32",
                        "act2_param": "fp32", **ptrs(["w1_ptr", "b1_ptr", "w2_ptr", "b2_ptr"], dt)},
                       dict(TWO_LAYERS=two, HAS_B1=True, HAS_B2=True, ACT1="relu", ACT2="sigmoid",
                            **{k: v for k, v in cfg.items() if k.startswith("BLOCK")}), ("sw1i", "sw2i"), cfg, cc)



def reparam_cases(cc):
    """The RepVGG branch merge (3x3 + 1x1 + identity; GhostNetV3's three 3x3 branches once; int64
    addressing once) with its 384 -> 1408 heuristic tile, OHWI output, for each weight -> output
    dtype a model runs: float32, autocast to bfloat16, a .half() / .bfloat16() model. Built with fp
    fusion off, as the launcher runs it (float64 multiply-adds stay separately rounded)."""
    tile = reparam._merge_heuristic(1408, 3456)
    for wdt, odt, nf, idx64 in (("fp32", "fp32", 1, False), ("fp32", "bf16", 1, False), ("fp16", "fp16", 1, False),
                                ("bf16", "bf16", 1, False), ("fp32", "fp16", 3, False), ("fp32", "fp32", 1, True)):
        nb = nf + 2
        types = {"w_ptrs": (f"*{wdt}",) * nf, "w1_ptr": f"*{wdt}", "out_ptr": f"*{odt}", "bias_ptr": "*fp32",
                 **{a: (f"*{wdt}",) * nb for a in ("g_ptrs", "b_ptrs", "m_ptrs", "v_ptrs")}, "eps_bits": ("i64",) * nb,
                 **{a: ("i32",) * nf for a in ("sw_o", "sw_i", "sw_h", "sw_w")}}
        consts = dict(NUM_FULL=nf, HAS_1X1=True, HAS_ID=True, KH=3, KW=3, OUT_CL=True, BF16_RNE=False, IDX64=idx64,
                      BLOCK_CO=tile["BLOCK_CO"], BLOCK_K=tile["BLOCK_K"])
        knobs = triton.knobs.language
        fusion, knobs.default_fp_fusion = knobs.default_fp_fusion, False  # the launcher's enable_fp_fusion=False
        try:
            yield (f"reparam_merge_{wdt}_to_{odt}_b{nf}{'_idx64' if idx64 else ''}_sm{cc}", reparam._reparam_kernel,
                   types, consts, ("sw_w", "s1_i"), tile, cc)  # OIHW weights: unit stride along kw and ci
        finally:
            knobs.default_fp_fusion = fusion


def main() -> int:
    out = {}
    try:  # the ahead-of-time API has changed between Triton releases: say so instead of failing every case
        ASTSource(osa._ese_gate_kernel, {n: "i32" for n in osa._ese_gate_kernel.arg_names}, constexprs={}, attrs={})
    except TypeError as e:
        json.dump({"__unsupported__": f"triton {triton.__version__}: ASTSource({e})"}, sys.stdout)
        return 0
    for name, fn, types, consts, ones, cfg, cc in cases():
        try:
            k = compile_kernel(fn, types, consts, ones, cfg.get("num_warps", 4), cfg.get("num_stages", 3), cc)
            g, ptx = k.asm["ttgir"], k.asm["ptx"]
            out[name] = {"shared": k.metadata.shared, "async_copies": g.count("async_copy_global_to_local"),
                         "tma": g.count("async_tma_copy"), "ptx": ptx_memory_ops(ptx)}
        except Exception as e:  # noqa: BLE001 - reported per case
            out[name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
    if "--table" in sys.argv:
        for name, b in out.items():
            print(f"{name:34s} " + (b["error"][:200] if "error" in b else
                                    f"shared {b['shared']:7d} B  " + "  ".join(f"{k} {v}" for k, v in b["ptx"].items())))
    else:
        json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
