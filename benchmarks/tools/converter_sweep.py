"""effops.optimize over real timm / torchvision CNNs: coverage and structural correctness.

For each model (random weights, non-trivial BN statistics), optimize() is called with
the model in *train* mode, then:
  * swapped / traced / skipped counts from the report;
  * "fp64 struct": the optimized model computed in fp64 against the original in fp64,
    which isolates rewrite errors from fp32 conditioning;
  * "fp32 effops" and "fp32 eager": each fp32 output against the original in fp64;
  * "train diff": max |optimized - original| in train mode (must be 0: same code runs).
No GPU needed: effops' reference backend computes the fused graph.

    python benchmarks/tools/converter_sweep.py                       # the default list
    python benchmarks/tools/converter_sweep.py resnet50d,tv.googlenet
"""
import copy
import sys
import warnings

import torch

import effops

try:
    from effops.benchmark import randomize_bn
except ImportError:  # checkouts where randomize_bn lives in the main job
    from effops.__main__ import randomize_bn

MODELS = ("resnet50d,resnext50_32x4d,seresnet50,regnetx_002,mobilenetv3_large_100,mixnet_s,ghostnet_100,repvgg_a2,"
          "dla34,densenet121,cspresnet50,dpn68,rexnet_100,tf_efficientnet_b0,mnasnet_100,resnest14d,selecsls42b,"
          "vovnet39a,xception41,hrnet_w18_small,res2net50_14w_8s,gernet_s,regnetz_b16,efficientnetv2_rw_t,lcnet_050,"
          "hardcorenas_a,fbnetv3_b,cs3darknet_s,darknet53,ese_vovnet19b_dw,tinynet_a,resnetv2_50,vgg11_bn,"
          "tv.googlenet,tv.mobilenet_v3_large,tv.regnet_x_400mf,tv.wide_resnet50_2,tv.shufflenet_v2_x1_0,"
          "tv.mnasnet1_0,tv.resnext50_32x4d")


def build(name):
    if name.startswith("tv."):
        import torchvision

        kw = {"aux_logits": False, "init_weights": True} if name == "tv.googlenet" else {}
        return getattr(torchvision.models, name[3:])(num_classes=10, **kw)
    import timm

    return timm.create_model(name, pretrained=False, num_classes=10)


def rel(a, b):
    a = a[0] if isinstance(a, tuple) else a
    b = b[0] if isinstance(b, tuple) else b
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main(names):
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    print(f"{'model':26s}{'swapped':>8s}{'traced':>8s}{'skipped':>8s}{'fp64 struct':>13s}{'fp32 effops':>13s}"
          f"{'fp32 eager':>12s}{'train diff':>12s}")
    for name in names:
        try:
            model = build(name)
            randomize_bn(model)
            model.train()
            fast = effops.optimize(model)
            model.eval(), fast.eval()
            rep = fast.effops_report
            x = torch.randn(2, 3, 96, 96)
            with torch.no_grad(), effops.use_backend("reference"):
                ref64 = copy.deepcopy(model).double()(x.double())
                struct = rel(copy.deepcopy(fast).double()(x.double()), ref64)
                ours, eager = rel(fast(x), ref64), rel(model(x), ref64)
            model.train(), fast.train()
            torch.manual_seed(0)
            a = fast(x)
            torch.manual_seed(0)
            b = model(x)
            a, b = (a[0], b[0]) if isinstance(a, tuple) else (a, b)
            traced = sum("[traced]" in e.what for e in rep.swapped)
            print(f"{name:26s}{len(rep.swapped):8d}{traced:8d}{len(rep.skipped):8d}{struct:13.1e}{ours:13.1e}"
                  f"{eager:12.1e}{(a - b).abs().max().item():12.1e}", flush=True)
        except Exception as e:  # noqa: BLE001 - one model failing must not hide the others
            print(f"{name:26s} ERROR {type(e).__name__}: {str(e).splitlines()[0][:150] if str(e) else ''}", flush=True)


if __name__ == "__main__":
    main((sys.argv[1] if len(sys.argv) > 1 else MODELS).split(","))
