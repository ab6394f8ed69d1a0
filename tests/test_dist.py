"""2 gloo processes x B/2 compute what 1 process x B does: core/syncbn.py's AllReduceBatchNorm
against nn.BatchNorm on the global batch, then whole training steps of SimCLR (ResNet-18 +
BN projector), DINO (ResNet-18, --use_bn_in_head true) and iBOT (ViT, --norm_in_head bn):
losses, gradients, SGD step, EMA teacher, centres and BatchNorm running statistics.

Tolerances. Both sides compute the same function in float32, summing in another order (two
half-batch sums, E[x^2] - E[x]^2 instead of torch's variance), so they differ by rounding only.
Errors are per tensor, ||a - b|| / ||b||, the worst tensor counted:
- REL = 1e-4 for the losses and the first step's gradients. Measured: losses <= 1e-7 (DINO,
  iBOT) and 7e-7 (SimCLR), gradients <= 8e-6 (one process on its batch in reverse order: 2e-6).
- REL_MOVED = 1e-2 for how far every weight, buffer and centre has moved after each step. Less
  exact for two reasons: fp32 holds a norm weight near 1 to 6e-8, a visible part of a move of
  1e-4; and the second step amplifies the first step's rounding differences, the more so the
  larger the step (at lr 0.1 one process with its batch reversed differs from itself by 4e-3
  after two DINO steps). At LR = 0.03, measured <= 4e-4 (reversed batch: <= 6.5e-4).
Without synchronised BatchNorm the same checks give 0.35 to 1.8 on gradients and moves, 5e-3
(DINO, iBOT) to 0.15 (SimCLR) on the loss (the SimCLR test checks so); without the all-reduce of
DINO's centre, 0.3 to 0.5 on the moves.
"""
import argparse
import copy

import pytest
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from _ddp import rank_slice, run_ranks
from core.syncbn import AllReduceBatchNorm, _allreduce_copy, convert_batchnorm, sync_batchnorm
from methods import dino, ibot, simclr
from models import build_backbone
from test_dino_ibot import method_args
from train_ssl import ddp_kwargs

REL = 1e-4
REL_MOVED = 1e-2
LR = 0.03


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def max_rel_err(a, b):
    """Largest per-tensor relative error between two {name: tensor} dicts with the same keys."""
    assert a.keys() == b.keys()
    return max(rel_err(a[k], b[k]) for k in a)


# ============ AllReduceBatchNorm against nn.BatchNorm ============

BN_CASES = [(nn.BatchNorm1d, (8, 6), 0.1), (nn.BatchNorm2d, (8, 3, 5, 5), 0.1),
            (nn.BatchNorm1d, (8, 6, 4), None)]  # (N, C, L) as iBOT's tokens; cumulative average


def _bn_inputs(shape, seed):
    g = torch.Generator().manual_seed(seed)
    x = 3 + 2 * torch.randn(shape, generator=g)  # mean far from 0: E[x^2] - E[x]^2 must hold
    return x, torch.randn(shape, generator=g)    # input, upstream gradient


def _bn(cls, shape, momentum):
    torch.manual_seed(0)
    bn = cls(shape[1], momentum=momentum)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    return bn


def _bn_run(bn, shape, rank=0, world_size=1):
    """Two training steps and one eval call on this rank's share of the global batches;
    returns outputs, gradients and the state_dict."""
    out = {}
    for step in range(2):
        x, dy = (rank_slice(t, rank, world_size) for t in _bn_inputs(shape, step))
        x.requires_grad_(True)
        y = bn(x)
        bn.weight.grad = bn.bias.grad = None
        (y * dy).sum().backward()
        out.update({f"y{step}": y.detach(), f"dx{step}": x.grad,
                    f"dweight{step}": bn.weight.grad, f"dbias{step}": bn.bias.grad})
    bn.eval()
    out["y_eval"] = bn(rank_slice(_bn_inputs(shape, 5)[0], rank, world_size)).detach()
    out.update({k: v.clone() for k, v in bn.state_dict().items()})
    return out


def _bn_worker(rank, world_size):
    results = []
    for cls, shape, momentum in BN_CASES:
        bn = sync_batchnorm(_bn(cls, shape, momentum), "cpu")
        assert type(bn) is AllReduceBatchNorm
        results.append(_bn_run(bn, shape, rank, world_size))
    return results


def test_allreduce_batchnorm_equals_batchnorm_on_the_global_batch():
    ranks = run_ranks(_bn_worker)
    for case, (cls, shape, momentum) in enumerate(BN_CASES):
        ref = _bn_run(_bn(cls, shape, momentum), shape)
        r0, r1 = ranks[0][case], ranks[1][case]
        assert list(r0) == list(ref)  # nn.BatchNorm's state_dict keys
        for key in ("y0", "dx0", "y1", "dx1", "y_eval"):  # each rank holds its share
            merged = torch.empty_like(ref[key])
            merged[0::2], merged[1::2] = r0[key], r1[key]
            torch.testing.assert_close(merged, ref[key], rtol=1e-5, atol=1e-5)
        for key in ("dweight0", "dbias0", "dweight1", "dbias1"):  # local sums: DDP adds them up
            torch.testing.assert_close(r0[key] + r1[key], ref[key], rtol=1e-5, atol=1e-5)
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(r0[key], ref[key])
            torch.testing.assert_close(r1[key], ref[key])


def test_allreduce_batchnorm_single_process_is_batchnorm_and_keeps_keys():
    torch.manual_seed(0)
    net, _ = build_backbone("resnet18", cifar_stem=True)
    plain = copy.deepcopy(net)
    keys = list(net.state_dict())
    assert sync_batchnorm(net, "cpu") is net  # one process: nothing to synchronise
    conv = convert_batchnorm(net, _allreduce_copy)
    assert sum(type(m) is AllReduceBatchNorm for m in conv.modules()) == 20
    assert not any(type(m) is nn.BatchNorm2d for m in conv.modules())
    assert list(conv.state_dict()) == keys
    conv.load_state_dict(plain.state_dict(), strict=True)
    # without a process group it is nn.BatchNorm, in train and in eval mode
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(conv(x), plain(x), rtol=0, atol=0)
    torch.testing.assert_close(conv.state_dict(), plain.state_dict(), rtol=0, atol=0)
    conv.eval(), plain.eval()
    torch.testing.assert_close(conv(x), plain(x), rtol=0, atol=0)
    # a BatchNorm used twice (iBOT's head) stays one module, still listed under both names
    head = ibot.iBOTHead(8, 16, patch_out_dim=16, norm="bn", hidden_dim=12, bottleneck_dim=4)
    keys = list(head.state_dict())
    head = convert_batchnorm(head, _allreduce_copy)
    assert head.mlp[1] is head.mlp[4] and type(head.mlp[1]) is AllReduceBatchNorm
    assert list(head.state_dict()) == keys
    # the CUDA path too (nn.SyncBatchNorm.convert_sync_batchnorm alone leaves mlp.4 plain)
    head = ibot.iBOTHead(8, 16, patch_out_dim=16, norm="bn", hidden_dim=12, bottleneck_dim=4)
    head = convert_batchnorm(head, nn.SyncBatchNorm.convert_sync_batchnorm)
    assert head.mlp[1] is head.mlp[4] and type(head.mlp[1]) is nn.SyncBatchNorm
    assert list(head.state_dict()) == keys


# ============ whole training steps, 2 ranks x B/2 against 1 process x B ============

B = 8  # global batch; 4 per rank


def _crops(step, sizes, b=B):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(b, 3, s, s, generator=g) for s in sizes]


def rank_batch(views, rank, world_size):
    """This rank's share of every crop (and iBOT mask) of a global batch."""
    if isinstance(views, tuple):  # iBOT: (crops, masks)
        return tuple(rank_batch(v, rank, world_size) for v in views)
    return [rank_slice(v, rank, world_size) for v in views]


def train_steps(model, ddp_model, batches):
    """The step of train_ssl.train_one_epoch (fp32, no clipping): forward, backward,
    after_backward, optimizer step, after_step (EMA). Returns the losses, the gradients of the
    first step, and after each step how far every parameter, buffer and centre has moved.

    Plain SGD, not DINO's AdamW: AdamW's first step is about lr * sign(g), so the elements
    whose gradient is near 0 would move by +-lr on the sign of their rounding noise."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=LR, momentum=0.9)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    losses, grads, moved = [], None, []
    for it, views in enumerate(batches):
        loss, _ = ddp_model(views, 0, it)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grads is None:
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.after_backward(0)
        optimizer.step()
        model.after_step(it)
        losses.append(loss.detach())
        moved.append({k: v - start[k] for k, v in model.state_dict().items()
                      if v.is_floating_point() and not torch.equal(v, start[k])})
    return {"losses": torch.stack(losses), "grads": grads, "moved": moved}


def errors_against(run, ref):
    """Largest relative errors of one rank's run against one process: the first step's
    gradients and what moved after each step (worst tensor).

    Skipped: parameters whose exact gradient is 0, the biases of the layers right before a
    BatchNorm (its mean subtraction cancels them) and their EMA copies. Both sides hold
    rounding noise there (1e-7 against gradients of 0.1 to 30); we check it is noise on both."""
    zero = {n for n, g in ref["grads"].items() if g.norm() < 1e-5}
    assert run["grads"].keys() == ref["grads"].keys()
    assert all(run["grads"][n].norm() < 1e-5 for n in zero)
    zero |= {"teacher." + n[len("student."):] for n in zero if n.startswith("student.")}

    def worst(got, want):
        assert got.keys() == want.keys()
        return max(rel_err(got[n], want[n]) for n in want if n not in zero)

    errors = {"grads": worst(run["grads"], ref["grads"])}
    for i, (got, want) in enumerate(zip(run["moved"], ref["moved"], strict=True)):
        errors[f"moved_{i + 1}"] = worst(got, want)
    return errors


def _method_worker(rank, world_size, build, batches, syncs, ref):
    """One DDP run per entry of syncs (True: train_ssl.py's sync_batchnorm, False: plain
    BatchNorm), each checked here against the 1-process run `ref`, so that only the losses and
    a few numbers come back rather than every weight."""
    results = []
    for sync in syncs:
        model = build()
        if sync:
            model = sync_batchnorm(model, "cpu")
        local = [rank_batch(views, rank, world_size) for views in batches()]
        # train_ssl.py's DDP flags: buffers not re-broadcast (each rank's own BatchNorm
        # statistics and centres are compared below), gradients as bucket views
        run = train_steps(model, DistributedDataParallel(model, **ddp_kwargs(True)), local)
        results.append({"losses": run["losses"], **errors_against(run, ref)})
    return results


def two_ranks_and_one(build, batches, syncs=(True,)):
    """-> ([errors of the 2 ranks against 1 process, per entry of syncs], the 1-process run).
    The worst rank counts; the loss compared is the mean of the ranks' losses: each is a mean
    over that rank's samples and DDP averages the gradients over ranks, so with 2 equal halves
    that mean is the global loss."""
    ref = train_steps(model := build(), model, batches())
    ranks = run_ranks(_method_worker, build, batches, syncs, ref)  # forked: ref is not copied
    errors = []
    for r0, r1 in zip(*ranks):
        e = {"loss": rel_err((r0.pop("losses") + r1.pop("losses")) / 2, ref["losses"])}
        errors.append({**e, **{k: max(r0[k], r1[k]) for k in r0}})
    return errors, ref


def assert_same(errors):
    assert errors["loss"] < REL and errors["grads"] < REL, errors
    assert all(v < REL_MOVED for k, v in errors.items() if k.startswith("moved")), errors


# SimCLR: ResNet-18 (20 BatchNorm2d) + Linear-BN-ReLU-Linear projector, one step

def build_simclr():
    torch.manual_seed(0)
    backbone, dim = build_backbone("resnet18", cifar_stem=True)
    args = argparse.Namespace(temperature=0.2, proj_hidden_dim=64, proj_output_dim=16)
    return simclr.build(args, backbone, dim, niter_per_ep=1)


def simclr_batches():
    return [_crops(0, [16, 16])]


def test_simclr_resnet_two_ranks_equal_one():
    """This is what issue 12 measured: with BatchNorm synchronised only on CUDA, 2 gloo ranks
    were off by 4e-3 on the loss and a median 19% on the gradients."""
    (synced, plain), ref = two_ranks_and_one(build_simclr, simclr_batches, syncs=(True, False))
    print("simclr", synced, "plain BN:", plain)
    assert set(ref["grads"]) == {n for n, _ in build_simclr().named_parameters()}
    assert_same(synced)
    # teeth: plain BatchNorm normalises each rank's half with that half's statistics
    assert plain["loss"] > 1e-3 and plain["grads"] > 0.1 and plain["moved_1"] > 0.1, plain


# DINO: ResNet-18 student and teacher, BatchNorm in both heads, 2 global + 2 local crops

def build_dino():
    torch.manual_seed(0)
    # teacher momentum 0.5 rather than 0.996, so the EMA moves the teacher visibly
    args = method_args("dino", arch="resnet18", cifar_stem=True, out_dim=64, use_bn_in_head=True,
                       local_crops_number=2, epochs=2, freeze_last_layer=0, drop_path_rate=0.0,
                       momentum_teacher=0.5)
    backbone, dim = build_backbone("resnet18", cifar_stem=True)
    return dino.build(args, backbone, dim, niter_per_ep=2)


def dino_batches():
    return [_crops(step, [16, 16, 8, 8]) for step in range(2)]


def test_dino_two_ranks_equal_one():
    (errors,), ref = two_ranks_and_one(build_dino, dino_batches)
    print("dino", errors)
    moved = ref["moved"][0]
    # one step moved the student, the EMA teacher, the centre and both networks' BN statistics
    assert "dino_loss.center" in moved and "teacher.head.last_layer.weight_v" in moved
    assert "teacher.head.mlp.1.running_mean" in moved
    assert "teacher.backbone.layer4.1.bn2.running_var" in moved
    assert_same(errors)


# iBOT: ViT with 4x4 patches at 16px, one BatchNorm reused in each head MLP, masks from the data

def build_ibot():
    torch.manual_seed(0)
    args = method_args("ibot", arch="vit_nano", patch_size=4, out_dim=64, patch_out_dim=64,
                       norm_in_head="bn", local_crops_number=2, epochs=2, freeze_last_layer=0,
                       drop_path_rate=0.0, momentum_teacher=0.5)
    backbone, dim = build_backbone("vit_nano", patch_size=4, img_size=[16],
                                   **ibot.backbone_kwargs(args))
    return ibot.build(args, backbone, dim, niter_per_ep=2)


def ibot_batches():
    batches = []
    for step in range(2):
        g = torch.Generator().manual_seed(200 + step)
        masks = [torch.rand(B, 4, 4, generator=g) < 0.3 for _ in range(2)]
        batches.append((_crops(step, [16, 16, 8, 8]), masks))
    return batches


def test_ibot_two_ranks_equal_one():
    (errors,), ref = two_ranks_and_one(build_ibot, ibot_batches)
    print("ibot", errors)
    moved = ref["moved"][0]
    assert {"ibot_loss.center", "ibot_loss.center2", "student.backbone.masked_embed",
            "teacher.head.mlp.1.running_mean", "teacher.head.last_layer.weight_v"} <= set(moved)
    assert_same(errors)


# ============ the process group on CUDA serves CPU tensors (issue 20, items 1 and 5) ============

def _fake_cuda_init(monkeypatch, env, **flags):
    """core.dist.init_distributed_mode as on a machine with one GPU (CUDA faked, the process
    group recorded instead of created). Returns (args, init_process_group's arguments)."""
    import builtins

    from core import dist as distu
    monkeypatch.setattr(builtins, "print", builtins.print)  # setup_for_distributed replaces it
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda gpu: None)
    calls = []
    monkeypatch.setattr(distu.dist, "init_process_group",
                        lambda backend, **kw: calls.append({"backend": backend, **kw}))
    args = argparse.Namespace(dist_url="env://", cpu=False, **flags)
    distu.init_distributed_mode(args)
    (call,) = calls
    return args, call


def test_cuda_process_group_has_a_cpu_backend_and_is_bound_to_the_gpu(monkeypatch):
    args, call = _fake_cuda_init(monkeypatch, {})
    assert call["backend"] == "cpu:gloo,cuda:nccl"  # was "nccl": CPU collectives failed
    assert call["device_id"] == torch.device("cuda", 0) == args.device


def test_dist_backend_gloo_lets_two_processes_share_one_gpu(monkeypatch):
    from core.dist import process_group_backend
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}  # torchrun's second process
    args, call = _fake_cuda_init(monkeypatch, env, dist_backend="gloo")
    assert call["backend"] == "gloo" and args.gpu == 0 and args.device == torch.device("cuda", 0)
    assert call["device_id"] is None
    # NCCL cannot put two ranks on one GPU: one clear line instead of NCCL's error later
    with pytest.raises(ValueError, match="--dist_backend gloo"):
        _fake_cuda_init(monkeypatch, env, dist_backend="nccl")
    assert process_group_backend("cpu") == process_group_backend("cpu", "gloo") == "gloo"
    with pytest.raises(ValueError, match="nccl needs CUDA"):
        process_group_backend("cpu", "nccl")


def test_dist_backend_flag_is_parsed_and_checked(capsys):
    from train_ssl import get_args_parser, parse_args
    assert parse_args(["--method", "dino", "--dist_backend", "gloo"]).dist_backend == "gloo"
    assert parse_args(["--method", "dino"]).dist_backend is None
    with pytest.raises(ValueError, match="nccl needs CUDA"):
        parse_args(["--method", "dino", "--cpu", "--dist_backend", "nccl"])
    get_args_parser("dino").print_help()
    assert "--dist_backend" in capsys.readouterr().out


def _cpu_half_worker(rank, world_size):
    """One DDP training step of every method on CPU tensors in this rank's process group:
    DDP's gradient all-reduce, SyncBatchNorm, DINO/iBOT's centre, SimCLR's gathered negatives.
    Returns {method: loss} or {method: the error's message}."""
    from methods import METHODS
    out = {}
    g = torch.Generator().manual_seed(rank)
    crops = [torch.randn(2, 3, s, s, generator=g) for s in (16, 16, 8, 8)]
    views = {"dino": crops, "ibot": (crops, [torch.rand(2, 4, 4, generator=g) < 0.3] * 2),
             "simclr": crops[:2], "rotation": crops[0]}
    for name, method in sorted(METHODS.items()):
        torch.manual_seed(0)
        args = method_args(name, arch="vit_nano", patch_size=4, out_dim=32, patch_out_dim=32,
                           local_crops_number=2, proj_hidden_dim=16, proj_output_dim=8,
                           drop_path_rate=0.0, epochs=1)
        backbone, dim = build_backbone("vit_nano", patch_size=4, img_size=[16],
                                       **method.backbone_kwargs(args))
        model = sync_batchnorm(method.build(args, backbone, dim, niter_per_ep=1), "cpu")
        try:
            loss, _ = DistributedDataParallel(model, **ddp_kwargs(True))(views[name], 0, 0)
            loss.backward()
            model.after_step(0)
            out[name] = loss.item()
        except RuntimeError as e:
            out[name] = str(e)
    return out


def test_cpu_half_of_every_method_runs_in_a_group_shaped_like_the_cuda_one():
    """The GPU suite's "cuda vs cpu" rows run each method on CPU tensors inside the process
    group made for CUDA. A group serving only CUDA tensors (NCCL; here gloo bound to cuda
    only) fails on the first CPU collective; the group core.dist makes on CUDA,
    "cpu:gloo,cuda:nccl" (here with gloo for nccl, as there is no GPU), serves them."""
    from core.dist import process_group_backend
    shape = process_group_backend("cuda").replace("nccl", "gloo")
    assert shape == "cpu:gloo,cuda:gloo"
    for results in run_ranks(_cpu_half_worker, backend=shape):
        assert set(results) == {"dino", "ibot", "rotation", "simclr"}
        assert all(isinstance(v, float) and v == v for v in results.values()), results
    # the condition of the bug, reproduced: a group bound to CUDA tensors only
    for results in run_ranks(_cpu_half_worker, backend="cuda:gloo"):
        assert all("No backend type associated with device type cpu" in str(v)
                   for v in results.values()), results
