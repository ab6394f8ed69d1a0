"""CPU tests for core/diagnostics.py: teacher entropies and KL against hand computations, the two
collapse modes of DINO's section 5.3 (and a healthy batch that is neither), SimSiam's embedding
std, the effective rank, and the new keys in every method's stats."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from core.diagnostics import (EffectiveRankEvery, check_collapse, collapse_mode, effective_rank,
                              embedding_std, teacher_stats)
from methods import METHODS, dino, ibot
from methods.dino import DINOHead, DINOLoss
from methods.ibot import iBOTLoss

K, B, NCROPS = 256, 16, 4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def dino_stats(teacher, student=None, epoch=0):
    """The stats DINOLoss returns for teacher logits (2B, K) and student logits (NCROPS*B, K)."""
    loss_fn = DINOLoss(K, NCROPS, 0.04, 0.04, 0, 10)
    if student is None:
        student = torch.randn(NCROPS * len(teacher) // 2, K)
    _, stats = loss_fn(student, teacher, epoch, return_stats=True)
    return {k: v.item() for k, v in stats.items()}


# ============ teacher entropy and KL ============

def test_teacher_stats_equal_hand_computation():
    p = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]])
    stats = teacher_stats(p, torch.tensor(2.0))
    # h = (ln 2 + ln 4 + 0) / 3; the batch mean is (7/12, 3/12, 1/12, 1/12)
    h = (math.log(2) + math.log(4)) / 3
    mean = np.array([7, 3, 1, 1]) / 12
    assert stats["teacher_entropy"].item() == pytest.approx(h, rel=1e-6)
    assert stats["teacher_batch_entropy"].item() == pytest.approx(-(mean * np.log(mean)).sum(),
                                                                  rel=1e-6)
    assert stats["kl"].item() == pytest.approx(2.0 - h, rel=1e-6)
    assert all(v.ndim == 0 for v in stats.values())


def test_dino_loss_kl_equals_pairwise_kl_divergence():
    """kl = loss - mean teacher entropy must equal the mean over the loss's pairs of
    KL(P_t || P_s) computed directly."""
    torch.manual_seed(0)
    teacher, student = torch.randn(2 * B, K), torch.randn(NCROPS * B, K)
    loss_fn = DINOLoss(K, NCROPS, 0.04, 0.04, 0, 10)
    loss, stats = loss_fn(student, teacher, 0, return_stats=True)
    q = F.softmax(teacher.double() / 0.04, dim=-1).chunk(2)  # centre is 0 before the update
    logp = F.log_softmax(student.double() / 0.1, dim=-1).chunk(NCROPS)
    kls = [F.kl_div(logp[v], q[t], reduction="batchmean") for t in range(2) for v in range(NCROPS)
           if v != t]
    assert stats["kl"].item() == pytest.approx(torch.stack(kls).mean().item(), abs=1e-4)
    h = -(q[0] * q[0].log()).sum(-1).mean() / 2 - (q[1] * q[1].log()).sum(-1).mean() / 2
    assert stats["teacher_entropy"].item() == pytest.approx(h.item(), rel=1e-5)
    assert loss.ndim == 0 and loss_fn(student, teacher, 0).ndim == 0  # default: the loss alone


def test_ibot_loss_returns_cls_teacher_stats():
    torch.manual_seed(0)
    ng, nl, N = 2, 2, 4
    t_cls, s_cls, local = torch.randn(ng * B, K), torch.randn(ng * B, K), torch.randn(nl * B, K)
    patch = torch.randn(ng * B, N, 8)
    masks = [torch.ones(B, 2, 2, dtype=torch.bool)] * ng
    loss_fn = iBOTLoss(K, 8, ng, nl, 0.04, 0.04, 0.04, 0.07, 0, 10, lambda1=0.5)
    out = loss_fn((s_cls, patch), (t_cls, patch), local, masks, 0)
    q = F.softmax(t_cls.double() / 0.04, dim=-1).chunk(ng)
    logp = F.log_softmax(torch.cat([s_cls, local]).double() / 0.1, dim=-1).chunk(ng + nl)
    kls = [F.kl_div(logp[v], q[t], reduction="batchmean") for t in range(ng)
           for v in range(ng + nl) if v != t]
    # the KL is of the unweighted [CLS] loss, whatever lambda1 is
    assert out["kl"].item() == pytest.approx(torch.stack(kls).mean().item(), abs=1e-4)
    assert out["cls"].item() == pytest.approx(0.5 * (out["kl"] + out["teacher_entropy"]).item(),
                                              rel=1e-5)


# ============ the collapse check ============

def test_constant_teacher_is_one_dimension_collapse(capsys):
    """A constant teacher output (no centring yet): every image on the same dimension."""
    teacher = torch.randn(1, K).expand(2 * B, K)
    stats = dino_stats(teacher)
    assert stats["teacher_batch_entropy"] < 0.3 and stats["kl"] > 0
    assert dino.diagnose(stats, _epoch_args(out_dim=K, warmup_epochs=2), epoch=3) == "one-dimension"
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and "one-dimension collapse at epoch 3" in lines[0]
    assert "--teacher_temp" in lines[0] and "batch" in lines[0] and "--use_bn_in_head" in lines[0]
    # iBOT's advice names its own head flag; the bare check names no flag at all
    assert ibot.diagnose(stats, _epoch_args(out_dim=K, warmup_epochs=2), epoch=3) == "one-dimension"
    assert check_collapse(stats, K, epoch=3) == "one-dimension"
    ibot_line, bare = capsys.readouterr().out.strip().splitlines()
    assert "--norm_in_head bn" in ibot_line and "--use_bn_in_head" not in ibot_line
    assert "--" not in bare and bare.endswith(")."), bare


def test_uniform_teacher_is_uniform_collapse(capsys):
    """Equal teacher logits (or no sharpening): every output is uniform, the loss sits at ln K."""
    stats = dino_stats(torch.full((2 * B, K), 0.3), student=torch.zeros(NCROPS * B, K))
    assert stats["teacher_entropy"] == pytest.approx(math.log(K), rel=1e-5)
    assert stats["kl"] == pytest.approx(0, abs=1e-4)
    # the epoch averages as train_ssl.py writes them to log.txt work too
    logged = {f"train_{k}": v for k, v in stats.items()}
    assert dino.diagnose(logged, _epoch_args(out_dim=K, warmup_epochs=5), epoch=5) == "uniform"
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and "uniform collapse at epoch 5" in lines[0]
    assert "ln K" in lines[0] and "--momentum_teacher" in lines[0]


def test_healthy_batch_and_warmup_trigger_nothing(capsys):
    torch.manual_seed(0)
    healthy = dino_stats(torch.randn(2 * B, K))  # sharp, and each image on its own dimension
    assert healthy["teacher_entropy"] < math.log(K) / 2 < healthy["teacher_batch_entropy"]
    assert check_collapse(healthy, K, epoch=10, warmup_epochs=2) is None
    collapsed = dino_stats(torch.randn(1, K).expand(2 * B, K))
    assert check_collapse(collapsed, K, epoch=1, warmup_epochs=2) is None  # still in warmup
    assert check_collapse({"loss": 1.0, "acc1": 50.0}, None, epoch=10) is None  # SimCLR
    assert capsys.readouterr().out == ""


def test_no_collapse_warning_on_epoch_0_without_warmup(capsys):
    """A one-epoch run with --warmup_epochs 0: epoch 0's nearly uniform teacher is its random
    init, not a collapse; from epoch 1 on the same numbers are warned about."""
    flat = dino_stats(torch.full((2 * B, K), 0.3) + 1e-3 * torch.randn(2 * B, K))
    assert collapse_mode(flat, K) == "uniform"
    assert check_collapse(flat, K, epoch=0, warmup_epochs=0) is None
    assert capsys.readouterr().out == ""
    assert check_collapse(flat, K, epoch=1, warmup_epochs=0) == "uniform"
    assert "uniform collapse at epoch 1" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["simclr", "rotation"])
def test_methods_without_a_teacher_diagnose_nothing(method, capsys):
    """The contract's diagnose(stats, args, epoch): train_ssl.py calls it for every method."""
    collapsed = {f"train_{k}": v for k, v in dino_stats(torch.full((2 * B, K), 0.3)).items()}
    args = _epoch_args(warmup_epochs=0)
    assert METHODS[method].diagnose({**collapsed, "train_loss": 1.0}, args, epoch=3) is None
    assert capsys.readouterr().out == ""


def _epoch_args(**kw):
    import argparse
    return argparse.Namespace(**kw)


def test_collapse_needs_identical_outputs_and_uniform_needs_flat_ones():
    """Identical outputs half-way down (not yet near 0) are one-dimension collapse already;
    uniform needs outputs within one bit of ln K; flat outputs that differ per image are fine."""
    logk = math.log(K)
    halfway = {"teacher_entropy": 0.7 * logk, "teacher_batch_entropy": 0.7 * logk + 0.1}
    assert collapse_mode(halfway, K) == "one-dimension"
    assert collapse_mode({"teacher_entropy": logk - 0.5, "teacher_batch_entropy": logk - 0.1}, K) \
        == "uniform"
    assert collapse_mode({"teacher_entropy": logk - 1.0, "teacher_batch_entropy": logk}, K) is None


def test_fresh_dino_head_sharpened_or_not():
    """A random-init DINO head on distinct features sits about 1.2 nats below ln K at
    temperature 0.04 (s^2 / 2 with s = 1 / (sqrt(256) * 0.04)) and still tells images apart;
    at temperature 1 (no sharpening) every output is uniform."""
    torch.manual_seed(0)
    k = 4096
    head = DINOHead(24, k, hidden_dim=64)
    with torch.no_grad():
        logits = head(torch.randn(64, 24))
    def stats(temp):
        probs = F.softmax(logits / temp, dim=-1)
        return {n: v.item() for n, v in teacher_stats(probs, torch.tensor(0.0)).items()}
    sharp, flat = stats(0.04), stats(1.0)
    assert 0.9 < math.log(k) - sharp["teacher_entropy"] < 1.6
    assert collapse_mode(sharp, k) is None
    assert collapse_mode(flat, k) == "uniform" and math.log(k) - flat["teacher_entropy"] < 0.01


# ============ embeddings ============

def test_embedding_std_healthy_and_collapsed():
    torch.manual_seed(0)
    d = 64
    z = torch.randn(4096, d) * 3  # any scale: the std is of z / ||z||
    assert embedding_std(z).item() == pytest.approx(1 / math.sqrt(d), rel=0.05)
    collapsed = torch.randn(1, d).expand(512, d) + 1e-4 * torch.randn(512, d)
    assert embedding_std(collapsed).item() < 1e-3


def test_effective_rank_identity_and_rank_one():
    d = 32
    assert effective_rank(torch.eye(d)).item() == pytest.approx(d, rel=1e-5)
    assert effective_rank(3 * torch.eye(d)[:, :20]).item() == pytest.approx(20, rel=1e-5)
    u, v = torch.randn(100, 1), torch.randn(1, d)
    assert effective_rank(u @ v).item() == pytest.approx(1.0, abs=1e-3)
    # two equal singular values and nothing else: exactly 2
    assert effective_rank(torch.diag(torch.tensor([5.0, 5.0, 0, 0]))).item() == pytest.approx(2.0)
    # a diverged run: NaN, not the SVD's convergence error
    bad = torch.eye(d)
    bad[0, 1] = float("nan")
    assert math.isnan(effective_rank(bad).item())


def test_effective_rank_every_computes_only_at_its_interval(monkeypatch):
    calls = []
    import core.diagnostics as diag
    monkeypatch.setattr(diag, "effective_rank",
                        lambda z: calls.append(1) or torch.tensor(float(len(calls))))
    every = EffectiveRankEvery(freq=5)
    values = [every(torch.zeros(2, 2), it).item() for it in range(7, 17)]  # resumed at it=7
    assert values == [1, 1, 1, 2, 2, 2, 2, 2, 3, 3]  # first call, then it = 10 and 15


# ============ the methods' stats ============

def tiny_args(method, **overrides):
    from train_ssl import get_args_parser
    args = get_args_parser(method).parse_args([])
    args.input_size, args.cifar_stem, args.epochs = 16, False, 2
    for k, v in overrides.items():
        setattr(args, k, v)
    return args


def tiny_backbone(monkeypatch=None, module=None):
    from models.vision_transformer import VisionTransformer

    def build(arch="vit_tiny", patch_size=8, img_size=(16,), drop_path_rate=0.0, cifar_stem=False,
              **kw):
        m = VisionTransformer(img_size=list(img_size), patch_size=patch_size, embed_dim=24, depth=1,
                              num_heads=2, drop_path_rate=drop_path_rate, **kw)
        return m, m.embed_dim
    if monkeypatch is not None:
        monkeypatch.setattr(module, "build_backbone", build)
    return build


@pytest.mark.parametrize("method", ["dino", "ibot", "simclr", "rotation"])
def test_method_stats_have_diagnostics(method, monkeypatch):
    torch.manual_seed(0)
    mod = METHODS[method]
    build = tiny_backbone(monkeypatch, mod) if method in ("dino", "ibot") else tiny_backbone()
    args = tiny_args(method, arch="vit_tiny", patch_size=8, out_dim=64, patch_out_dim=64,
                     local_crops_number=1, proj_hidden_dim=32, proj_output_dim=16, print_freq=3)
    kwargs = mod.backbone_kwargs(args)  # iBOT: the masked_embed token
    backbone, dim = build(patch_size=8, img_size=(16,), **kwargs)
    model = mod.build(args, backbone, dim, niter_per_ep=2)
    x = torch.randn(4, 3, 16, 16)
    if method == "dino":
        views = [x, x.flip(-1), torch.randn(4, 3, 8, 8)]
    elif method == "ibot":
        views = ([x, x.flip(-1), torch.randn(4, 3, 8, 8)], [torch.rand(4, 2, 2) > 0.5] * 2)
    elif method == "simclr":
        views = [x, x.flip(-1)]
    else:
        views = x
    loss, stats = model(views, 0, 0)
    keys = {"teacher_entropy", "teacher_batch_entropy", "kl"} if method in ("dino", "ibot") \
        else {"emb_std", "erank"}
    assert keys <= set(stats)
    assert all(torch.is_tensor(stats[k]) and stats[k].ndim == 0 and torch.isfinite(stats[k])
               for k in keys)
    if method in ("dino", "ibot"):
        h, hb = stats["teacher_entropy"].item(), stats["teacher_batch_entropy"].item()
        assert 0 <= h <= hb <= math.log(64) + 1e-5  # concavity: the batch mean is flatter
    else:
        assert 1 <= stats["erank"].item() <= 16 * 4 and model.erank.freq == 3
