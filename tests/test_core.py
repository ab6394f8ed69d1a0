"""core/: schedules, parameter groups, clipping, LARS, atomic checkpoints, loading pretrained
backbones from every supported checkpoint layout, checkpoint args, bool_flag, the precision
flags and step, the one-line error edge."""
import argparse
import copy
import os

import numpy as np
import pytest
import torch
import torch.nn as nn

from core import amp, cli
from core.checkpoint import checkpoint_args, load_pretrained_weights, save_atomic
from core.model_flags import load_backbone
from core.logger import bool_flag
from core.optim import (LARS, clip_gradients, cosine_scheduler,
                        get_params_groups, lr_for_batch)
from models import build_backbone


# ============ cosine_scheduler ============

def test_cosine_scheduler_warmup_and_cosine():
    base, final, epochs, niter, warmup = 0.5, 0.01, 10, 7, 2
    s = cosine_scheduler(base, final, epochs, niter, warmup_epochs=warmup, start_warmup_value=0.1)
    assert len(s) == epochs * niter
    w = warmup * niter
    assert s[0] == pytest.approx(0.1)  # warmup starts at start_warmup_value
    assert s[w - 1] == pytest.approx(base)  # ... and reaches base on its last iteration
    np.testing.assert_allclose(np.diff(s[:w]), (base - 0.1) / (w - 1))  # linearly
    assert s[w] == pytest.approx(base)  # the cosine starts at base
    assert np.all(np.diff(s[w:]) < 0)  # and decreases monotonically towards final
    assert final < s[-1] < final + 1e-2 * (base - final)
    # closed form of the cosine part
    k = np.arange(len(s) - w)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * k / len(k)))
    np.testing.assert_allclose(s[w:], cosine)


def test_cosine_scheduler_without_warmup_and_constant():
    s = cosine_scheduler(1.0, 0.0, 3, 4)
    assert len(s) == 12 and s[0] == 1.0 and s[6] == pytest.approx(0.5)  # halfway: the mean
    np.testing.assert_allclose(cosine_scheduler(0.04, 0.04, 2, 5), 0.04)  # base == final
    assert lr_for_batch(0.3, 512) == pytest.approx(0.6)  # linear scaling rule, per 256


# ============ get_params_groups ============

def test_params_groups_regularize_only_matrices():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos_embed = nn.Parameter(torch.zeros(1, 5, 4))
            self.fc = nn.Linear(4, 4)
            self.norm = nn.LayerNorm(4)
            self.scale = nn.Parameter(torch.ones(4))  # 1-D without a ".bias" name
            self.frozen = nn.Linear(4, 4)
            self.frozen.requires_grad_(False)

    net = Net()
    reg, not_reg = get_params_groups(net)
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(reg["params"]) == ids([net.pos_embed, net.fc.weight])
    assert ids(not_reg["params"]) == ids([net.fc.bias, net.norm.weight, net.norm.bias, net.scale])
    assert not_reg["weight_decay"] == 0.0 and "weight_decay" not in reg


def test_params_groups_on_a_vit():
    vit, _ = build_backbone("vit_tiny", patch_size=4, img_size=[16])
    reg, not_reg = get_params_groups(vit)
    names = {id(p): n for n, p in vit.named_parameters()}
    reg_names = {names[id(p)] for p in reg["params"]}
    assert {"pos_embed", "cls_token", "patch_embed.proj.weight"} <= reg_names  # DINO decays them
    assert all(p.ndim > 1 for p in reg["params"]) and all(p.ndim == 1 for p in not_reg["params"])
    assert len(reg["params"]) + len(not_reg["params"]) == len(list(vit.parameters()))


# ============ clipping and frozen last layer ============

def test_clip_gradients_is_per_parameter():
    net = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Linear(4, 2, bias=False))
    big = torch.full((4, 3), 10.0)
    small = torch.full((2, 4), 0.1)  # norm 0.283 < clip: must stay exactly as it is
    net[0].weight.grad, net[1].weight.grad = big.clone(), small.clone()
    clip_gradients(net, 1.0)
    assert net[0].weight.grad.norm().item() == pytest.approx(1.0, rel=1e-5)
    torch.testing.assert_close(net[0].weight.grad, big / big.norm(), rtol=1e-5, atol=0)
    # a global-norm clip (torch.nn.utils.clip_grad_norm_) would have shrunk this one too
    assert torch.equal(net[1].weight.grad, small)
    net[0].weight.grad = None  # parameters without a gradient are skipped
    clip_gradients(net, 1.0)
    assert net[0].weight.grad is None


def dino_clip_gradients(model, clip):
    """facebookresearch/dino utils.clip_gradients, a loop over the parameters (the reference)."""
    for p in model.parameters():
        if p.grad is not None:
            param_norm = p.grad.data.norm(2)
            clip_coef = clip / (param_norm + 1e-6)
            if clip_coef < 1:
                p.grad.data.mul_(clip_coef)


def _random_grads(model, seed):
    g = torch.Generator().manual_seed(seed)
    for i, p in enumerate(model.parameters()):
        if i % 7 != 3:  # a few parameters without a gradient
            scale = 10 ** torch.empty(()).uniform_(-3, 2, generator=g)  # below and above clip
            p.grad = torch.randn(p.shape, generator=g) * scale


def test_clip_gradients_equals_dino_loop_exactly():
    ours, _ = build_backbone("vit_nano", patch_size=4, img_size=[16])
    dinos, _ = build_backbone("vit_nano", patch_size=4, img_size=[16])
    _random_grads(ours, 0)
    _random_grads(dinos, 0)
    clip_gradients(ours, 3.0)
    dino_clip_gradients(dinos, 3.0)
    clipped = kept = 0
    for (n, a), b in zip(ours.named_parameters(), dinos.parameters()):
        assert (a.grad is None) == (b.grad is None), n
        if a.grad is not None:
            assert torch.equal(a.grad, b.grad), n
            clipped += bool(a.grad.norm() > 2.99)
            kept += bool(a.grad.norm() < 2.99)
    assert clipped > 0 and kept > 0  # both cases occurred


def test_cancel_gradients_last_layer():
    from methods.dino import cancel_gradients_last_layer
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = nn.Linear(3, 3)
            self.last_layer = nn.Linear(3, 2)

    head = Head()
    head.last_layer(head.mlp(torch.randn(2, 3))).sum().backward()
    cancel_gradients_last_layer(epoch=1, model=head, freeze_last_layer=1)  # epoch >= freeze: kept
    assert head.last_layer.weight.grad is not None
    cancel_gradients_last_layer(epoch=0, model=head, freeze_last_layer=1)
    assert head.last_layer.weight.grad is None and head.last_layer.bias.grad is None
    assert head.mlp.weight.grad is not None and head.mlp.bias.grad is not None


# ============ LARS ============

def test_lars_adapts_matrices_and_leaves_vectors_alone():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(3, 4))
    b = nn.Parameter(torch.randn(3))
    zero = nn.Parameter(torch.zeros(2, 2))  # zero norm: trust ratio falls back to 1
    lr, wd, eta, momentum = 0.5, 0.1, 0.001, 0.9
    opt = LARS([{"params": [w, zero], "weight_decay": wd}, {"params": [b], "weight_decay": wd}],
               lr=lr, eta=eta, momentum=momentum)
    w0, b0 = w.detach().clone(), b.detach().clone()
    gw, gb, gz = torch.randn(3, 4), torch.randn(3), torch.randn(2, 2)

    w.grad, b.grad, zero.grad = gw.clone(), gb.clone(), gz.clone()
    opt.step()
    dw = gw + wd * w0
    mu_w = dw * (eta * w0.norm() / dw.norm())
    torch.testing.assert_close(w.detach(), w0 - lr * mu_w)
    torch.testing.assert_close(b.detach(), b0 - lr * gb)  # 1-D: no decay, no trust ratio
    torch.testing.assert_close(zero.detach(), -lr * gz)  # wd * 0 = 0, ratio 1

    # second step: momentum accumulates the adapted update
    w1, b1 = w.detach().clone(), b.detach().clone()
    w.grad, b.grad = gw.clone(), gb.clone()
    opt.step()
    dw = gw + wd * w1
    mu_w = momentum * mu_w + dw * (eta * w1.norm() / dw.norm())
    torch.testing.assert_close(w.detach(), w1 - lr * mu_w)
    torch.testing.assert_close(b.detach(), b1 - lr * (momentum * gb + gb))


class LoopLARS(torch.optim.Optimizer):
    """The LARS step as a loop over the parameters (this repository's until issue 20): the
    reference the multi-tensor LARS must equal bit for bit."""

    def __init__(self, params, lr=0, weight_decay=0, momentum=0.9, eta=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if p.ndim != 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    param_norm, update_norm = torch.norm(p), torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(param_norm > 0.0, torch.where(
                        update_norm > 0, g["eta"] * param_norm / update_norm, one), one)
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                state["mu"].mul_(g["momentum"]).add_(dp)
                p.add_(state["mu"], alpha=-g["lr"])


def _lars_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3), nn.Linear(3, 2))
    with torch.no_grad():
        net[3].weight.zero_()  # a zero norm: trust ratio 1
    return net


def _lars(cls, net, lr=0.3):
    groups = get_params_groups(net)
    groups[0]["weight_decay"] = 1e-2
    return cls(groups, lr=lr)


def _lars_steps(cls, steps=3, scaler=None, unscale=True):
    net = _lars_net()
    opt = _lars(cls, net)
    for it in range(steps):
        x = torch.randn(8, 6, generator=torch.Generator().manual_seed(it))
        loss = net(x).square().mean()
        if scaler is None:
            opt.zero_grad()
            loss.backward()
            if it == 1:
                net[2].bias.grad = None  # a parameter without a gradient this step
            opt.step()
        elif unscale:
            amp.backward_step(loss, opt, scaler, after_unscale=lambda: clip_gradients(net, 0.5))
        else:  # no unscale_: the step gets grad_scale and unscales the gradients itself
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    return net, opt


def _same(net_a, opt_a, net_b, opt_b):
    for (n, a), b in zip(net_a.named_parameters(), net_b.parameters()):
        assert torch.equal(a, b), n
        assert torch.equal(opt_a.state[a]["mu"], opt_b.state[b]["mu"]), n


def test_lars_equals_the_per_parameter_loop_exactly():
    _same(*_lars_steps(LARS), *_lars_steps(LoopLARS))


@pytest.mark.parametrize("unscale", [True, False])
def test_lars_under_fp16_scaler_has_no_host_sync_and_skips_non_finite_steps(monkeypatch,
                                                                            unscale):
    """GradScaler.step reads found_inf on the host (.item()) before stepping an optimizer that
    cannot skip the step itself; LARS takes found_inf (and grad_scale) and skips on the device.
    A CPU GradScaler stands in for the fp16 one."""
    def scaler():
        return torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)

    want = _lars_steps(LoopLARS, scaler=scaler(), unscale=unscale)

    def no_sync(*args):
        raise AssertionError("host sync in the step")

    monkeypatch.setattr(torch.Tensor, "item", no_sync)
    got = _lars_steps(LARS, scaler=scaler(), unscale=unscale)
    _same(*got, *want)
    with pytest.raises(AssertionError, match="host sync"):
        _lars_steps(LoopLARS, scaler=scaler(), unscale=unscale)

    # a step with a non-finite gradient leaves parameters and momentum exactly as they were
    net, opt = got
    before = copy.deepcopy((net.state_dict(), opt.state_dict()))
    s = scaler()
    loss = net(torch.full((2, 6), float("inf"))).sum()
    if unscale:
        amp.backward_step(loss, opt, s, after_unscale=lambda: clip_gradients(net, 0.5))
    else:
        opt.zero_grad()
        s.scale(loss).backward()
        s.step(opt)
        s.update()
    monkeypatch.undo()
    assert s.get_scale() == 2.0 ** 9  # the scaler saw the inf
    after = (net.state_dict(), opt.state_dict())
    for k, v in before[0].items():
        assert torch.equal(after[0][k], v), k
    for k, v in before[1]["state"].items():
        assert torch.equal(after[1]["state"][k]["mu"], v["mu"]), k


def test_adamw_and_sgd_are_fused_on_cpu_where_torch_has_the_kernels():
    from core.optim import build_optimizer, fused_supported
    net = nn.Linear(3, 2)
    cpu = torch.device("cpu")
    assert fused_supported(torch.device("cuda"))
    for name in ("adamw", "sgd"):
        opt = build_optimizer(name, get_params_groups(net), cpu)
        assert bool(opt.defaults.get("fused")) == fused_supported(cpu)
    if torch.__version__ >= "2.4":
        assert fused_supported(cpu)


def test_channels_last_inputs_only_for_convolutional_backbones_on_cuda():
    from train_ssl import input_channels_last, to_device

    class Method(nn.Module):
        def __init__(self, backbone):
            super().__init__()
            self.backbone = backbone

        def eval_backbone(self):
            return self.backbone

    vit, _ = build_backbone("vit_nano", patch_size=4, img_size=[16])
    resnet, _ = build_backbone("resnet18", cifar_stem=True)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert input_channels_last(Method(resnet), cuda)
    assert not input_channels_last(Method(vit), cuda) and not input_channels_last(Method(resnet), cpu)
    views = [torch.randn(2, 3, 8, 8), torch.randn(2, 3, 4, 4)]
    moved = to_device(views, cpu, channels_last=True)
    assert all(v.is_contiguous(memory_format=torch.channels_last) and not v.is_contiguous()
               for v in moved)
    assert all(v.is_contiguous() for v in to_device(views, cpu))


# ============ save_atomic ============

def test_save_atomic_replaces_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "checkpoint.pth"
    save_atomic({"epoch": 1, "w": torch.ones(2)}, str(path))
    save_atomic({"epoch": 2, "w": torch.zeros(2)}, str(path))
    assert os.listdir(tmp_path) == ["checkpoint.pth"]
    assert torch.load(path)["epoch"] == 2


def test_failed_save_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pth"
    save_atomic({"epoch": 1}, str(path))
    with pytest.raises(Exception):
        save_atomic({"epoch": 2, "oops": lambda: 0}, str(path))  # lambdas do not pickle
    assert os.listdir(tmp_path) == ["checkpoint.pth"]
    assert torch.load(path)["epoch"] == 1


# ============ load_pretrained_weights ============

def _resnet():
    torch.manual_seed(0)
    return build_backbone("resnet18", cifar_stem=True)[0]


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_load_strips_ddp_and_wrapper_prefixes_and_drops_head(tmp_path):
    src = _resnet()
    teacher = {f"module.backbone.{k}": v for k, v in src.state_dict().items()}
    teacher["module.head.mlp.0.weight"] = torch.randn(7, 512)  # DINO head: not a backbone key
    torch.save({"teacher": teacher, "student": {}, "epoch": 3}, tmp_path / "dino.pth")
    dst = build_backbone("resnet18", cifar_stem=True)[0]
    msg = load_pretrained_weights(dst, str(tmp_path / "dino.pth"), "teacher")
    assert msg.unexpected_keys == [] and msg.missing_keys == []  # the head key was dropped
    _assert_same_weights(dst, src)


def test_load_falls_back_to_simclr_model_key(tmp_path):
    src = _resnet()
    model = {f"backbone.{k}": v for k, v in src.state_dict().items()}
    model["head.0.weight"] = torch.randn(16, 512)  # SimCLR projection head
    torch.save({"model": model, "epoch": 1}, tmp_path / "simclr.pth")
    dst = build_backbone("resnet18", cifar_stem=True)[0]
    msg = load_pretrained_weights(dst, str(tmp_path / "simclr.pth"), "teacher")
    assert msg.unexpected_keys == [] and msg.missing_keys == []
    _assert_same_weights(dst, src)


def test_load_bare_state_dict(tmp_path):
    src = _resnet()
    torch.save(src.state_dict(), tmp_path / "bare.pth")
    dst = build_backbone("resnet18", cifar_stem=True)[0]
    load_pretrained_weights(dst, str(tmp_path / "bare.pth"))
    _assert_same_weights(dst, src)


@pytest.mark.parametrize("arch", ["resnet34", "vit_tiny"])
def test_load_refuses_mismatched_arch_with_one_line(tmp_path, arch):
    torch.save({"model": {f"backbone.{k}": v for k, v in _resnet().state_dict().items()}},
               tmp_path / "r18.pth")
    dst = build_backbone(arch, patch_size=4, img_size=[16], cifar_stem=True)[0]
    with pytest.raises(ValueError) as e:
        load_pretrained_weights(dst, str(tmp_path / "r18.pth"))
    msg = str(e.value)
    assert "\n" not in msg and "--arch" in msg


def test_load_refuses_other_vit_width_and_missing_file(tmp_path):
    torch.save(build_backbone("vit_tiny", patch_size=4, img_size=[16])[0].state_dict(),
               tmp_path / "tiny.pth")
    small = build_backbone("vit_small", patch_size=4, img_size=[16])[0]
    with pytest.raises(ValueError, match=r"does not fit"):
        load_pretrained_weights(small, str(tmp_path / "tiny.pth"))
    with pytest.raises(FileNotFoundError, match=r"does not exist"):
        load_pretrained_weights(small, str(tmp_path / "nope.pth"))


def test_load_adopts_a_different_pos_embed_grid(tmp_path):
    torch.manual_seed(0)
    src = build_backbone("vit_tiny", patch_size=4, img_size=[16])[0]  # 4x4 grid + CLS
    with torch.no_grad():
        src.pos_embed.normal_()
    torch.save({"teacher": {f"backbone.{k}": v for k, v in src.state_dict().items()}},
               tmp_path / "vit.pth")
    dst = build_backbone("vit_tiny", patch_size=4, img_size=[32])[0]  # 8x8 grid + CLS
    assert dst.pos_embed.shape[1] == 65
    load_pretrained_weights(dst, str(tmp_path / "vit.pth"))
    assert dst.pos_embed.shape == (1, 17, 192)
    _assert_same_weights(dst, src)
    src.eval(), dst.eval()
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(dst(x), src(x))
    assert dst(torch.randn(2, 3, 32, 32)).shape == (2, 192)  # interpolated to the 8x8 grid


# ============ bool_flag ============

@pytest.mark.parametrize("text, value", [("true", True), ("True", True), ("1", True), ("on", True),
                                         ("yes", True), ("false", False), ("FALSE", False),
                                         ("0", False), ("off", False), ("no", False)])
def test_bool_flag(text, value):
    assert bool_flag(text) is value


def test_bool_flag_rejects_other_words():
    with pytest.raises(argparse.ArgumentTypeError):
        bool_flag("maybe")
    parser = argparse.ArgumentParser()
    parser.add_argument("--flag", type=bool_flag, default=True)
    assert parser.parse_args(["--flag", "false"]).flag is False
    with pytest.raises(SystemExit):
        parser.parse_args(["--flag", "2"])


# ============ checkpoint args: ours (dict) and DINO's (Namespace) ============

def test_checkpoint_args_reads_dict_and_namespace(tmp_path):
    backbone = build_backbone("vit_tiny", patch_size=4, img_size=[16])[0]
    weights = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    flags = {"arch": "vit_tiny", "patch_size": 4, "input_size": 16, "cifar_stem": False}
    for i, stored in enumerate((flags, argparse.Namespace(**flags))):  # ours, DINO's
        path = tmp_path / f"ckpt{i}.pth"
        torch.save({"teacher": weights, "args": stored}, path)
        assert checkpoint_args(torch.load(path, weights_only=False)) == flags
        args = argparse.Namespace(pretrained_weights=str(path), checkpoint_key="teacher",
                                  arch=None, patch_size=None, cifar_stem=None)
        loaded, dim = load_backbone(args)  # model flags come from either kind of args
        assert (args.arch, args.patch_size, args.image_size, dim) == ("vit_tiny", 4, 16, 192)
        torch.testing.assert_close(loaded.state_dict(), backbone.state_dict())
    assert checkpoint_args({"model": {}}) == {} and checkpoint_args(None) == {}


# ============ precision ============

@pytest.mark.parametrize("precision,use_fp16,expected", [
    (None, None, "bf16"), ("fp16", None, "fp16"), ("fp32", None, "fp32"),
    (None, True, "fp16"), (None, False, "fp32"),  # DINO's --use_fp16, DINO's meaning
    ("fp16", True, "fp16"), ("fp32", False, "fp32")])
def test_precision_flags(precision, use_fp16, expected):
    args = argparse.Namespace(precision=precision, use_fp16=use_fp16)
    assert amp.resolve_precision(args, "cuda") == expected == args.precision
    args = argparse.Namespace(precision=precision, use_fp16=use_fp16)
    assert amp.resolve_precision(args, "cpu") == "fp32"  # CPU always fp32


def test_mixed_precision_asked_on_cpu_says_it_trains_in_fp32(capsys, monkeypatch):
    """--precision fp16 (or bf16, or DINO's --use_fp16 true) on CPU trained in fp32 with only the
    args dump showing it: one note line. The default (unset) and fp32 say nothing, nor do ranks
    other than 0."""
    monkeypatch.delenv("RANK", raising=False)
    for precision, use_fp16, flag in (("fp16", None, "--precision fp16"),
                                      ("bf16", None, "--precision bf16"),
                                      (None, True, "--use_fp16 true")):
        assert amp.resolve_precision(argparse.Namespace(precision=precision, use_fp16=use_fp16),
                                     "cpu") == "fp32"
        out = capsys.readouterr().out
        assert out == f"note: {flag} is CUDA-only here; training in fp32 on cpu (mixed precision " \
                      "runs only on CUDA GPUs)\n", out
    for precision in (None, "fp32"):
        amp.resolve_precision(argparse.Namespace(precision=precision, use_fp16=None), "cpu")
    amp.resolve_precision(argparse.Namespace(precision="fp16", use_fp16=None), "cuda")
    monkeypatch.setenv("RANK", "1")
    amp.resolve_precision(argparse.Namespace(precision="fp16", use_fp16=None), "cpu")
    assert capsys.readouterr().out == ""


def test_precision_flags_in_conflict():
    for precision, use_fp16 in (("bf16", True), ("fp16", False), ("fp32", True)):
        with pytest.raises(ValueError, match=f"--precision {precision} contradicts"):
            amp.resolve_precision(argparse.Namespace(precision=precision, use_fp16=use_fp16), "cpu")


def test_backward_step_is_a_plain_step_without_fp16():
    """bf16/fp32: the disabled scaler reduces the step to backward, the caller's gradient edit
    (clipping here), optimizer.step: the same parameters as writing it out by hand."""
    torch.manual_seed(0)
    a, x = nn.Linear(4, 3), torch.randn(5, 4)
    b = nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    opt_a, opt_b = torch.optim.SGD(a.parameters(), lr=0.1), torch.optim.SGD(b.parameters(), lr=0.1)
    scaler = amp.grad_scaler("fp32", "cpu")
    assert not scaler.is_enabled() and not amp.grad_scaler("bf16", "cpu").is_enabled()
    for _ in range(3):
        with amp.autocast("fp32", "cpu"):
            loss = a(x).pow(2).sum()
        amp.backward_step(loss, opt_a, scaler, after_unscale=lambda: clip_gradients(a, 0.5))
        opt_b.zero_grad()
        b(x).pow(2).sum().backward()
        clip_gradients(b, 0.5)
        opt_b.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb)


# ============ TF32: a visible flag, and the exact parts in full float32 ============

@pytest.fixture
def restore_tf32():
    state = amp.tf32_state()
    yield
    amp.set_tf32_state(state)


def _precisions():
    return torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision


needs_new_api = pytest.mark.skipif(not amp._new_tf32_api(), reason="torch < 2.9: no fp32_precision")


@needs_new_api
def test_tf32_flag_sets_the_precision_and_full_fp32_restores_it(restore_tf32):
    from train_ssl import get_args_parser, parse_args
    assert parse_args(["--method", "dino"]).tf32 is True
    assert parse_args(["--method", "dino", "--tf32", "false"]).tf32 is False
    assert "--tf32" in get_args_parser("dino").format_help()
    amp.set_tf32(True)
    assert _precisions() == ("tf32", "tf32")
    with amp.full_fp32():
        assert _precisions() == ("ieee", "ieee")
        with amp.full_fp32():  # nested: the outer state comes back
            pass
        assert _precisions() == ("ieee", "ieee")
    assert _precisions() == ("tf32", "tf32")
    with pytest.raises(RuntimeError), amp.full_fp32():
        raise RuntimeError  # restored on the way out of an error too
    assert _precisions() == ("tf32", "tf32")
    amp.set_tf32(False)
    assert _precisions() == ("ieee", "ieee")


@needs_new_api
def test_exact_parts_run_in_full_fp32_under_tf32(restore_tf32):
    """Under --tf32 true, the products that must be exact see "ieee" when they launch: the
    device augmentation's resampling products and blur, DINO's last layer, SimCLR's logits."""
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode

    from data import MultiCropTransform
    from data.gpu_transforms import batched_transform
    from methods.dino import WeightNormLinear
    from methods.simclr import similarity_logits

    products = {F.linear, F.conv2d, torch.bmm, torch.matmul, torch.Tensor.matmul,
                torch.Tensor.__matmul__}

    class Spy(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in products:
                self.seen.append((func.__name__, _precisions()))
            return func(*args, **(kwargs or {}))

    amp.set_tf32(True)
    crops = batched_transform(MultiCropTransform(16, 8, (0.4, 1.0), (0.05, 0.4), local_number=2,
                                                 mean=(0.5,) * 3, std=(0.2,) * 3, blur=True))
    images = torch.randint(0, 256, (3, 3, 20, 20), dtype=torch.uint8)
    z = torch.randn(4, 8)
    with Spy() as spy:
        crops(images, seed=0)
        WeightNormLinear(8, 5)(z)
        similarity_logits(z, z, 0.1)
        z @ z.T  # the control: an ordinary product under --tf32
    names = {name for name, _ in spy.seen}
    assert {"bmm", "conv2d", "linear"} <= names and names & {"matmul", "__matmul__"}, names
    assert all(p == ("ieee", "ieee") for _, p in spy.seen[:-1]), spy.seen
    assert spy.seen[-1][1] == ("tf32", "tf32")


# ============ the edge: one line, exit code 2 ============

def test_cli_run_prints_one_line_and_exits_2(capsys):
    def fails():
        raise ValueError("--lr -1 is negative;\n  pass a positive --lr")

    with pytest.raises(SystemExit) as e:
        cli.run(fails)
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: --lr -1 is negative; pass a positive --lr\n"
    assert cli.run(lambda: 7) == 7
    with pytest.raises(RuntimeError):  # a bug of ours keeps its traceback
        cli.run(lambda: (_ for _ in ()).throw(RuntimeError("bug")))



# ============ progress lines ============

class FakeClock:
    """time.time() for core.logger: advanced by hand, so the test needs no sleep."""

    def __init__(self):
        self.now = 1000.0

    def time(self):
        return self.now


@pytest.mark.parametrize("print_secs", [None, 10.0])
def test_progress_line_at_least_every_print_secs(monkeypatch, print_secs):
    """4 s steps and print_freq 100: lines on iteration 0 and the last one only, and with
    print_secs=10 also in between, never more than 10 s apart (the quickstart's promise)."""
    import core.logger
    clock, lines = FakeClock(), []
    monkeypatch.setattr(core.logger, "time", clock)
    monkeypatch.setattr(core.logger, "print", lambda line, **kw: lines.append((clock.now, line)),
                        raising=False)
    logger = core.logger.MetricLogger(header="E", print_freq=100, print_secs=print_secs)
    for i in logger.log_every(range(12)):
        clock.now += 4.0  # the step
        logger.update(loss=torch.tensor(float(i)))
    assert all(line.startswith("E [") and "eta: " in line for _, line in lines)
    iters = [int(line.split("[")[1].split("/")[0]) for _, line in lines]
    if print_secs is None:
        assert iters == [0, 11]
    else:
        assert iters[0] == 0 and iters[-1] == 11 and len(iters) >= 5
        times = [1000.0] + [t for t, _ in lines]
        assert max(b - a for a, b in zip(times, times[1:])) <= 10.0
