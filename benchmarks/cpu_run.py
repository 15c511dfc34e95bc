"""Time one (model, provider, batch) on the CPU in this process, alone; print one JSON line.

    python benchmarks/cpu_run.py --model mobilenet_v2 --provider effops --batch 1 --threads 2 --runs 20 --warmup 5 --json

Runtimes with their own thread pools (ONNX Runtime, OpenVINO, torch's OpenMP pool) keep
spinning after a call and take the cores from whatever runs next in the same process, so
``benchmarks/test_cpu_models.py`` starts this script once per (model, provider, batch,
repeat). Every provider gets the same model (``torch.manual_seed(0)``, BN statistics
randomised by ``effops.benchmark.randomize_bn``), the same seeded input
``randn(batch, 3, 224, 224)``, fp32, eval mode.

Providers: ``eager`` (NCHW), ``eager_cl`` (model and input channels_last), ``compile_freeze``
(inductor with ``freezing=True`` on the channels_last model), ``onnxruntime`` (legacy ONNX
export, opset 17; ORT_ENABLE_ALL, ``intra_op_num_threads=threads``), ``openvino``
(``convert_model`` + ``compile_model`` on CPU, LATENCY hint, f32 precision), ``effops``
(``effops.optimize`` of the channels_last model with the input as ``example_inputs``, so its speed
check keeps the original of any block it measures slower) and ``effops_compile`` (that model
through inductor with freezing).

One untimed first call (an inductor compile, effops' first-use native build, ORT/OpenVINO
lazy initialisation) comes before ``warmup`` untimed calls and ``runs`` timed ones; its
seconds are ``first_call_s``. Conversion/compile-before-first-call seconds are
``prepare_s``. ``rel_err_vs_fp64`` is ``||out - ref|| / ||ref||`` against the original
eager model run in float64 on the same input.

The JSON line always has ``model``, ``provider``, ``batch``, ``threads``, ``versions``;
then either ``median_ms``, ``min_ms``, ``times_ms``, ``rel_err_vs_fp64`` ... or ``skipped``
(a package is missing) or ``error`` (``"Type: message"``). The exit status is 0 in all
three cases; with ``--json`` anything libraries print goes to stderr, so stdout is that
one line.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The effops of this checkout is what is measured, whether or not it is pip-installed.
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))  # _numerics, also when this file is run by path from elsewhere

PROVIDERS = ("eager", "eager_cl", "compile_freeze", "onnxruntime", "openvino", "effops", "effops_compile")
TORCHVISION_MODELS = ("shufflenet_v2_x1_0", "mobilenet_v2", "resnet50")
TIMM_MODELS = ("ese_vovnet39b", "ese_vovnet19b_dw", "ghostnet_100", "resnetrs50", "regnety_016", "efficientnet_b0",
               "repvgg_a2", "mobilenetv3_large_100")
MODELS = ("vovnet39",) + TIMM_MODELS + TORCHVISION_MODELS
INSTALL_HINT = "(pip install -e .[bench])"


class Skip(Exception):
    """A package this provider (or model) needs is not installed."""


def _need(module: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise Skip(f"{module} is not installed {INSTALL_HINT}") from None


def build_model(name: str):
    import torch

    from effops.benchmark import randomize_bn

    torch.manual_seed(0)
    if name == "vovnet39":
        from effops.models.classic_vovnet import classic_vovnet

        model = classic_vovnet(name)
    elif name in TORCHVISION_MODELS:
        model = getattr(_need("torchvision").models, name)(weights=None)
    elif name in TIMM_MODELS:
        model = _need("timm").create_model(name, pretrained=False)
    else:
        raise ValueError(f"unknown model {name!r}; one of {', '.join(MODELS)}")
    return randomize_bn(model).eval()


def make_input(batch: int):
    import torch

    # Its own generator: the input does not depend on how many random numbers the model's
    # constructor drew.
    return torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))


def _versions(provider: str) -> dict:
    import torch

    v = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("torchvision", "timm", "effops"):
        try:
            v[mod] = getattr(importlib.import_module(mod), "__version__", "?")
        except ImportError:
            pass
    extra = {"onnxruntime": ("onnxruntime", "onnx"), "openvino": ("openvino",)}.get(provider, ())
    for mod in extra:
        try:
            m = importlib.import_module(mod)
            v[mod] = getattr(m, "__version__", None) or m.get_version()
        except ImportError:
            v[mod] = None
    return v


def _torch_runner(provider: str, model, x, threads: int):
    """``(fn, info)``: ``fn()`` runs one forward; ``info`` adds fields to the JSON."""
    import torch

    info = {}
    cl = torch.channels_last
    if provider == "eager":
        return (lambda: model(x)), info
    if provider == "eager_cl":
        m, xc = model.to(memory_format=cl), x.contiguous(memory_format=cl)
        return (lambda: m(xc)), info
    if provider in ("effops", "effops_compile"):
        import effops

        # The model and input channels_last, as the other channels_last providers get them; the
        # speed check (which keeps the original of every block it measures slower) runs on this input.
        xc = x.contiguous(memory_format=cl)
        t0 = time.perf_counter()
        with torch.no_grad():
            fast = effops.optimize(model.to(memory_format=cl), example_inputs=(xc,))
        info["optimize_s"] = time.perf_counter() - t0
        rep = fast.effops_report
        info["effops_swapped"], info["effops_skipped"] = len(rep.swapped), len(rep.skipped)
        info["effops_kept_original"] = [m.path for m in rep.measured if m.kept == "original"]
        info["effops_speed_check"] = rep.speed_check
        try:
            w = torch.empty(1, 3, 1, 1)
            info["effops_backend"] = effops.dispatch.select("conv_bn_act", xc, w, None, None, None, None).name
        except Exception as e:  # noqa: BLE001 - a label only, never a reason to drop the measurement
            info["effops_backend"] = f"? ({type(e).__name__})"
        if provider == "effops":
            return (lambda: fast(xc)), info
        m = fast
    else:  # compile_freeze
        m, xc = model.to(memory_format=cl), x.contiguous(memory_format=cl)
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    compiled = torch.compile(m)
    return (lambda: compiled(xc)), info


def _onnxruntime_runner(model, x, threads: int, tmp: str):
    ort = _need("onnxruntime")
    _need("onnx")  # torch.onnx.export writes through it
    import torch

    info = {}
    path = os.path.join(tmp, "model.onnx")
    t0 = time.perf_counter()
    try:
        torch.onnx.export(model, (x,), path, opset_version=17, dynamo=False, input_names=["x"], output_names=["y"])
        info["onnx_exporter"] = "torchscript"
    except Exception as e:  # noqa: BLE001 - the legacy exporter is on its way out; try the dynamo one
        info["onnx_legacy_export_error"] = f"{type(e).__name__}: {_first_line(e)}"
        torch.onnx.export(model, (x,), path, opset_version=17, dynamo=True, input_names=["x"], output_names=["y"])
        info["onnx_exporter"] = "dynamo"
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    info["prepare_s"] = time.perf_counter() - t0
    name = sess.get_inputs()[0].name
    xn = x.numpy()
    return (lambda: sess.run(None, {name: xn})[0]), info


def _openvino_runner(model, x, threads: int):
    ov = _need("openvino")
    info = {}
    t0 = time.perf_counter()
    ov_model = ov.convert_model(model, example_input=x)
    core = ov.Core()
    compiled = core.compile_model(ov_model, "CPU", {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                                                     "INFERENCE_PRECISION_HINT": "f32"})
    info["prepare_s"] = time.perf_counter() - t0
    try:  # what the plugin really chose (the hint is a request)
        info["openvino_precision"] = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
        info["openvino_threads"] = int(compiled.get_property("INFERENCE_NUM_THREADS"))
    except Exception:  # noqa: BLE001 - labels only
        pass
    req = compiled.create_infer_request()
    xn = x.numpy()

    def fn():
        req.infer({0: xn}, share_inputs=True)
        return req.get_output_tensor(0).data

    return fn, info


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0][:300] if s else ""


def run(model_name: str, provider: str, batch: int, threads: int, runs: int, warmup: int) -> dict:
    rec = {"model": model_name, "provider": provider, "batch": batch, "threads": threads}
    try:
        import torch

        rec["versions"] = _versions(provider)
        if provider not in PROVIDERS:
            raise ValueError(f"unknown provider {provider!r}; one of {', '.join(PROVIDERS)}")
        # A missing runtime is a skip before any model is built.
        for mod in {"onnxruntime": ("onnxruntime", "onnx"), "openvino": ("openvino",)}.get(provider, ()):
            _need(mod)
        torch.set_num_threads(threads)
        model = build_model(model_name)
        x = make_input(batch)
        from _numerics import fp64_reference, rel_err

        ref = fp64_reference(model, x)
        with tempfile.TemporaryDirectory(prefix="effops_cpu_run_") as tmp:
            # Exporters trace the model: prepare outside inference mode, call inside it.
            t0 = time.perf_counter()
            if provider == "onnxruntime":
                fn, info = _onnxruntime_runner(model, x, threads, tmp)
            elif provider == "openvino":
                fn, info = _openvino_runner(model, x, threads)
            else:
                fn, info = _torch_runner(provider, model, x, threads)
                info.setdefault("prepare_s", time.perf_counter() - t0)
            rec.update(info)
            with torch.inference_mode():
                # The box is shared: a busy neighbour shows here (1-minute load above the thread count).
                rec["loadavg_1m_before"] = os.getloadavg()[0]
                t0 = time.perf_counter()
                out = fn()  # compiles / builds / initialises: never part of warmup or timing
                rec["first_call_s"] = time.perf_counter() - t0
                rec["rel_err_vs_fp64"] = rel_err(torch.as_tensor(out), ref)
                for _ in range(warmup):
                    fn()
                times = []
                for _ in range(runs):
                    t0 = time.perf_counter()
                    fn()
                    times.append((time.perf_counter() - t0) * 1e3)
        rec.update(median_ms=statistics.median(times), min_ms=min(times), times_ms=times, runs=runs, warmup=warmup,
                   loadavg_1m_after=os.getloadavg()[0])
    except Skip as e:
        rec["skipped"] = str(e)
    except Exception as e:  # noqa: BLE001 - one JSON line per process, whatever happened
        rec["error"] = f"{type(e).__name__}: {_first_line(e)}"
        traceback.print_exc(file=sys.stderr)  # the JSON keeps one line; the whole story goes to stderr
    rec["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return rec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help=" | ".join(MODELS))
    p.add_argument("--provider", required=True, choices=PROVIDERS)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--json", action="store_true",
                   help="stdout is the JSON line only (library chatter goes to stderr); without it a summary follows")
    args = p.parse_args(argv)
    out = sys.stdout
    if args.json:
        # Exporters and plugins print to fd 1 from C++ as well as Python; keep stdout for the result.
        out = os.fdopen(os.dup(1), "w")
        sys.stdout.flush()
        os.dup2(2, 1)
    rec = run(args.model, args.provider, args.batch, args.threads, args.runs, args.warmup)
    out.write(json.dumps(rec) + "\n")
    out.flush()
    if not args.json:
        status = rec.get("error") or rec.get("skipped") or (
            f"median {rec['median_ms']:.3f} ms, min {rec['min_ms']:.3f} ms, rel err vs fp64 {rec['rel_err_vs_fp64']:.2e}")
        print(f"{args.model} {args.provider} batch {args.batch} threads {args.threads}: {status}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
