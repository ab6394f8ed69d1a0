"""Interop both ways (docs/interop.md): export_official.py's files in a ViT built as the
official scripts build theirs (ours stands in: 224px, strict=True), normalisation statistics
chosen once and read back by the evaluation scripts, iBOT's flag names, and the load-time
messages that name the flag that fixes them. CPU, batch 1, random weights."""
import argparse

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision
from PIL import Image

import eval_knn
import export_official
import train_ssl
from core import model_flags
from data import dataset_info
from data.datasets import IMAGENET_MEAN, IMAGENET_STD
from data.normalization import checkpoint_stats, resolve_train_norm
from models import build_backbone


def local(args):
    """The distributed state of a single process without a process group."""
    args.rank, args.world_size, args.gpu, args.distributed = 0, 1, 0, False
    args.device = torch.device("cpu")
    return args


def our_vit(arch, patch, size=32, seed=0):
    """A random ViT as train_ssl.py builds it for `size`px crops, with a non-trivial positional
    embedding (the interpolation is what the export must get right)."""
    torch.manual_seed(seed)
    model, _ = build_backbone(arch, patch_size=patch, img_size=[size])
    with torch.no_grad():
        model.pos_embed.normal_()
    return model.eval()


def save_ours(path, model, arch, patch, size=32, **stored):
    """A train_ssl.py DINO checkpoint of `model` (teacher and student, backbone./head. keys)."""
    sd = {f"backbone.{k}": v for k, v in model.state_dict().items()}
    sd["head.last_layer.weight_g"] = torch.ones(16, 1)
    torch.save({"teacher": sd, "student": dict(sd), "epoch": 1,
                "args": {"arch": arch, "patch_size": patch, "global_crops_size": size,
                         "cifar_stem": False, "dataset": "cifar10", **stored}}, path)
    return path


def export_args(weights, output, *extra):
    return export_official.get_args_parser().parse_args(
        ["--pretrained_weights", str(weights), "--output", str(output), *extra])


def official_vit(arch, patch, state):
    """Stand-in for facebookresearch/dino's `vits.__dict__[arch](patch_size=patch,
    num_classes=0)`: img_size=[224], weights loaded with strict=True."""
    model, _ = build_backbone(arch, patch_size=patch, img_size=[224])
    model.load_state_dict(state, strict=True)
    return model.eval()


# ============ 1. our checkpoints in the official scripts ============

@pytest.mark.parametrize("patch", [4, 8, 16])
@pytest.mark.parametrize("arch", ["vit_tiny", "vit_small"])
def test_exported_teacher_gives_our_output_at_224px(tmp_path, arch, patch):
    ours = our_vit(arch, patch)  # trained at 32px: 1 + (32/p)^2 positions
    weights = save_ours(tmp_path / "checkpoint.pth", ours, arch, patch,
                        norm_mean=list(IMAGENET_MEAN), norm_std=list(IMAGENET_STD))
    export_official.export(export_args(weights, tmp_path / "teacher_official.pth"), check=False)
    state = torch.load(tmp_path / "teacher_official.pth", weights_only=True)
    assert state["pos_embed"].shape == (1, 1 + (224 // patch) ** 2, ours.embed_dim)
    official = official_vit(arch, patch, state)
    if patch == 4:  # 3137 tokens: compare through 2 of the 12 blocks (loaded alike), for time
        official.blocks, ours.blocks = official.blocks[:2], ours.blocks[:2]
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (official(x) - ours(x)).abs().max().item()
    assert diff <= 1e-5, diff
    # the table is not a plain resize to the grid: DINO's +0.1 scale factor is reproduced
    plain = torch.nn.functional.interpolate(
        ours.pos_embed[:, 1:].reshape(1, 32 // patch, 32 // patch, -1).permute(0, 3, 1, 2),
        size=(224 // patch,) * 2, mode="bicubic").flatten(2).transpose(1, 2)
    assert not torch.allclose(plain, state["pos_embed"][:, 1:], atol=1e-4)


def test_export_folds_other_statistics_into_the_patch_embedding(tmp_path, capsys):
    ours = our_vit("vit_tiny", 8)
    weights = save_ours(tmp_path / "checkpoint.pth", ours, "vit_tiny", 8)  # CIFAR-10's statistics
    export_official.export(export_args(weights, tmp_path / "out.pth"))  # with its own check
    out = capsys.readouterr().out
    assert "Folding the normalisation" in out and "Checked: at 224px" in out
    assert "eval_knn.py --arch vit_tiny --patch_size 8 --pretrained_weights" in out
    official = official_vit("vit_tiny", 8, torch.load(tmp_path / "out.pth", weights_only=True))
    pixels = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    cifar = dataset_info("cifar10")

    def norm(mean, std):
        return (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():  # the official scripts' ImageNet normalisation vs our training's
        diff = (official(norm(IMAGENET_MEAN, IMAGENET_STD)) - ours(norm(cifar.mean, cifar.std)))
    assert diff.abs().max() <= 1e-5
    export_official.export(export_args(weights, tmp_path / "raw.pth", "--fold_normalization",
                                       "false"), check=False)
    raw = torch.load(tmp_path / "raw.pth", weights_only=True)
    assert torch.equal(raw["patch_embed.proj.weight"], ours.patch_embed.proj.weight)


def test_checkpoint_layout_loads_as_the_official_loader_reads_it(tmp_path):
    """utils.load_pretrained_weights of DINO/iBOT: ckpt[checkpoint_key], 'module.' and
    'backbone.' removed, load_state_dict(strict=False); nothing of the backbone may be missing."""
    ours = our_vit("vit_tiny", 16)
    weights = save_ours(tmp_path / "checkpoint.pth", ours, "vit_tiny", 16,
                        norm_mean=list(IMAGENET_MEAN), norm_std=list(IMAGENET_STD))
    export_official.export(export_args(weights, tmp_path / "ck.pth", "--layout", "checkpoint"))
    ckpt = torch.load(tmp_path / "ck.pth", weights_only=True)  # torch >= 2.6's default
    assert set(ckpt) == {"teacher", "student", "epoch"}
    for key in ("teacher", "student"):
        sd = {k.replace("module.", "").replace("backbone.", ""): v for k, v in ckpt[key].items()}
        model, _ = build_backbone("vit_tiny", patch_size=16, img_size=[224])
        msg = model.load_state_dict(sd, strict=False)
        assert msg.missing_keys == [] and all(k.startswith("head.") for k in msg.unexpected_keys)
        assert sd["pos_embed"].shape == (1, 197, 192)


def test_resnet_export_is_torchvisions_and_cifar_stem_is_refused(tmp_path, capsys):
    torch.manual_seed(0)
    ours, _ = build_backbone("resnet18", cifar_stem=False)
    torch.save({"model": {f"backbone.{k}": v for k, v in ours.state_dict().items()},
                "args": {"arch": "resnet18", "cifar_stem": False, "input_size": 64,
                         "dataset": "imagefolder"}}, tmp_path / "r.pth")
    export_official.export(export_args(tmp_path / "r.pth", tmp_path / "r_official.pth"))
    tv = torchvision.models.resnet18()  # eval_knn.py: torchvision_models[arch](); fc = Identity
    tv.fc = nn.Identity()
    tv.load_state_dict(torch.load(tmp_path / "r_official.pth", weights_only=True), strict=True)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(tv.eval()(x), ours.eval()(x))
    stem, _ = build_backbone("resnet18", cifar_stem=True)
    torch.save(stem.state_dict(), tmp_path / "stem.pth")
    with pytest.raises(ValueError, match="CIFAR stem.*--cifar_stem false"):
        export_official.export(export_args(tmp_path / "stem.pth", tmp_path / "no.pth"))
    assert not (tmp_path / "no.pth").exists()


# ============ 2. normalisation statistics ============

def grey_folder(root):
    """imagefolder with train/ and val/: 2 classes of 16px grey images (levels 40 and 200)."""
    for split in ("train", "val"):
        for c, level in (("a", 40), ("b", 200)):
            (root / split / c).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((16, 16), level + 5 * i, np.uint8)).save(
                    root / split / c / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def grey_run(tmp_path_factory):
    """A grey imagefolder, train_ssl.py's flags with --norm_stats auto resolved on it, and a
    checkpoint of a vit_nano/8 at 16px holding those flags as train_ssl.py stores them."""
    tmp = tmp_path_factory.mktemp("grey")
    data = grey_folder(tmp / "grey")
    args = train_ssl.parse_args(["--method", "dino", "--arch", "vit_nano", "--patch_size", "8",
                                 "--global_crops_size", "16", "--local_crops_size", "8",
                                 "--data_path", str(data), "--norm_stats", "auto"])
    info = resolve_train_norm(args, dataset_info(args.dataset, args.data_path))
    backbone, _ = build_backbone("vit_nano", patch_size=8, img_size=[16])
    args.input_size, args.cifar_stem = 16, True
    torch.save({"teacher": {f"backbone.{k}": v for k, v in backbone.state_dict().items()},
                "args": train_ssl.vars_plain(args)}, tmp / "checkpoint.pth")
    return data, tmp / "checkpoint.pth", args, info


def test_auto_statistics_are_measured_and_stored(grey_run):
    data, weights, args, info = grey_run
    levels = np.array([40, 45, 50, 200, 205, 210]) / 255
    assert args.norm_mean == pytest.approx([levels.mean()] * 3, abs=1e-4)
    assert args.norm_std == pytest.approx([levels.std()] * 3, abs=1e-4)
    assert args.norm_mean != pytest.approx(list(IMAGENET_MEAN), abs=0.01)  # imagefolder's default
    assert info.mean == tuple(args.norm_mean)
    stored = torch.load(weights, weights_only=True)["args"]
    assert checkpoint_stats(stored)[:2] == (args.norm_mean, args.norm_std)
    assert stored["norm_stats"] == "auto"
    # released weights (no args) were trained with ImageNet's
    assert checkpoint_stats(None)[:2] == (list(IMAGENET_MEAN), list(IMAGENET_STD))


@pytest.mark.parametrize("script", ["eval_knn", "eval_linear", "finetune", "visualize_attention"])
def test_every_eval_script_normalises_with_the_checkpoints_statistics(grey_run, script, tmp_path,
                                                                      capsys, monkeypatch):
    import eval_linear
    import finetune
    import visualize_attention
    data, weights, trained, _ = grey_run
    common = ["--pretrained_weights", str(weights), "--data_path", str(data)]
    run = ["--num_workers", "0", "--data_backend", "pil", "--batch_size_per_gpu", "4"]
    used = []

    def record(module, name):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, mean=None, std=None, **k: used.append(
            (tuple(mean if mean is not None else a[1]), tuple(std if std is not None else a[2])))
            or real(*a, **({"mean": mean, "std": std} if mean is not None else {}), **k))
    if script == "eval_knn":
        record(eval_knn, "eval_transform")
        eval_knn.run_knn(local(eval_knn.get_args_parser().parse_args(common + run + ["--nb_knn", "1"])))
    elif script == "eval_linear":
        record(eval_linear, "eval_transform")
        eval_linear.run_linear(local(eval_linear.get_args_parser().parse_args(
            common + run + ["--epochs", "1", "--cached_features", "true", "--n_last_blocks", "1",
                            "--tensorboard", "false", "--output_dir", str(tmp_path)])))
    elif script == "finetune":
        record(finetune, "eval_transform")
        record(finetune, "SingleViewTransform")
        finetune.run_finetune(local(finetune.get_args_parser().parse_args(
            common + run + ["--epochs", "1", "--warmup_epochs", "0", "--save_predictions", "0",
                            "--tensorboard", "false", "--output_dir", str(tmp_path)])))
    else:
        normalize = visualize_attention.T.Normalize
        monkeypatch.setattr(visualize_attention.T, "Normalize", lambda mean, std: used.append(
            (tuple(mean), tuple(std))) or normalize(mean, std))
        visualize_attention.main(visualize_attention.get_args_parser().parse_args(
            common + ["--output_dir", str(tmp_path)]))
    stats = (tuple(trained.norm_mean), tuple(trained.norm_std))
    assert used and set(used) == {stats}, used
    assert "the checkpoint's (trained with --norm_stats auto)" in capsys.readouterr().out


def test_norm_flags_win_over_the_checkpoint(grey_run):
    data, weights, _, _ = grey_run
    over = local(eval_knn.get_args_parser().parse_args(
        ["--pretrained_weights", str(weights), "--data_path", str(data),
         "--norm_mean", "0.5", "--norm_std", "0.25"]))
    model_flags.load_backbone(over)
    assert (over.norm_mean, over.norm_std) == ([0.5] * 3, [0.25] * 3)


def test_norm_flags_need_each_other(capsys):
    with pytest.raises(ValueError, match="--norm_mean given without --norm_std"):
        train_ssl.parse_args(["--method", "dino", "--norm_mean", "0.5", "0.5", "0.5"])
    with pytest.raises(ValueError, match="takes 3 values"):
        train_ssl.parse_args(["--method", "dino", "--norm_mean", "0.5", "0.5",
                              "--norm_std", "0.2", "0.2", "0.2"])


# ============ 3. iBOT's flag names ============

def test_ibot_load_from_and_drop_path_aliases(tmp_path):
    base = ["--method", "ibot", "--output_dir", str(tmp_path)]
    a = train_ssl.parse_args(base + ["--load_from", "checkpoint0040.pth", "--drop_path", "0.2"])
    assert a.resume_from == str(tmp_path / "checkpoint0040.pth")  # main_ibot: output_dir-relative
    assert a.drop_path_rate == 0.2 and a.load_from is None
    a = train_ssl.parse_args(base + ["--load_from", str(tmp_path / "x" / "snap.pth")])
    assert a.resume_from == str(tmp_path / "x" / "snap.pth")  # an absolute path as given
    a = train_ssl.parse_args(base + ["--load_from", "checkpoint.pth"])
    assert a.resume_from == ""  # its own checkpoint.pth: resumed from anyway
    with pytest.raises(ValueError, match="both given"):
        train_ssl.parse_args(base + ["--load_from", "a.pth", "--resume_from", "b.pth"])


# ============ 4. load-time messages name the flag that fixes them ============

def load_error(tmp_path, state, *flags):
    torch.save(state, tmp_path / "w.pth")
    args = eval_knn.get_args_parser().parse_args(["--pretrained_weights", str(tmp_path / "w.pth"),
                                                  *flags])
    with pytest.raises(ValueError) as e:
        model_flags.load_backbone(args, default_image_size=32)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_torchvision_weights_into_the_cifar_stem_name_cifar_stem(tmp_path):
    tv = torchvision.models.resnet18().state_dict()
    msg = load_error(tmp_path, tv, "--arch", "resnet18", "--cifar_stem", "true")
    assert "pass --cifar_stem false" in msg and "--patch_size" not in msg
    stem, _ = build_backbone("resnet18", cifar_stem=True)
    msg = load_error(tmp_path, stem.state_dict(), "--cifar_stem", "false")
    assert "pass --cifar_stem true" in msg
    # without the flag the stem, like the depth, is read off the weights, even at 32px and
    # for an official DINO checkpoint whose args name the arch but no stem
    torch.save({"teacher": {f"backbone.{k}": v for k, v in tv.items() if not k.startswith("fc.")},
                "args": argparse.Namespace(arch="resnet18", patch_size=16)}, tmp_path / "dino.pth")
    args = eval_knn.get_args_parser().parse_args(["--pretrained_weights", str(tmp_path / "dino.pth"),
                                                  "--image_size", "32"])
    model_flags.load_backbone(args)
    assert (args.arch, args.cifar_stem) == ("resnet18", False)


def test_other_patch_size_width_and_depth_name_their_flag(tmp_path):
    vit8 = build_backbone("vit_tiny", patch_size=8, img_size=[32])[0].state_dict()
    assert "pass --patch_size 8 " in load_error(tmp_path, vit8, "--patch_size", "16")
    msg = load_error(tmp_path, vit8, "--arch", "vit_small", "--patch_size", "8")
    assert "pass --arch vit_tiny " in msg
    assert "pass --arch vit_tiny --patch_size 8 " in load_error(tmp_path, vit8, "--arch",
                                                                "vit_small", "--patch_size", "16")
    r18 = build_backbone("resnet18", cifar_stem=True)[0].state_dict()
    assert "pass --arch resnet18" in load_error(tmp_path, r18, "--arch", "resnet34")
    assert "pass --arch resnet18" in load_error(tmp_path, r18, "--arch", "resnet50")


def test_keys_under_a_prefix_name_checkpoint_key(tmp_path, capsys):
    vit = build_backbone("vit_tiny", patch_size=8, img_size=[32])[0].state_dict()
    moco = {"state_dict": {**{f"module.base_encoder.{k}": v for k, v in vit.items()},
                           **{f"module.momentum_encoder.{k}": v for k, v in vit.items()}}}
    msg = load_error(tmp_path, moco)
    assert msg.endswith("pass --checkpoint_key base_encoder")  # DDP's 'module.' needs no naming
    assert "also under: momentum_encoder" in msg
    for key in ("base_encoder", "module.base_encoder"):  # the prefix works as a key
        args = eval_knn.get_args_parser().parse_args(
            ["--pretrained_weights", str(tmp_path / "w.pth"), "--checkpoint_key", key])
        model, _ = model_flags.load_backbone(args, default_image_size=32)
        assert torch.equal(model.state_dict()["blocks.3.attn.qkv.weight"],
                           vit["blocks.3.attn.qkv.weight"])
    msg = load_error(tmp_path, {"teacher": {}, "student": {}, "epoch": 3}, "--checkpoint_key", "model")
    assert "pass --checkpoint_key teacher" in msg


def test_image_size_the_weights_patches_do_not_divide_names_image_size(tmp_path, capsys):
    vit16 = build_backbone("vit_tiny", patch_size=16, img_size=[32])[0].state_dict()
    msg = load_error(tmp_path, vit16, "--image_size", "40")
    assert "--patch_size 16 does not divide --image_size 40" in msg
    assert msg.endswith("pass --image_size 32 or 48")
    vit16["pos_embed"] = torch.zeros(1, 6, 192)  # a class + a distillation token + 2x2 patches
    assert "not a class token plus a square grid" in load_error(tmp_path, vit16)
    torch.save(build_backbone("vit_tiny", patch_size=8, img_size=[32])[0].state_dict(),
               tmp_path / "w8.pth")
    with pytest.raises(ValueError, match="--image_size 224 or 232$"):
        export_official.export(export_args(tmp_path / "w8.pth", tmp_path / "o.pth",
                                           "--image_size", "230"))


# ============ loading the weights docs/interop.md lists ============

def test_torchvision_and_timm_layouts_load_without_model_flags(tmp_path):
    torch.manual_seed(0)
    tv = torchvision.models.resnet18().eval()
    torch.save(tv.state_dict(), tmp_path / "resnet18.pth")
    args = eval_knn.get_args_parser().parse_args(["--pretrained_weights", str(tmp_path / "resnet18.pth")])
    model, _ = model_flags.load_backbone(args, default_image_size=64)
    assert (args.arch, args.cifar_stem) == ("resnet18", False)
    tv.fc = nn.Identity()
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(model.eval()(x), tv(x))
    # timm's vit_tiny_patch16_224: our names plus a 1000-class head
    vit = build_backbone("vit_tiny", patch_size=16, img_size=[224])[0].state_dict()
    timm = {**vit, "head.weight": torch.zeros(1000, 192), "head.bias": torch.zeros(1000)}
    torch.save(timm, tmp_path / "timm.pth")
    args = eval_knn.get_args_parser().parse_args(["--pretrained_weights", str(tmp_path / "timm.pth")])
    model, _ = model_flags.load_backbone(args, default_image_size=32)
    assert (args.arch, args.patch_size, args.norm_mean) == ("vit_tiny", 16, list(IMAGENET_MEAN))


def test_export_help_lists_every_flag_with_its_default(capsys):
    with pytest.raises(SystemExit):
        export_official.get_args_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    for flag, default in (("--image_size", "224"), ("--layout", "backbone"),
                          ("--fold_normalization", "true"), ("--checkpoint_key", "teacher")):
        assert flag in out and f"(default: {default})" in " ".join(out.split())


def test_data_path_at_one_split_names_its_parent(tmp_path):
    data = grey_folder(tmp_path / "imagenet")
    with pytest.raises(ValueError, match=f"pass its parent, the folder that holds train/"):
        train_ssl.parse_args(["--method", "dino", "--data_path", str(data / "train")])
    assert train_ssl.parse_args(["--method", "dino", "--data_path", str(data)]).dataset == \
        "imagefolder"
