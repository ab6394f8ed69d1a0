"""What a ViT looks at: the last block's [CLS] self-attention, one map per head, as
facebookresearch/dino visualize_attention.py.

    python visualize_attention.py --pretrained_weights out/dino/checkpoint.pth --threshold 0.6
    python visualize_attention.py --pretrained_weights dino_deitsmall8_pretrain.pth \
        --image_path cat.jpg --image_size 480 480 --threshold 0.6 --output_dir attn/

Writes PNGs to --output_dir (drawn with matplotlib; shared flags: core/eval_args.py):
    img.png                      the (resized) input image
    attn-head{j}.png             head j's attention from [CLS] to every patch (viridis colours,
                                 each map scaled to its own min..max: plt.imsave, as DINO)
    mask_th{t}_head{j}.png       with --threshold t: the image with the smallest set of patches
                                 that holds a fraction t of head j's attention mass tinted and
                                 outlined
    attention.png                all of the above in one figure, titled, with colour bars
Without --image_path the image is sample --sample_index of --dataset's test split. Model flags
(--arch, --patch_size) left unset come from our checkpoints' args or, for released weights,
from the shape of the patch embedding (without weights: vit_small/8, as DINO's script). Works
with official DINO/iBOT checkpoints. Default --output_dir:
out/visualize_attention/<weights folder>_<weights file>_<image name or dataset_index>.
With --tensorboard true, attention.png also goes to TensorBoard under <output_dir>/tb.
"""
import math
import os

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from core import cli, eval_args, eval_runs, model_flags
from core.logger import bool_flag
from core.report import DPI, figure_to_array, new_figure, save_figure
from data import DatasetInfo, build_dataset, dataset_info
from data.datasets import IMAGENET_MEAN, IMAGENET_STD
from data.normalization import with_norm
from models import is_vit


def get_args_parser():
    parser = cli.ArgumentParser("Visualize Self-Attention maps", parents=[
        eval_args.model_parser(image_size=False), eval_args.data_parser()])
    group = parser.add_argument_group("Image and maps")
    group.add_argument("--image_path", default=None, type=str,
                       help="Path of the image to load (normalised with the statistics the "
                            "weights were trained with, see --norm_stats; ImageNet's without "
                            "weights); default: a --dataset sample.")
    group.add_argument("--sample_index", default=0, type=int,
                       help="Index of the test-split image to show.")
    group.add_argument("--image_size", default=None, type=int, nargs="+",
                       help="Resize image: H W, or one number for the shorter side (default: "
                            "the training crop size from the checkpoint, else 480 480).")
    group.add_argument("--threshold", type=float, default=None,
                       help="Also save masks keeping this fraction of the attention mass; "
                            "DINO's figures use 0.6 (default: none, no masks).")
    group.add_argument("--display_scale", default=0, type=int,
                       help="Integer nearest-neighbour upscaling of the saved PNGs; 0: enough "
                            "for a shorter side of at least 256 px (32px images become 256px).")
    group.add_argument("--tensorboard", default=False, type=bool_flag,
                       help="Also log attention.png as an image to <output_dir>/tb.")
    return parser


# ============ attention ============

@torch.no_grad()
def cls_attention_maps(model, img):
    """img (1, 3, H, W) with H, W multiples of the patch size -> (heads, H/p, W/p): the last
    block's softmax attention of the [CLS] query to each patch (the [CLS] key's share is left
    out, so a map sums to 1 minus that share)."""
    attentions = model.get_last_selfattention(img)  # (1, heads, 1+N, 1+N)
    nh = attentions.shape[1]
    h, w = img.shape[-2] // model.patch_size, img.shape[-1] // model.patch_size
    return attentions[0, :, 0, 1:].reshape(nh, h, w)


def threshold_masks(attentions, threshold):
    """attentions (heads, h, w) -> bool (heads, h, w): per head, the smallest set of patches
    whose attention holds at least `threshold` of the head's total patch attention (DINO: sort
    ascending, normalise, keep where the cumulative sum exceeds 1 - threshold)."""
    nh, h, w = attentions.shape
    val, idx = torch.sort(attentions.reshape(nh, -1), dim=1)
    val = val / val.sum(dim=1, keepdim=True)
    keep_sorted = torch.cumsum(val, dim=1) > (1 - threshold)
    keep = torch.zeros_like(keep_sorted).scatter_(1, idx, keep_sorted)  # undo the sort
    return keep.reshape(nh, h, w)


# ============ drawing (matplotlib) ============

def upscale(x, factor):
    """(..., H, W) -> (..., H*factor, W*factor), nearest neighbour."""
    if factor == 1:
        return x
    return x.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


def head_color(j):
    """One colour per head for the masks (matplotlib's tab10)."""
    from matplotlib import colormaps
    return colormaps["tab10"](j % 10)[:3]


def save_heat_map(attention, path):
    """attention (H, W) -> a PNG of exactly H x W pixels, viridis, scaled to its own min..max
    (plt.imsave, as DINO's script; matplotlib.image.imsave needs no pyplot)."""
    from matplotlib.image import imsave
    imsave(path, attention.numpy(), cmap="viridis", format="png")


def draw_mask(ax, image, mask, color, alpha=0.5):
    """image (H, W, 3) in [0, 1], mask bool (H, W): the image, the mask tinted with `color`
    and outlined, no axes."""
    overlay = np.zeros(mask.shape + (4,))
    overlay[mask] = (*color, alpha)
    ax.imshow(image, interpolation="nearest")
    ax.imshow(overlay, interpolation="nearest")
    if mask.any() and not mask.all():
        ax.contour(mask.astype(float), levels=[0.5], colors=[color], linewidths=1.5)
    ax.set_axis_off()


def save_mask(image, mask, color, path, title):
    """image (H, W, 3), mask bool (H, W) -> a PNG of about the image's size with a title."""
    h, w = mask.shape
    fig = new_figure(max(w, 160) / DPI, max(h, 160) / DPI + 0.3)
    ax = fig.add_subplot()
    draw_mask(ax, image, mask, color)
    ax.set_title(title, fontsize=8)
    save_figure(fig, path)


def attention_figure(image, attentions, masks=None, threshold=None, title=""):
    """One figure: the image, then one panel per head with its attention map and a colour bar
    (the [CLS] query's softmax weight on each patch), and with masks a second row of the image
    with each head's mask.
    image (H, W, 3) in [0, 1]; attentions (heads, H, W) upsampled to pixels; masks bool
    (heads, H, W) or None."""
    nh = len(attentions)
    cols = nh + 1
    rows = 1 if masks is None else 2
    from matplotlib.ticker import MaxNLocator
    fig = new_figure(2.3 * cols + 0.4, 2.1 * rows + 0.5)
    ax = fig.add_subplot(rows, cols, 1)
    ax.imshow(image, interpolation="nearest")
    ax.set_title("image", fontsize=9)
    ax.set_axis_off()
    for j in range(nh):
        ax = fig.add_subplot(rows, cols, j + 2)
        im = ax.imshow(attentions[j].numpy(), cmap="viridis", interpolation="nearest")
        bar = fig.colorbar(im, ax=ax, shrink=0.9, fraction=0.08)
        bar.locator = MaxNLocator(4)  # four readable ticks rather than eight tiny ones
        bar.update_ticks()
        bar.ax.tick_params(labelsize=8)
        ax.set_title(f"head {j}", fontsize=9)
        ax.set_axis_off()
    if masks is not None:
        for j in range(nh):
            ax = fig.add_subplot(rows, cols, cols + j + 2)
            draw_mask(ax, image, masks[j].numpy(), head_color(j))
            ax.set_title(f"head {j}: {threshold:g} of the mass", fontsize=8)
    fig.suptitle(title or "last block: [CLS] attention to each patch", fontsize=10)
    return fig


# ============ script ============

def load_image(args):
    """-> (PIL RGB image, mean, std): the statistics resolved by load_backbone (by default
    those the weights were trained with), else ImageNet's for --image_path and the dataset's."""
    if args.image_path:
        if not os.path.isfile(args.image_path):
            raise FileNotFoundError(f"--image_path {args.image_path} does not exist; pass the path "
                                    "of an image file")
        with open(args.image_path, "rb") as f:
            info = DatasetInfo(None, 0, IMAGENET_MEAN, IMAGENET_STD)
            info = with_norm(info, args)
            return Image.open(f).convert("RGB"), info.mean, info.std
    info = with_norm(dataset_info(args.dataset, args.data_path or None), args)
    dataset = build_dataset(args.dataset, args.data_path or None, "test", eval_split=args.eval_split)
    if not 0 <= args.sample_index < len(dataset):
        raise ValueError(f"--sample_index {args.sample_index} is outside the {len(dataset)} "
                         f"{dataset.split_name} images of {args.dataset}; pick 0..{len(dataset) - 1}")
    return dataset[args.sample_index][0], info.mean, info.std


def main(args):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    eval_args.check_common_args(args)
    if args.image_size is not None and len(args.image_size) > 2:
        raise ValueError(f"--image_size takes H W or one number, not {len(args.image_size)} values")
    if args.threshold is not None and not 0 < args.threshold <= 1:
        raise ValueError(f"--threshold {args.threshold} is not a fraction; use a value in (0, 1], "
                         "e.g. 0.6")
    if not args.pretrained_weights and args.patch_size is None:
        args.patch_size = 8  # the official script's default
    if args.image_path and not args.pretrained_weights and args.norm_stats == "checkpoint":
        args.norm_stats = "imagenet"  # random init on a picture: ImageNet's, as DINO's script
    requested_size = args.image_size
    args.image_size = None  # load_backbone fills it with the training crop size, if known
    model, _ = model_flags.load_backbone(args)
    if not is_vit(model):
        raise ValueError(f"--arch {args.arch} has no self-attention; attention maps need a ViT "
                         "(vit_tiny, vit_small, vit_base)")
    model.eval().to(device)
    for p in model.parameters():
        p.requires_grad = False

    size = requested_size or ([args.image_size] if args.image_size else [480, 480])
    pil, mean, std = load_image(args)
    img = T.Compose([T.Resize(size if len(size) == 2 else size[0],
                              interpolation=T.InterpolationMode.BICUBIC),
                     T.ToTensor(), T.Normalize(mean, std)])(pil)
    # make the image divisible by the patch size
    p = args.patch_size
    h, w = img.shape[1] - img.shape[1] % p, img.shape[2] - img.shape[2] % p
    if h == 0 or w == 0:
        raise ValueError(f"the image ({img.shape[1]}x{img.shape[2]}) is smaller than one {p}x{p} "
                         "patch; raise --image_size")
    img = img[:, :h, :w].unsqueeze(0).to(device)

    attentions = cls_attention_maps(model, img).float().cpu()  # (heads, h/p, w/p)
    nh = attentions.shape[0]
    scale = args.display_scale or max(1, math.ceil(256 / min(h, w)))
    subject = os.path.splitext(os.path.basename(args.image_path))[0] if args.image_path \
        else f"{args.dataset}_{args.sample_index}"
    args.output_dir = args.output_dir or eval_runs.default_output_dir("visualize_attention", args, subject)
    os.makedirs(args.output_dir, exist_ok=True)
    shown = img[0].cpu() * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    shown = upscale(shown.clamp(0, 1), scale).permute(1, 2, 0).numpy()  # (H, W, 3)
    from matplotlib.image import imsave
    imsave(os.path.join(args.output_dir, "img.png"), shown, format="png")
    heat = upscale(attentions, p * scale)  # nearest upsampling to pixels, as DINO
    for j in range(nh):
        fname = os.path.join(args.output_dir, f"attn-head{j}.png")
        save_heat_map(heat[j], fname)
        print(f"{fname} saved.")
    masks = None
    if args.threshold is not None:
        masks = upscale(threshold_masks(attentions, args.threshold), p * scale)
        for j in range(nh):
            fname = os.path.join(args.output_dir, f"mask_th{args.threshold}_head{j}.png")
            save_mask(shown, masks[j].numpy(), head_color(j), fname,
                      f"head {j}: {args.threshold:g} of the attention mass")
            print(f"{fname} saved.")
    name = os.path.basename(args.image_path) if args.image_path else \
        f"{args.dataset} test #{args.sample_index}"
    fig = attention_figure(shown, heat, masks, args.threshold,
                           f"{args.arch}/{p}: last-block [CLS] attention, {name}")
    fname = os.path.join(args.output_dir, "attention.png")
    save_figure(fig, fname)
    print(f"{fname} saved.")
    if args.tensorboard:
        from torch.utils.tensorboard import SummaryWriter
        with SummaryWriter(os.path.join(args.output_dir, "tb")) as writer:
            writer.add_image("attention", figure_to_array(fig), 0, dataformats="HWC")
    return attentions


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    cli.run(lambda: main(args))
