"""Reference ops (the specification) against plain torch.nn compositions."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from effops.activations import ACTIVATIONS, activation_grad, activation_of, apply_activation, make_activation
from effops.ops import reference

from helpers import randomize_bn


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_activation_table(act):
    x = torch.randn(64, dtype=torch.float64) * 4
    x = torch.cat([x, torch.tensor([-3.0, 3.0, 0.0, 6.0], dtype=torch.float64)])
    mod = make_activation(act, 0.1)
    assert activation_of(mod) == (act, 0.1 if act == "leaky_relu" else 0.0)
    torch.testing.assert_close(apply_activation(x, act, 0.1), mod(x))
    xr = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(mod(xr), xr, torch.ones_like(x))
    torch.testing.assert_close(activation_grad(x, torch.ones_like(x), act, 0.1), g)


def test_unknown_activation_module():
    assert activation_of(nn.Softplus()) is None
    with pytest.raises(ValueError, match="unknown activation"):
        make_activation("swishy")


@pytest.mark.parametrize("training", [True, False])
def test_conv_bn_act_matches_sequential(training):
    conv, bn = nn.Conv2d(4, 6, 3, 2, 1, bias=True).double(), nn.BatchNorm2d(6, momentum=0.3).double()
    randomize_bn(bn)
    seq = nn.Sequential(conv, bn, nn.SiLU()).train(training)
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    x = torch.randn(3, 4, 9, 9, dtype=torch.float64)
    y = reference.conv_bn_act(x, conv.weight, conv.bias, bn.weight, bn.bias, rm, rv, training=training, momentum=0.3,
                              eps=bn.eps, stride=(2, 2), padding=(1, 1), act="silu")
    torch.testing.assert_close(y, seq(x))
    torch.testing.assert_close(rm, bn.running_mean)
    torch.testing.assert_close(rv, bn.running_var)


def test_fold_bn_equals_eval_bn():
    conv, bn = nn.Conv2d(4, 6, 3, padding=1, bias=True).double(), nn.BatchNorm2d(6).double()
    randomize_bn(bn)
    bn.eval()
    w, b = reference.fold_bn(conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    torch.testing.assert_close(F.conv2d(x, w, b, padding=1), bn(conv(x)))


def test_osa_aggregate_matches_cat_conv_bn_relu_ese_identity():
    inputs = [torch.randn(2, c, 5, 5, dtype=torch.float64) for c in (8, 4, 4, 4)]
    conv, bn = nn.Conv2d(20, 8, 1, bias=False).double(), nn.BatchNorm2d(8).double().eval()
    randomize_bn(bn)
    ese = nn.Conv2d(8, 8, 1, bias=True).double()
    w, b = reference.fold_bn(conv.weight, None, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
    y = reference.osa_aggregate(inputs, w, None, b, "relu", ese_weight=ese.weight, ese_bias=ese.bias, identity=inputs[0])
    agg = F.relu(bn(conv(torch.cat(inputs, 1))))
    expected = agg * F.hardsigmoid(ese(agg.mean((2, 3), keepdim=True))) + inputs[0]
    torch.testing.assert_close(y, expected)


def test_depthwise_matches_grouped_conv():
    x = torch.randn(2, 6, 9, 9, dtype=torch.float64)
    conv = nn.Conv2d(6, 6, 5, 2, 2, groups=6, bias=False).double()
    s, b = torch.rand(6, dtype=torch.float64) + 0.5, torch.randn(6, dtype=torch.float64)
    res = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    y = reference.depthwise_conv_bn_act(x, conv.weight, s, b, (2, 2), (2, 2), act="relu6", residual=res)
    torch.testing.assert_close(y, F.relu6(conv(x) * s.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)) + res)
    with pytest.raises(ValueError, match="depthwise weight"):
        reference.depthwise_conv_bn_act(x, torch.randn(6, 2, 3, 3, dtype=torch.float64), s, b)


@pytest.mark.parametrize("groups", [1, 2, 3])
def test_channel_shuffle_permutation(groups):
    x = torch.arange(12.0).view(1, 12, 1, 1).expand(2, 12, 3, 3).contiguous()
    y = reference.channel_shuffle(x, groups)
    per = 12 // groups
    for j in range(per):
        for i in range(groups):
            assert torch.equal(y[:, j * groups + i], x[:, i * per + j])
    torch.testing.assert_close(y, nn.ChannelShuffle(groups)(x))
    with pytest.raises(ValueError, match="not divisible"):
        reference.channel_shuffle(x, 5)


def test_squeeze_excite_matches_module():
    class SE(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Conv2d(8, 2, 1), nn.Conv2d(2, 8, 1)

        def forward(self, x):
            return x * torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True)))))

    se = SE().double()
    x = torch.randn(3, 8, 5, 4, dtype=torch.float64)
    y = reference.squeeze_excite(x, se.fc1.weight, se.fc1.bias, se.fc2.weight, se.fc2.bias, "relu", "sigmoid")
    torch.testing.assert_close(y, se(x))
    # eSE: no reduction, hard-sigmoid gate
    fc = nn.Linear(8, 8).double()
    y = reference.squeeze_excite(x, None, None, fc.weight, fc.bias, gate="hardsigmoid")
    torch.testing.assert_close(y, x * F.hardsigmoid(fc(x.mean((2, 3))))[:, :, None, None])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_bn_scale_bias_matches_batch_norm_and_batched_form(dtype):
    """scale/bias reproduce F.batch_norm(conv(x) + conv_bias); the foreach form over several
    BNs (FusedOSA's) gives the same values as one call per BN."""
    states, refs = [], []
    for c, with_bias in ((5, False), (7, True), (3, False)):
        cb = torch.randn(c, dtype=dtype) if with_bias else None
        g, b, m = torch.rand(c, dtype=dtype) + 0.5, torch.randn(c, dtype=dtype), torch.randn(c, dtype=dtype)
        v = torch.rand(c, dtype=dtype) + 0.5
        states.append((cb, g, b, m, v, 1e-3))
        z = torch.randn(2, c, 3, 3, dtype=torch.float64)
        want = F.batch_norm(z + (0 if cb is None else cb.double().view(1, -1, 1, 1)), m.double(), v.double(),
                            g.double(), b.double(), False, 0.0, 1e-3)
        refs.append((z, want))
    with torch.no_grad():
        many = reference.bn_scale_bias_many(states, dtype)
    one = [reference.bn_scale_bias(*st, dtype) for st in states]
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    for (s, b), (s1, b1), (z, want) in zip(many, one, refs):
        assert s.dtype == b.dtype == dtype
        torch.testing.assert_close(s, s1, rtol=tol, atol=tol)
        torch.testing.assert_close(b, b1, rtol=tol, atol=tol)
        got = z * s.double().view(1, -1, 1, 1) + b.double().view(1, -1, 1, 1)
        torch.testing.assert_close(got, want, rtol=tol * 10, atol=tol * 10)
