"""Weighted k-NN evaluation of a frozen backbone, as facebookresearch/dino eval_knn.py.

    python eval_knn.py --pretrained_weights out/checkpoint.pth --dataset digits
    torchrun --nproc_per_node=2 eval_knn.py --pretrained_weights out/checkpoint.pth \
        --dataset imagefolder --data_path ../shared/data/cifar10-jpeg
    python eval_knn.py --arch vit_small --patch_size 16 \
        --pretrained_weights dino_deitsmall16_pretrain.pth --dataset imagefolder --data_path /imagenet

Without --pretrained_weights the backbone keeps its random init (the baseline). Model flags
(--arch, --patch_size, --image_size) default to the values stored in our checkpoints.
"""
import argparse
import os

import torch
import torch.nn.functional as F

from core import dist as distu
from core.checkpoint import load_backbone
from core.logger import bool_flag
from data import DATASETS, build_dataset, dataset_info, eval_transform
from models import ARCHS, extract_features as backbone_features


def get_args_parser(add_help=True):
    parser = argparse.ArgumentParser("Evaluation with weighted k-NN", add_help=add_help)
    parser.add_argument("--batch_size_per_gpu", default=128, type=int, help="Per-GPU batch-size")
    parser.add_argument("--nb_knn", default=[10, 20, 100, 200], nargs="+", type=int,
                        help="Number of NN to use. 20 is usually working the best.")
    parser.add_argument("--temperature", default=0.07, type=float,
                        help="Temperature used in the voting coefficient")
    parser.add_argument("--pretrained_weights", default="", type=str,
                        help="Path to pretrained weights to evaluate; empty: random init.")
    parser.add_argument("--use_cuda", default=True, type=bool_flag,
                        help="Keep the feature matrices on the GPU (faster; needs its memory).")
    parser.add_argument("--arch", default=None, type=str, choices=ARCHS,
                        help="Architecture (default: from the checkpoint, else vit_small).")
    parser.add_argument("--patch_size", default=None, type=int,
                        help="ViT patch size (default: from the checkpoint, else 16).")
    parser.add_argument("--cifar_stem", default=None, type=bool_flag,
                        help="ResNet CIFAR stem (default: from the checkpoint / image size).")
    parser.add_argument("--checkpoint_key", default="teacher", type=str,
                        help='Key to use in the checkpoint (example: "teacher"); a checkpoint '
                             "without it (SimCLR) falls back to its one network.")
    parser.add_argument("--n_last_blocks", default=1, type=int,
                        help="ViT: concatenate the CLS tokens of the last n blocks (iBOT).")
    parser.add_argument("--avgpool_patchtokens", default=0, type=int, choices=[0, 1, 2],
                        help="ViT: 0 = CLS token, 1 = mean-pooled patch tokens, 2 = both (iBOT).")
    parser.add_argument("--dump_features", default=None,
                        help="Path where to save computed features, empty for no saving")
    parser.add_argument("--load_features", default=None,
                        help="If the features have already been computed, where to find them.")
    parser.add_argument("--num_workers", default=10, type=int, help="Data loading workers.")
    parser.add_argument("--dist_url", default="env://", type=str,
                        help="url used to set up distributed training")
    parser.add_argument("--local_rank", "--local-rank", default=0, type=int, help="Ignored.")
    parser.add_argument("--dataset", default="digits", type=str, choices=sorted(DATASETS),
                        help="Dataset name; imagefolder expects train/ and val/ (or test/).")
    parser.add_argument("--data_path", default="", type=str, help="Dataset root.")
    parser.add_argument("--image_size", default=None, type=int,
                        help="Evaluation resolution (default: the training crop size stored in "
                             "the checkpoint, else the dataset's native size).")
    parser.add_argument("--cpu", action="store_true", help="Run on CPU even if CUDA is there.")
    return parser


class IndexedDataset(torch.utils.data.Dataset):
    """Returns (image, index) so features can be put back in dataset order after a
    distributed extraction (DistributedSampler pads with duplicates, which is harmless)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.dataset[i][0], i


@torch.no_grad()
def extract_features(model, dataset, batch_size, num_workers, device, n_last_blocks=1,
                     avgpool_patchtokens=0):
    """L2-normalised features (N, F) of every image of `dataset`, in dataset order, on every
    rank. Each rank runs its shard; shards are all-gathered."""
    sampler = torch.utils.data.DistributedSampler(IndexedDataset(dataset), shuffle=False) \
        if distu.get_world_size() > 1 else None
    loader = torch.utils.data.DataLoader(IndexedDataset(dataset), sampler=sampler,
                                         batch_size=batch_size, num_workers=num_workers,
                                         pin_memory=device.type == "cuda", drop_last=False)
    model.eval()
    features = None
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" \
        else torch.autocast("cpu", enabled=False)
    for images, index in loader:
        images, index = images.to(device, non_blocking=True), index.to(device, non_blocking=True)
        with amp:
            feats = backbone_features(model, images, n_last_blocks, avgpool_patchtokens).float()
        if features is None:
            features = torch.zeros(len(dataset), feats.shape[-1], device=device)
        features.index_copy_(0, distu.all_gather_nograd(index), distu.all_gather_nograd(feats))
    return F.normalize(features, dim=1)


@torch.no_grad()
def knn_classifier(train_features, train_labels, test_features, test_labels, k, T,
                   num_classes=1000):
    """Weighted k-NN (Wu et al. 2018, as DINO): each of the k nearest training features (cosine
    similarity s) votes for its class with weight exp(s / T). Features must be L2-normalised.
    train_features (N, F), train_labels (N,), test_features (M, F), test_labels (M,).
    Returns (top1, top5) in percent; top-5 uses min(5, k, num_classes) guesses."""
    top1, top5, total = 0.0, 0.0, 0
    k = min(k, train_features.shape[0])
    n5 = min(5, k, num_classes)
    train_labels = train_labels.to(train_features.device)
    test_labels = test_labels.to(train_features.device)
    chunk = 256  # fixed chunks (DINO's n_test // 100 chunking breaks below 100 test images)
    for i in range(0, test_features.shape[0], chunk):
        feats = test_features[i:i + chunk].to(train_features.device)
        targets = test_labels[i:i + chunk]
        b = targets.shape[0]
        similarity = feats @ train_features.T                               # (b, N)
        distances, indices = similarity.topk(k, largest=True, sorted=True)  # (b, k)
        retrieved = train_labels[indices]                                   # (b, k)
        one_hot = torch.zeros(b * k, num_classes, device=feats.device)
        one_hot.scatter_(1, retrieved.view(-1, 1), 1)
        weights = distances.div(T).exp()
        probs = (one_hot.view(b, k, num_classes) * weights.view(b, k, 1)).sum(1)
        predictions = probs.argsort(1, descending=True)
        correct = predictions.eq(targets.view(-1, 1))
        top1 += correct[:, :1].sum().item()
        top5 += correct[:, :n5].sum().item()
        total += b
    return top1 * 100.0 / total, top5 * 100.0 / total


def knn_eval_backbone(model, dataset_name, data_path, image_size, k, batch_size, num_workers,
                      device, temperature=0.07):
    """k-NN top-1/top-5 of `model` on a labelled dataset (train split as memory bank, test split
    as queries). Used by train_ssl.py's final check."""
    info = dataset_info(dataset_name, data_path)
    transform = eval_transform(image_size, info.mean, info.std)
    train = build_dataset(dataset_name, data_path, "train", transform)
    test = build_dataset(dataset_name, data_path, "test", transform)
    train_f = extract_features(model, train, batch_size, num_workers, device)
    test_f = extract_features(model, test, batch_size, num_workers, device)
    return knn_classifier(train_f, torch.as_tensor(train.targets), test_f,
                          torch.as_tensor(test.targets), k, temperature, train.num_classes)


def eval_knn(args):
    distu.init_distributed_mode(args)
    print("\n".join(f"{k}: {v}" for k, v in sorted(vars(args).items())))
    info = dataset_info(args.dataset, args.data_path)
    if args.load_features:
        feats = torch.load(os.path.join(args.load_features, "features.pth"), map_location="cpu")
        train_f, test_f = feats["train_features"], feats["test_features"]
        train_labels, test_labels = feats["train_labels"], feats["test_labels"]
        num_classes = int(feats["num_classes"])
    else:
        model, _ = load_backbone(args)
        model.to(args.device)
        args.image_size = args.image_size or info.image_size
        transform = eval_transform(args.image_size, info.mean, info.std)
        train = build_dataset(args.dataset, args.data_path, "train", transform)
        test = build_dataset(args.dataset, args.data_path, "test", transform)
        print(f"Data loaded with {len(train)} train and {len(test)} val imgs.")
        print("Extracting features for train set...")
        train_f = extract_features(model, train, args.batch_size_per_gpu, args.num_workers,
                                   args.device, args.n_last_blocks, args.avgpool_patchtokens)
        print("Extracting features for val set...")
        test_f = extract_features(model, test, args.batch_size_per_gpu, args.num_workers,
                                  args.device, args.n_last_blocks, args.avgpool_patchtokens)
        train_labels, test_labels = torch.as_tensor(train.targets), torch.as_tensor(test.targets)
        num_classes = train.num_classes
        if args.dump_features and distu.is_main_process():
            from core.checkpoint import save_atomic
            os.makedirs(args.dump_features, exist_ok=True)
            save_atomic({"train_features": train_f.cpu(), "test_features": test_f.cpu(),
                         "train_labels": train_labels, "test_labels": test_labels,
                         "num_classes": num_classes},
                        os.path.join(args.dump_features, "features.pth"))
    if distu.is_main_process():
        if args.use_cuda and args.device.type == "cuda":
            train_f, test_f = train_f.to(args.device), test_f.to(args.device)
        else:
            train_f, test_f = train_f.cpu(), test_f.cpu()
        print("Features are ready!\nStart the k-NN classification.")
        for k in args.nb_knn:
            top1, top5 = knn_classifier(train_f, train_labels, test_f, test_labels, k,
                                        args.temperature, num_classes)
            print(f"{k}-NN classifier result: Top1: {top1}, Top5: {top5}")
    distu.cleanup()


if __name__ == "__main__":
    eval_knn(get_args_parser().parse_args())
