"""Weighted k-NN evaluation of a frozen backbone, as facebookresearch/dino eval_knn.py, plus
few-shot episodes and patch-token features for ViT transfer.

    python eval_knn.py --pretrained_weights out/checkpoint.pth --dataset digits
    torchrun --nproc_per_node=2 eval_knn.py --pretrained_weights out/checkpoint.pth \
        --dataset imagefolder --data_path ../shared/data/cifar10-jpeg
    python eval_knn.py --arch vit_small --patch_size 16 \
        --pretrained_weights dino_deitsmall16_pretrain.pth --dataset imagefolder --data_path /imagenet
Few-shot (K labelled images per class drawn from the train split, E seeded episodes; 1-NN,
K-NN and logistic regression, mean and std over the episodes):
    python eval_knn.py --pretrained_weights out/checkpoint.pth --n_shot 5 --n_episodes 20 --logreg true
ViT transfer with mean-pooled patch tokens of the last 4 blocks (the DINO seed's STL-10 runs):
    python eval_knn.py --arch vit_small --pretrained_weights dino_deitsmall16_pretrain.pth \
        --dataset stl10 --data_path ../shared/data --use_cls false --n_last_blocks 4

Without --pretrained_weights the backbone keeps its random init (the baseline). Model flags
(--arch, --patch_size, --image_size) default to the values stored in our checkpoints.
"""
import argparse
import os

import numpy as np
import torch
import torch.nn.functional as F

from core import dist as distu
from core.checkpoint import load_backbone
from core.logger import bool_flag
from data import DATASETS, build_dataset, dataset_info, eval_transform
from models import ARCHS, extract_features as backbone_features, feature_dim, is_vit


def get_args_parser(add_help=True):
    parser = argparse.ArgumentParser("Evaluation with weighted k-NN", add_help=add_help)
    parser.add_argument("--batch_size_per_gpu", default=128, type=int, help="Per-GPU batch-size")
    parser.add_argument("--nb_knn", default=None, nargs="+", type=int,
                        help="Number of NN to use. 20 is usually working the best. Default: "
                             "10 20 100 200; with --n_shot K: 1 and K.")
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
                             "without it (SimCLR, rotation) falls back to its one network.")
    parser.add_argument("--n_last_blocks", default=1, type=int,
                        help="ViT: concatenate the features of the last n blocks (iBOT); with "
                             "--use_cls false, the patch-token means of the last n blocks.")
    parser.add_argument("--avgpool_patchtokens", default=0, type=int, choices=[0, 1, 2],
                        help="ViT: 0 = CLS token, 1 = mean-pooled patch tokens, 2 = both (iBOT).")
    parser.add_argument("--use_cls", default=True, type=bool_flag,
                        help="ViT: false mean-pools the patch tokens of each of the last "
                             "--n_last_blocks blocks instead of taking the CLS token; often "
                             "better when transferring to another dataset (STL-10).")
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

    # Few-shot
    parser.add_argument("--n_shot", default=0, type=int,
                        help="K > 0: few-shot evaluation with K labelled train images per class "
                             "as the memory bank (1, 5, 10 are usual); 0: the full train split.")
    parser.add_argument("--n_episodes", default=10, type=int,
                        help="Few-shot episodes, each a fresh seeded draw of the K shots; the "
                             "mean and std over episodes are reported.")
    parser.add_argument("--logreg", default=False, type=bool_flag,
                        help="Few-shot: also fit scikit-learn's logistic regression on the "
                             "L2-normalised shots (Tian et al. 2020's strong baseline).")
    parser.add_argument("--logreg_C", default=1.0, type=float,
                        help="Inverse L2 strength of the logistic regression (sklearn's C).")
    parser.add_argument("--seed", default=0, type=int,
                        help="Seed of the few-shot draws: episode e uses seed + e.")
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


def feature_function(n_last_blocks=1, avgpool_patchtokens=0, use_cls=True):
    """model, images (B, 3, H, W) -> features (B, F): models.extract_features, or with
    use_cls=False (ViT) the patch-token means of the last n blocks, concatenated (B, n * D)."""
    if use_cls:
        return lambda model, x: backbone_features(model, x, n_last_blocks, avgpool_patchtokens)

    def patch_means(model, x):
        if not is_vit(model):  # a ResNet's features are already pooled
            return backbone_features(model, x)
        feature_dim(model, n_last_blocks)  # one-line error for an n outside 1..depth
        return torch.cat([o[:, 1:].mean(dim=1) for o in model.get_intermediate_layers(x, n_last_blocks)],
                         dim=-1)
    return patch_means


@torch.no_grad()
def extract_features(model, dataset, batch_size, num_workers, device, n_last_blocks=1,
                     avgpool_patchtokens=0, normalize=True, feature_fn=None):
    """Features (N, F) of every image of `dataset`, in dataset order, on every rank: each rank
    runs its shard; shards are all-gathered. L2-normalised unless normalize=False.
    feature_fn(model, images (B, 3, H, W)) -> (B, F) replaces models.extract_features (e.g.
    the logits of a classifier, or every layer's features concatenated)."""
    if feature_fn is None:
        feature_fn = feature_function(n_last_blocks, avgpool_patchtokens)
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
            feats = feature_fn(model, images).float()
        if features is None:
            features = torch.zeros(len(dataset), feats.shape[-1], device=device)
        features.index_copy_(0, distu.all_gather_nograd(index), distu.all_gather_nograd(feats))
    return F.normalize(features, dim=1) if normalize else features


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


def sample_few_shot(labels, n_shot, seed, num_classes=None):
    """Indices of n_shot items of every class 0..C-1, drawn without replacement with
    numpy's default_rng(seed), grouped by class. Unlabelled items (label < 0) are never drawn."""
    labels = np.asarray(labels)
    num_classes = num_classes or int(labels.max()) + 1
    rng = np.random.default_rng(seed)
    picked = []
    for c in range(num_classes):
        pool = np.flatnonzero(labels == c)
        if len(pool) < n_shot:
            raise SystemExit(f"error: class {c} has only {len(pool)} labelled train images, fewer "
                             f"than --n_shot {n_shot}; lower --n_shot")
        picked.append(rng.choice(pool, n_shot, replace=False))
    return np.concatenate(picked)


def logreg_accuracy(train_features, train_labels, test_features, test_labels, C=1.0, seed=0):
    """Top-1 (%) of scikit-learn's multinomial logistic regression fit on L2-normalised
    train features (Tian et al. 2020, https://arxiv.org/abs/2003.11539)."""
    from sklearn.linear_model import LogisticRegression
    x_train = F.normalize(train_features.float(), dim=1).cpu().numpy()
    x_test = F.normalize(test_features.float(), dim=1).cpu().numpy()
    clf = LogisticRegression(C=C, max_iter=1000, random_state=seed)
    clf.fit(x_train, np.asarray(train_labels))
    return 100.0 * float((clf.predict(x_test) == np.asarray(test_labels)).mean())


def few_shot_eval(train_f, train_labels, test_f, test_labels, num_classes, n_shot, n_episodes,
                  nb_knn, T=0.07, logreg=False, logreg_C=1.0, seed=0):
    """E episodes of K-shot classification of the whole test split. Returns
    {name: {"mean", "std", "accs"}} for "<k>-NN" (weighted k-NN, k capped at K * C) and
    "logreg"; std is the sample standard deviation over episodes (0 for one episode)."""
    accs = {}
    for episode in range(n_episodes):
        idx = torch.as_tensor(sample_few_shot(train_labels, n_shot, seed + episode, num_classes))
        shots_f, shots_y = train_f[idx.to(train_f.device)], torch.as_tensor(train_labels)[idx]
        for k in nb_knn:
            top1, _ = knn_classifier(shots_f, shots_y, test_f, test_labels, k, T, num_classes)
            accs.setdefault(f"{min(k, len(idx))}-NN", []).append(top1)
        if logreg:
            accs.setdefault("logreg", []).append(
                logreg_accuracy(shots_f, shots_y, test_f, test_labels, logreg_C, seed + episode))
    return {name: {"mean": float(np.mean(a)), "std": float(np.std(a, ddof=1)) if len(a) > 1 else 0.0,
                   "accs": a} for name, a in accs.items()}


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


def check_args(args):
    if args.n_shot < 0 or args.n_episodes < 1:
        raise SystemExit(f"error: --n_shot {args.n_shot} / --n_episodes {args.n_episodes} are "
                         "invalid; use --n_shot >= 0 (0: full k-NN) and --n_episodes >= 1")
    if not args.use_cls and args.avgpool_patchtokens:
        raise SystemExit("error: --use_cls false already mean-pools the patch tokens; drop "
                         "--avgpool_patchtokens (or keep it with --use_cls true)")
    if args.nb_knn is not None and min(args.nb_knn) < 1:
        raise SystemExit(f"error: --nb_knn {args.nb_knn} has a k below 1; use k >= 1")
    if args.nb_knn is None:
        args.nb_knn = [10, 20, 100, 200] if not args.n_shot else sorted({1, args.n_shot})


def run_knn(args):
    """The evaluation itself (the process group must exist). Returns on rank 0
    {"knn": {k: (top1, top5)}} or, with --n_shot, {"few_shot": few_shot_eval(...)}; {} elsewhere."""
    check_args(args)
    info = dataset_info(args.dataset, args.data_path)
    if args.load_features:
        feats = torch.load(os.path.join(args.load_features, "features.pth"), map_location="cpu")
        train_f, test_f = feats["train_features"], feats["test_features"]
        train_labels, test_labels = feats["train_labels"], feats["test_labels"]
        num_classes = int(feats["num_classes"])
    else:
        if not args.pretrained_weights and args.image_size is None:
            args.image_size = info.image_size  # random init: pick the stem for this resolution
        model, _ = load_backbone(args)
        model.to(args.device)
        args.image_size = args.image_size or info.image_size
        if not args.use_cls and not is_vit(model):
            print("Note: --use_cls false only changes ViT features; a ResNet's are pooled already.")
        transform = eval_transform(args.image_size, info.mean, info.std)
        train = build_dataset(args.dataset, args.data_path, "train", transform)
        test = build_dataset(args.dataset, args.data_path, "test", transform)
        print(f"Data loaded with {len(train)} train and {len(test)} val imgs.")
        fn = feature_function(args.n_last_blocks, args.avgpool_patchtokens, args.use_cls)
        print("Extracting features for train set...")
        train_f = extract_features(model, train, args.batch_size_per_gpu, args.num_workers,
                                   args.device, feature_fn=fn)
        print("Extracting features for val set...")
        test_f = extract_features(model, test, args.batch_size_per_gpu, args.num_workers,
                                  args.device, feature_fn=fn)
        train_labels, test_labels = torch.as_tensor(train.targets), torch.as_tensor(test.targets)
        num_classes = train.num_classes
        if args.dump_features and distu.is_main_process():
            from core.checkpoint import save_atomic
            os.makedirs(args.dump_features, exist_ok=True)
            save_atomic({"train_features": train_f.cpu(), "test_features": test_f.cpu(),
                         "train_labels": train_labels, "test_labels": test_labels,
                         "num_classes": num_classes},
                        os.path.join(args.dump_features, "features.pth"))
    results = {}
    if distu.is_main_process():
        if args.use_cuda and args.device.type == "cuda":
            train_f, test_f = train_f.to(args.device), test_f.to(args.device)
        else:
            train_f, test_f = train_f.cpu(), test_f.cpu()
        if args.n_shot:
            print(f"Features are ready!\nStart {args.n_episodes} episodes of {args.n_shot}-shot "
                  f"classification ({args.n_shot} train images per class).")
            results["few_shot"] = few_shot_eval(
                train_f, train_labels, test_f, test_labels, num_classes, args.n_shot,
                args.n_episodes, args.nb_knn, args.temperature, args.logreg, args.logreg_C, args.seed)
            for name, r in results["few_shot"].items():
                print(f"{args.n_shot}-shot {name} classifier result: Top1: {r['mean']:.2f} "
                      f"+- {r['std']:.2f} (mean +- std over {args.n_episodes} episodes)")
        else:
            print("Features are ready!\nStart the k-NN classification.")
            results["knn"] = {}
            for k in args.nb_knn:
                top1, top5 = knn_classifier(train_f, train_labels, test_f, test_labels, k,
                                            args.temperature, num_classes)
                results["knn"][k] = (top1, top5)
                print(f"{k}-NN classifier result: Top1: {top1}, Top5: {top5}")
    return results


def eval_knn(args):
    check_args(args)  # bad flags fail before any process group exists
    distu.init_distributed_mode(args)
    print("\n".join(f"{k}: {v}" for k, v in sorted(vars(args).items())))
    results = run_knn(args)
    distu.cleanup()
    return results


if __name__ == "__main__":
    eval_knn(get_args_parser().parse_args())
