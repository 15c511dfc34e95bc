"""``effops.info()`` and ``python -m effops info``: which implementation runs here, and why."""
import json
import os
import subprocess
import sys

import pytest
import torch

import effops
from effops import dispatch, tuning
from effops.__main__ import main

TILE = dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=3)
TMA = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=3, TMA=True, FALLBACK=TILE)
VENDOR = {"VENDOR": "cudnn_relu"}
KEYS = {"conv-vendor": VENDOR, "conv-tma": TMA, "depthwise-tile": dict(BLOCK_P=64, BLOCK_C=64, num_warps=4)}


def _write_tuning_file(cache_dir) -> str:
    path = os.path.join(str(cache_dir), os.path.basename(tuning.cache_path("cpu")))
    tuning._write_file(path, {"cpu": {tuning.encode_key((k, 1024, torch.float16)): c for k, c in KEYS.items()}})
    return path


def _run_cli(*args, **env):
    full = dict(os.environ, **env)
    for k, v in env.items():
        if v is None:
            del full[k]
    r = subprocess.run([sys.executable, "-m", "effops", "info", *args], env=full, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_info_returns_the_documented_keys(monkeypatch, tmp_path):
    monkeypatch.setenv("EFFOPS_CACHE_DIR", str(tmp_path))
    path = _write_tuning_file(tmp_path)
    data = effops.info()
    assert set(data) == {"versions", "devices", "interpreter", "backend_order", "cpu_preference", "native",
                         "forced_backend", "probe", "backends", "vendor", "tuning"}
    usable, detail = effops.native.status()
    assert data["native"]["usable"] is usable and data["native"]["detail"] == detail
    assert data["cpu_preference"] == dispatch.CPU_PREFERENCE
    assert set(data["versions"]) == {"effops", "torch", "triton", "cuda", "cudnn"}
    assert data["versions"]["torch"] == torch.__version__ and data["versions"]["effops"] == effops.__version__
    assert data["devices"][0] == {"device": "cpu", "name": data["devices"][0]["name"], "kind": "cpu"}
    assert len(data["devices"]) == 1 + (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert data["backend_order"] == list(dispatch.BACKEND_ORDER)
    # Every registered op, every device, every backend, with the dispatcher's own reasons.
    assert set(data["backends"]) == set(dispatch._REGISTRY) >= {"conv_bn_act", "osa_block"}
    for op, per_dev in data["backends"].items():
        assert set(per_dev) == {d["device"] for d in data["devices"]}
        for dev, backends in per_dev.items():
            assert set(backends) == set(dispatch.BACKEND_ORDER)
            assert backends["reference"] == {"usable": True, "reasons": []}, (op, dev)
    cpu_triton = data["backends"]["conv_bn_act"]["cpu"]["triton"]
    from effops.ops import conv
    asked = dispatch.triton_on_cpu_allowed()
    assert cpu_triton["usable"] == (conv.INTERPRETED and asked) and bool(cpu_triton["reasons"]) != cpu_triton["usable"]
    cpu_native = data["backends"]["conv_bn_act"]["cpu"]["native"]
    assert cpu_native["usable"] is usable and bool(cpu_native["reasons"]) is not usable
    assert data["vendor"]["cpu"]["cudnn"] == {"usable": False, "reasons": ["cuDNN runs on cuda tensors, got cpu"]}
    t = data["tuning"]
    assert set(t) == {"autotune", "file_cache", "cache_dir", "path", "files", "in_memory"}
    assert t["cache_dir"] == str(tmp_path) and (t["path"] == path) == (not torch.cuda.is_available())
    (f,) = [f for f in t["files"] if f["path"] == path]
    assert f["exists"] and f["current"] and f["entries"] == 3 and f["device_kinds"] == ["cpu"]
    impls = {p["key"].split("'")[1]: p["implementation"] for p in f["problems"]}
    assert impls["conv-vendor"] == "vendor cudnn_relu (cuDNN)"
    assert impls["conv-tma"].startswith("triton TMA tile 128x128x64") and "fallback: triton tile 64x32x32" in impls[
        "conv-tma"]
    assert impls["depthwise-tile"].startswith("triton tile 64x64")
    json.dumps(data)  # JSON-serialisable as it is


def test_info_lists_every_tuning_file_in_the_cache_dir(monkeypatch, tmp_path):
    """Files of other GPU kinds (tuned on another machine, shared cache dir) and of other
    torch / Triton versions are listed too, marked by whether their versions are these."""
    monkeypatch.setenv("EFFOPS_CACHE_DIR", str(tmp_path))
    h100 = tuning.cache_path("NVIDIA H100 80GB HBM3 sm_90")
    tuning._write_file(h100, {"NVIDIA H100 80GB HBM3 sm_90": {"('conv',)": VENDOR}})
    old = os.path.join(str(tmp_path), "tuning-nvidia-h100-80gb-hbm3-sm_90-torch2.0.0-triton2.0.0.json")
    tuning._write_file(old, {"NVIDIA H100 80GB HBM3 sm_90": {"('conv',)": TILE, "('dw',)": TILE}})
    files = {f["path"]: f for f in effops.info()["tuning"]["files"]}
    assert files[h100]["current"] and files[h100]["entries"] == 1
    assert files[h100]["problems"][0]["implementation"] == "vendor cudnn_relu (cuDNN)"
    assert not files[old]["current"] and files[old]["entries"] == 2


def test_info_lists_what_this_process_tuned(monkeypatch):
    import collections

    monkeypatch.setattr(tuning, "_CACHE", collections.OrderedDict({("cpu", ("conv", 8, torch.float32)): VENDOR}))
    monkeypatch.setattr(tuning, "_STORE", {})
    (entry,) = effops.info()["tuning"]["in_memory"]
    assert entry == {"device_kind": "cpu", "key": "('conv', 8, 'torch.float32')",
                     "implementation": "vendor cudnn_relu (cuDNN)", "config": VENDOR}


def test_info_reports_a_probe_that_fails_instead_of_raising(monkeypatch):
    from effops import diagnostics

    monkeypatch.setitem(diagnostics.PROBES, "conv_bn_act", lambda x: 1 / 0)
    entry = effops.info()["backends"]["conv_bn_act"]["cpu"]["triton"]
    assert entry["usable"] is None and entry["reasons"][0].startswith("probe failed: ZeroDivisionError")


def test_cli_prints_backends_reasons_versions_and_the_tuning_file(tmp_path):
    path = _write_tuning_file(tmp_path)
    out = _run_cli(EFFOPS_CACHE_DIR=str(tmp_path), TRITON_INTERPRET=None, EFFOPS_BACKEND=None, EFFOPS_TUNING_CACHE="1")
    assert f"torch {torch.__version__}" in out and "triton " in out
    assert "Triton interpreter: off" in out
    assert "native CPU backend: " in out and "CPU tensors prefer" in out
    for op in ("conv_bn_act", "osa_block"):
        block = out.split(f"  {op} on cpu:\n", 1)[1]
        native_line, triton_line, reference_line = block.splitlines()[:3]
        assert native_line.split()[0] == "native"
        # Without the interpreter, CPU tensors can't run the Triton kernels: said, with the way out.
        assert triton_line.split()[:3] == ["triton", "not", "usable:"] and "TRITON_INTERPRET=1" in triton_line
        assert reference_line.split() == ["reference", "usable"]
    assert "cuDNN candidates in the conv tuner on cpu: not offered: cuDNN runs on cuda tensors" in out
    assert f"{path} (" in out and "3 entries" in out
    assert "vendor cudnn_relu (cuDNN)" in out and "triton TMA tile 128x128x64" in out
    assert "tuning files on" in out


def test_cli_under_the_interpreter_and_as_json(tmp_path):
    # The interpreter runs CPU tensors when asked: EFFOPS_CPU_BACKEND=triton (the tests' triton pass).
    out = _run_cli(EFFOPS_CACHE_DIR=str(tmp_path), TRITON_INTERPRET="1", EFFOPS_TUNING_CACHE="0",
                   EFFOPS_CPU_BACKEND="triton")
    block = out.split("  conv_bn_act on cpu:\n", 1)[1]
    assert block.splitlines()[1].split() == ["triton", "usable"]
    assert "tuning files off (EFFOPS_TUNING_CACHE=0)" in out and "no file" in out
    data = json.loads(_run_cli("--json", EFFOPS_CACHE_DIR=str(tmp_path), TRITON_INTERPRET="1",
                               EFFOPS_CPU_BACKEND="triton"))
    assert data["interpreter"] is True and data["backends"]["conv_bn_act"]["cpu"]["triton"]["usable"] is True
    # Not asked: the interpreter is there, but CPU tensors go to the native backend, and triton says why.
    data = json.loads(_run_cli("--json", EFFOPS_CACHE_DIR=str(tmp_path), TRITON_INTERPRET="1",
                               EFFOPS_CPU_BACKEND="native"))
    why = data["backends"]["conv_bn_act"]["cpu"]["triton"]["reasons"]
    assert any("only when asked" in r for r in why)


def test_main_dispatches_the_info_subcommand(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("EFFOPS_CACHE_DIR", str(tmp_path))
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "conv_bn_act on cpu:" in out and "in memory (this process)" in out
    with pytest.raises(SystemExit):  # the main job's options are still its own
        main(["--model"])
