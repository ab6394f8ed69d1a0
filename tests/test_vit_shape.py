"""Any ViT shape (--embed_dim --depth --num_heads on top of --arch) and the comparison ladder:
one tiny DINO epoch of a ViT of width 64, depth 3 and 4 heads, then every evaluation script
rebuilds exactly that network from the checkpoint alone, and eval_compare.py runs the whole
ladder (k-NN, linear / MLP / per-layer probes, fine-tuning head / last 1 / last 2 / all, each
pretrained and at random init) into one table and one figure. Tiny .npy data of 16px images,
everything in this process."""
import argparse
import json
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import eval_compare
import eval_knn
import eval_linear
import finetune
import train_ssl
import visualize_attention
from core import cli, eval_args, model_flags
from core.checkpoint import extract_backbone_state, load_pretrained_weights
from models import build_backbone

ROOT = Path(__file__).resolve().parents[1]
SHAPE = {"embed_dim": 64, "depth": 3, "num_heads": 4}


@pytest.fixture(scope="module")
def npy_root(tmp_path_factory):
    """4 classes told apart by colour (plus noise): 20 train and 8 test 16px images a class."""
    root = tmp_path_factory.mktemp("npy")
    rng = np.random.default_rng(0)
    colours = np.array([[220, 30, 30], [30, 220, 30], [30, 30, 220], [200, 200, 40]])
    for split, per_class in (("train", 20), ("test", 8)):
        labels = np.repeat(np.arange(4), per_class)
        images = colours[labels][:, None, None, :] + rng.normal(0, 25, (len(labels), 16, 16, 3))
        (root / split).mkdir()
        np.save(root / split / "images.npy", images.clip(0, 255).astype(np.uint8))
        np.save(root / split / "labels.npy", labels)
    return root


@pytest.fixture(scope="module")
def shaped(npy_root, tmp_path_factory):
    """checkpoint.pth of one DINO epoch (5 steps) of vit_small resized to width 64, depth 3,
    4 heads, patch 4, on 16px crops."""
    out = tmp_path_factory.mktemp("pretrain")
    args = train_ssl.parse_args([
        "--method", "dino", "--arch", "vit_small", "--embed_dim", "64", "--depth", "3",
        "--num_heads", "4", "--patch_size", "4", "--global_crops_size", "16",
        "--local_crops_number", "0", "--out_dim", "64", "--dataset", "npy",
        "--data_path", str(npy_root), "--batch_size_per_gpu", "16", "--epochs", "1",
        "--warmup_epochs", "0", "--num_workers", "0", "--knn_eval", "false",
        "--tensorboard", "false", "--output_dir", str(out), "--cpu"])
    train_ssl.train_ssl(args)
    return out / "checkpoint.pth"


def local(args):
    """The distributed state of a single process without a process group."""
    args.rank, args.world_size, args.gpu, args.distributed = 0, 1, 0, False
    args.device = torch.device("cpu")
    return args


def common(npy_root, ckpt, out):
    return ["--pretrained_weights", str(ckpt), "--data_path", str(npy_root), "--num_workers", "0",
            "--batch_size_per_gpu", "16", "--output_dir", str(out)]


def assert_shape(args, model):
    assert (args.arch, args.patch_size) == ("vit_small", 4)
    assert {k: getattr(args, k) for k in SHAPE} == SHAPE
    assert (model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads) == (64, 3, 4)


def test_the_checkpoint_records_the_shape_and_every_script_rebuilds_it(shaped, npy_root, tmp_path):
    ckpt = torch.load(shaped, weights_only=True)
    assert {k: ckpt["args"][k] for k in SHAPE} == SHAPE
    teacher, _ = extract_backbone_state(ckpt, "teacher")
    assert len({k.split(".")[1] for k in teacher if k.startswith("blocks.")}) == 3

    # the shared loader, given only the checkpoint: the same tensors, key for key (strict)
    args = eval_args.get_args_parser().parse_args(["--pretrained_weights", str(shaped)])
    model, dim = model_flags.load_backbone(args, default_image_size=32)
    assert_shape(args, model)
    assert dim == 64
    state = model.state_dict()
    assert set(state) == set(teacher)
    assert all(torch.equal(state[k], teacher[k]) for k in state)

    seen = {}  # each script's backbone, as load_backbone built it
    real = model_flags.load_backbone

    def spy(args, *a, **kw):
        model, dim = real(args, *a, **kw)
        seen[len(seen)] = (argparse.Namespace(**vars(args)), model)
        return model, dim

    model_flags.load_backbone = spy
    try:
        res = eval_knn.run_knn(local(eval_knn.get_args_parser().parse_args(
            common(npy_root, shaped, tmp_path / "knn") + ["--nb_knn", "5"])))
        assert 0 <= res["knn"][5][0] <= 100
        res = eval_linear.run_linear(local(eval_linear.get_args_parser().parse_args(
            common(npy_root, shaped, tmp_path / "lin") + [
                "--epochs", "1", "--cached_features", "true", "--n_last_blocks", "3",
                "--tensorboard", "false"])))
        assert res["test_acc"] is not None
        res = finetune.run_finetune(local(finetune.get_args_parser().parse_args(
            common(npy_root, shaped, tmp_path / "ft") + [
                "--epochs", "1", "--warmup_epochs", "0", "--val_split", "16",
                "--save_predictions", "0", "--tensorboard", "false"])))
        assert res["test_acc"] is not None
        attn = visualize_attention.main(visualize_attention.get_args_parser().parse_args([
            "--pretrained_weights", str(shaped), "--data_path", str(npy_root),
            "--output_dir", str(tmp_path / "attn")]))
    finally:
        model_flags.load_backbone = real
    assert len(seen) == 4
    for args, model in seen.values():
        assert_shape(args, model)
    assert attn.shape == (4, 4, 4)  # 4 heads, a 4 x 4 grid of 4px patches on 16px
    assert (tmp_path / "attn" / "attn-head3.png").is_file()
    assert not (tmp_path / "attn" / "attn-head4.png").exists()
    # the fine-tuned checkpoint records the shape too, as the ones of eval_linear.py
    assert torch.load(tmp_path / "ft" / "checkpoint.pth", weights_only=True)["args"]["depth"] == 3


def test_bare_weights_of_any_shape_and_a_deeper_checkpoint(tmp_path, capsys):
    """No args in the file: width and depth from the tensors, the heads guessed at <= 64
    channels each; a checkpoint deeper than the model asked for is refused, never cut."""
    for shape, arch, found in (({"embed_dim": 128, "depth": 2, "num_heads": 2}, "vit_small",
                                {"embed_dim": 128, "depth": 2, "num_heads": 2}),
                               ({"depth": 2}, "vit_small", {"embed_dim": None, "depth": 2,
                                                            "num_heads": None}),
                               ({"embed_dim": 192, "depth": 4}, "vit_nano",
                                {"embed_dim": None, "depth": None, "num_heads": None})):
        net, _ = build_backbone("vit_small", patch_size=8, img_size=[16], **shape)
        torch.save(net.state_dict(), tmp_path / "w.pth")
        args = eval_args.get_args_parser().parse_args(["--pretrained_weights", str(tmp_path / "w.pth")])
        model, _ = model_flags.load_backbone(args, default_image_size=16)
        assert args.arch == arch and {k: getattr(args, k) for k in found} == found
        assert all(torch.equal(model.state_dict()[k], v) for k, v in net.state_dict().items())
    assert "assuming 2 heads" in capsys.readouterr().out
    assert model_flags.guess_num_heads(512) == 8 and model_flags.guess_num_heads(384) == 6

    deep, _ = build_backbone("vit_small", patch_size=8, img_size=[16], embed_dim=64, depth=3,
                             num_heads=4)
    shallow, _ = build_backbone("vit_small", patch_size=8, img_size=[16], embed_dim=64, depth=2,
                                num_heads=4)
    torch.save(deep.state_dict(), tmp_path / "deep.pth")
    with pytest.raises(ValueError) as e:
        load_pretrained_weights(shallow, str(tmp_path / "deep.pth"))
    assert "blocks.2." in str(e.value) and "--depth" in str(e.value)


@pytest.mark.parametrize("argv,words", [
    (["--embed_dim", "65", "--num_heads", "4"], ["--embed_dim 65 is not divisible by --num_heads 4"]),
    (["--arch", "resnet18", "--depth", "3"], ["--depth 3 only sizes a ViT", "--arch resnet18"]),
    (["--depth", "0"], ["must all be >= 1"]),
])
def test_a_shape_that_cannot_be_built_is_one_line(argv, words, capsys):
    with pytest.raises(SystemExit) as e:
        cli.run(lambda: train_ssl.parse_args(["--method", "dino", *argv]))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ")
    assert all(w in err[0] for w in words), err[0]
    with pytest.raises(ValueError) as e:  # the evaluation scripts' flags, the same check
        model_flags.resolve_model_flags(eval_args.get_args_parser().parse_args(argv))
    assert words[0] in str(e.value)


# ============ the ladder ============

def in_process(monkeypatch, commands):
    """subprocess.run for eval_compare.py: the same command line, run in this process
    (runpy, as `python script.py ...`), which saves an interpreter start per run."""
    def run(cmd, **kwargs):
        assert cmd[0] == sys.executable and cmd[1].endswith(".py"), cmd
        commands.append(cmd[1:])
        monkeypatch.setattr(sys, "argv", cmd[1:])
        monkeypatch.delenv("MASTER_PORT", raising=False)  # a fresh port per process group
        try:
            runpy.run_path(cmd[1], run_name="__main__")
        except SystemExit as e:
            return subprocess.CompletedProcess(cmd, e.code)
        return subprocess.CompletedProcess(cmd, 0)
    monkeypatch.setattr(eval_compare.subprocess, "run", run)


def test_the_comparison_ladder_in_one_command(shaped, npy_root, tmp_path, monkeypatch, capsys):
    commands = []
    in_process(monkeypatch, commands)
    out = tmp_path / "ladder"
    args = eval_compare.get_args_parser().parse_args(
        common(npy_root, shaped, out)[:-2] + [
            "--output_dir", str(out), "--evals", "all", "--finetune_variants", "head", "last1",
            "last2", "all", "--linear_epochs", "1", "--finetune_epochs", "1", "--cpu",
            "--mlp_dims", "32", "--linear_args", "--tensorboard false",
            "--finetune_args", "--val_split 16 --save_predictions 0 --tensorboard false"])
    rows = eval_compare.eval_compare(args)
    keys = ["knn", "linear", "mlp", "probe_block1", "probe_block2", "probe_block3",
            "finetune_head", "finetune_last1", "finetune_last2", "finetune"]
    assert list(rows) == keys
    assert len(commands) == 2 * 8  # 8 runs (4 fine-tuning variants), each init
    for cmd in commands:  # every run builds the checkpoint's shape, pretrained or not
        flags = " ".join(cmd)
        assert "--embed_dim 64 --depth 3 --num_heads 4" in flags and "--num_workers 0" in flags
    unfreeze = [c[c.index("--unfreeze_last_blocks") + 1] for c in commands if "finetune.py" in c[0]]
    assert unfreeze == ["0", "1", "2", "-1"] * 2
    assert sum("--pretrained_weights" in c and c[c.index("--pretrained_weights") + 1] == ""
               for c in commands) == 8  # the random-init half

    table = (out / "compare.md").read_text()
    assert "vit_small (embed_dim 64, depth 3, num_heads 4) on npy" in table
    assert "(key 'teacher')" in table
    body = [x for x in table.splitlines() if x.startswith("| ") and "evaluation" not in x]
    assert [x.split(" | ")[0] for x in body] == [
        "| 20-NN top-1 (test/)", "| linear probe top-1 (test/, 1 epoch)",
        "| MLP probe 32 top-1 (test/, 1 epoch)", "| linear probe of block1 (test/, 1 epoch)",
        "| linear probe of block2 (test/, 1 epoch)", "| linear probe of block3 (test/, 1 epoch)",
        "| fine-tuning, head only (test/, best-on-val of 1 epoch)",
        "| fine-tuning, last 1 block + head (test/, best-on-val of 1 epoch)",
        "| fine-tuning, last 2 blocks + head (test/, best-on-val of 1 epoch)",
        "| fine-tuning, all layers (test/, best-on-val of 1 epoch)"]
    saved = json.loads((out / "compare.json").read_text())
    assert saved == json.loads(json.dumps(rows))
    for key, row in saved.items():  # each number is its own run's
        p, q = row["pretrained"], row["random_init"]
        assert f"| {p:.2f} | {q:.2f} | {p - q:+.2f} |" in table
    run = json.loads((out / "random_init" / "finetune_last2" / "results.json").read_text())
    assert saved["finetune_last2"]["random_init"] == run["test_acc"]
    run = json.loads((out / "pretrained" / "probe_layers" / "results.json").read_text())
    assert saved["probe_block2"]["pretrained"] == run["layers"][1]["test_acc"]

    from PIL import Image
    with Image.open(out / "compare.png") as im:
        assert im.size[0] > 1000 and im.size[1] > 300  # two panels: bars and the layer curve
