"""Weighted k-NN evaluation of a frozen backbone, as facebookresearch/dino eval_knn.py, plus
the plain majority vote and the Euclidean distance, few-shot episodes and patch-token features
for ViT transfer.

    python eval_knn.py --pretrained_weights out/checkpoint.pth --dataset digits
    torchrun --nproc_per_node=2 eval_knn.py --pretrained_weights out/checkpoint.pth \
        --data_path /path/to/cifar10
    python eval_knn.py --arch vit_small --patch_size 16 \
        --pretrained_weights dino_deitsmall16_pretrain.pth --dataset imagefolder --data_path /imagenet
Few-shot (K labelled images per class drawn from the train split, E seeded episodes; 1-NN,
K-NN and logistic regression, mean and std over the episodes):
    python eval_knn.py --pretrained_weights out/checkpoint.pth --n_shot 5 --n_episodes 20 --logreg true
The plain 5-NN of scikit-learn's KNeighborsClassifier (one vote per neighbour, ties to the
smallest class index; Euclidean distance on the unnormalised features, or cosine):
    python eval_knn.py --pretrained_weights out/checkpoint.pth --nb_knn 5 --knn_vote majority \
        --knn_metric euclidean
ViT transfer with mean-pooled patch tokens of the last 4 blocks (the DINO ViT-S/16 STL-10
transfer recipe):
    python eval_knn.py --arch vit_small --pretrained_weights dino_deitsmall16_pretrain.pth \
        --dataset stl10 --data_path /path/to/stl10 --use_cls false --n_last_blocks 4

Without --pretrained_weights the backbone keeps its random init (the baseline). Model flags
(--arch, --patch_size, --image_size) default to the values stored in the checkpoint. The
shared flags (model, features, data, run) are in core/eval_args.py; with --output_dir the
results are also written to <output_dir>/results.json.
"""
import json
import os

import numpy as np
import torch
import torch.nn.functional as F

from core import amp, cli, eval_args, eval_data, model_flags
from core import dist as distu
from core.checkpoint import load_file, make_output_dir, save_atomic
from core.features import extract_dataset_features, feature_function
from core.knn import KNN_METRICS, KNN_VOTES, check_knn_rule, knn_classifier, knn_k_used
from core.logger import bool_flag
from data import dataset_info, eval_transform
from data.normalization import with_norm
from models import is_vit


def get_args_parser():
    parser = cli.ArgumentParser("Evaluation with weighted k-NN",
                                parents=[eval_args.get_args_parser()])
    group = parser.add_argument_group("k-NN")
    group.add_argument("--nb_knn", default=None, nargs="+", type=int,
                       help="Number of NN to use. 20 is usually working the best. Default: "
                            "10 20 100 200; with --n_shot K: 1 and K.")
    group.add_argument("--temperature", default=0.07, type=float,
                       help="Temperature used in the voting coefficient exp(similarity / T) of "
                            "the weighted vote; must be > 0.")
    group.add_argument("--knn_vote", default="weighted", choices=KNN_VOTES,
                       help="weighted: each neighbour votes with weight exp(similarity / T) "
                            "(DINO); majority: one vote each, ties to the smallest class index "
                            "(scikit-learn's KNeighborsClassifier).")
    group.add_argument("--knn_metric", default="cosine", choices=KNN_METRICS,
                       help="cosine: similarity of the L2-normalised features (DINO); "
                            "euclidean: distance between the features as extracted, not "
                            "normalised (with --knn_vote weighted: weight exp(-distance / T)).")
    group.add_argument("--use_cuda", default=True, type=bool_flag,
                       help="Keep the feature matrices on the GPU (faster; needs its memory).")
    group.add_argument("--use_cls", default=True, type=bool_flag,
                       help="ViT: false mean-pools the patch tokens of each of the last "
                            "--n_last_blocks blocks instead of taking the CLS token; often "
                            "better when transferring to another dataset (STL-10).")
    group.add_argument("--dump_features", default=None,
                       help="Folder where to save the computed features (features.pth) "
                            "(default: none, not saved).")
    group.add_argument("--load_features", default=None,
                       help="Folder of features.pth saved by --dump_features, used instead of "
                            "extracting them (default: none, extract).")

    group = parser.add_argument_group("Few-shot")
    group.add_argument("--n_shot", default=0, type=int,
                       help="K > 0: few-shot evaluation with K labelled train images per class "
                            "as the memory bank (1, 5, 10 are usual); 0: the full train split.")
    group.add_argument("--n_episodes", default=10, type=int,
                       help="Few-shot episodes, each a fresh draw of the K shots (episode e "
                            "uses --seed + e); the mean and std over episodes are reported.")
    group.add_argument("--logreg", default=False, type=bool_flag,
                       help="Few-shot: also fit scikit-learn's logistic regression on the "
                            "L2-normalised shots (Tian et al. 2020's strong baseline).")
    group.add_argument("--logreg_C", default=1.0, type=float,
                       help="Inverse L2 strength of the logistic regression (sklearn's C).")
    return parser


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
            raise ValueError(f"class {c} has only {len(pool)} labelled train images, fewer than "
                             f"--n_shot {n_shot}; lower --n_shot")
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
                  nb_knn, T=0.07, logreg=False, logreg_C=1.0, seed=0, vote="weighted",
                  metric="cosine"):
    """E episodes of K-shot classification of the whole test split. Returns
    {name: {"mean", "std", "accs"}} for "<k>-NN" (k-NN of the given vote and metric, k capped
    at K * C) and "logreg"; std is the sample standard deviation over episodes (0 for one
    episode)."""
    accs = {}
    for episode in range(n_episodes):
        idx = torch.as_tensor(sample_few_shot(train_labels, n_shot, seed + episode, num_classes))
        shots_f, shots_y = train_f[idx.to(train_f.device)], torch.as_tensor(train_labels)[idx]
        for k in nb_knn:
            top1, _ = knn_classifier(shots_f, shots_y, test_f, test_labels, k, T, num_classes,
                                     vote, metric)
            accs.setdefault(f"{min(k, len(idx))}-NN", []).append(top1)
        if logreg:
            accs.setdefault("logreg", []).append(
                logreg_accuracy(shots_f, shots_y, test_f, test_labels, logreg_C, seed + episode))
    return {name: {"mean": float(np.mean(a)), "std": float(np.std(a, ddof=1)) if len(a) > 1 else 0.0,
                   "accs": a} for name, a in accs.items()}


def check_args(args):
    eval_args.check_common_args(args)
    if args.n_shot < 0 or args.n_episodes < 1:
        raise ValueError(f"--n_shot {args.n_shot} / --n_episodes {args.n_episodes} are invalid; "
                         "use --n_shot >= 0 (0: full k-NN) and --n_episodes >= 1")
    if not args.use_cls and args.avgpool_patchtokens:
        raise ValueError("--use_cls false already mean-pools the patch tokens; drop "
                         "--avgpool_patchtokens (or keep it with --use_cls true)")
    if args.nb_knn is not None and min(args.nb_knn) < 1:
        raise ValueError(f"--nb_knn {' '.join(map(str, args.nb_knn))} has a k below 1; use k >= 1")
    if args.nb_knn is None:
        args.nb_knn = [10, 20, 100, 200] if not args.n_shot else sorted({1, args.n_shot})
    if args.knn_vote == "weighted" and not 0 < args.temperature < float("inf"):
        raise ValueError(f"--temperature {args.temperature} is invalid: the votes are weighted "
                         "by exp(similarity / T), so T must be > 0 (DINO: 0.07)")
    check_knn_rule(1, args.temperature, args.knn_vote, args.knn_metric)
    if not args.load_features:
        # the scored split is there, the train split (--train_split) labelled
        eval_data.check_eval_data(args, selects=False)


def rule(args):
    """How the neighbours vote, for the printed lines: "weighted vote exp(cosine / 0.07)"."""
    euclidean = args.knn_metric == "euclidean"
    if args.knn_vote == "majority":
        return "majority vote, " + ("euclidean distance" if euclidean else "cosine similarity")
    return f"weighted vote exp({'-euclidean distance' if euclidean else 'cosine'} / " \
           f"{args.temperature:g})"


def loaded_for_metric(train_f, test_f, normalized, metric, folder):
    """Features of --load_features for --knn_metric: L2-normalised ones (as --knn_metric cosine
    dumps them) cannot give Euclidean distances of the features; unnormalised ones are
    normalised for cosine."""
    if metric == "euclidean" and normalized:
        raise ValueError(f"the features in {folder} are L2-normalised (dumped with --knn_metric "
                         f"cosine), so their Euclidean distances would rank the neighbours as the "
                         f"cosine does; dump them again with --knn_metric euclidean "
                         f"--dump_features, or use --knn_metric cosine")
    if metric == "cosine" and not normalized:
        train_f, test_f = F.normalize(train_f.float(), dim=1), F.normalize(test_f.float(), dim=1)
    return train_f, test_f


def extract_train_test(args, info, model):
    """(train features, train labels, test features, test labels, num_classes, the name of the
    scored split) of the backbone `model`."""
    info = with_norm(info, args)  # the statistics the weights were trained with (printed)
    model.to(args.device)
    if not args.use_cls and not is_vit(model):
        print("Note: --use_cls false only changes ViT features; a ResNet's are pooled already.")
    transform = eval_transform(args.image_size, info.mean, info.std)
    train = eval_data.eval_split(args, "train", transform)  # --data_backend tensor or pil
    test = eval_data.eval_split(args, "test", transform)  # the --eval_split folder
    print(f"Data loaded with {len(train)} train imgs ({train.split_name}) and {len(test)} imgs "
          f"to score ({test.split_name}).")
    eval_data.check_scored_split(test)
    fn = feature_function(args.n_last_blocks, args.avgpool_patchtokens, args.use_cls)
    features = []
    for dataset in (train, test):
        print(f"Extracting features for {dataset.split_name} set...")
        features.append(extract_dataset_features(model, dataset, args.batch_size_per_gpu,
                                                 args.num_workers, args.device, feature_fn=fn,
                                                 normalize=args.knn_metric == "cosine",
                                                 precision=args.precision,
                                                 what=f"{dataset.split_name} features"))
    return (features[0], torch.as_tensor(train.targets), features[1], torch.as_tensor(test.targets),
            train.num_classes, test.split_name)


def run_knn(args):
    """The evaluation itself (the process group must exist). Returns on rank 0
    {"knn": {k: (top1, top5)}} (k as used: at most the train images) or, with --n_shot,
    {"few_shot": few_shot_eval(...)}, and "split": the split scored, "vote" and "metric": the
    k-NN's (--knn_vote, --knn_metric); {} elsewhere."""
    check_args(args)
    amp.resolve_precision(args, args.device)
    info = dataset_info(args.dataset, args.data_path)
    # the flags the checkpoint decides (model shape, image size, normalisation), then the listing
    model = None if args.load_features else \
        model_flags.load_backbone(args, default_image_size=info.image_size)[0]
    cli.print_args(args)
    for folder in (args.output_dir, args.dump_features):
        if folder and distu.is_main_process():
            make_output_dir(folder)  # writable, before any feature is extracted
    if args.load_features:
        feats = load_file(os.path.join(args.load_features, "features.pth"), what="features file",
                          missing_hint="pass the --dump_features folder of an earlier eval_knn.py "
                                       "run")
        train_f, test_f = feats["train_features"], feats["test_features"]
        train_labels, test_labels = feats["train_labels"], feats["test_labels"]
        num_classes = int(feats["num_classes"])
        split = str(feats.get("test_split", "the test features of --load_features"))
        train_f, test_f = loaded_for_metric(train_f, test_f, feats.get("normalized", True),
                                            args.knn_metric, args.load_features)
    else:
        train_f, train_labels, test_f, test_labels, num_classes, split = extract_train_test(args, info, model)
        if args.dump_features and distu.is_main_process():
            os.makedirs(args.dump_features, exist_ok=True)
            save_atomic({"train_features": train_f.cpu(), "test_features": test_f.cpu(),
                         "train_labels": train_labels, "test_labels": test_labels,
                         "num_classes": num_classes, "test_split": split,
                         "normalized": args.knn_metric == "cosine"},
                        os.path.join(args.dump_features, "features.pth"))
    results = {}
    if distu.is_main_process():
        results.update(split=split, vote=args.knn_vote, metric=args.knn_metric)
        if args.use_cuda and args.device.type == "cuda":
            train_f, test_f = train_f.to(args.device), test_f.to(args.device)
        else:
            train_f, test_f = train_f.cpu(), test_f.cpu()
        if args.n_shot:
            print(f"Features are ready!\nStart {args.n_episodes} episodes of {args.n_shot}-shot "
                  f"classification ({args.n_shot} train images per class; {rule(args)}).")
            results["few_shot"] = few_shot_eval(
                train_f, train_labels, test_f, test_labels, num_classes, args.n_shot,
                args.n_episodes, args.nb_knn, args.temperature, args.logreg, args.logreg_C,
                args.seed, args.knn_vote, args.knn_metric)
            for name, r in results["few_shot"].items():
                print(f"{args.n_shot}-shot {name} classifier result: Top1: {r['mean']:.2f} "
                      f"+- {r['std']:.2f} (mean +- std over {args.n_episodes} episodes, on {split})")
        else:
            print(f"Features are ready!\nStart the k-NN classification ({rule(args)}).")
            results["knn"] = {}
            used = {k: knn_k_used(k, len(train_f)) for k in args.nb_knn}
            capped = [k for k in args.nb_knn if used[k] < k]
            if capped:
                print(f"note: --nb_knn {' '.join(map(str, capped))} "
                      f"{'exceeds' if len(capped) == 1 else 'exceed'} the {len(train_f)} "
                      f"train images; k = {len(train_f)} is used instead")
            for k in dict.fromkeys(used.values()):  # each k used once, in the asked order
                top1, top5 = knn_classifier(train_f, train_labels, test_f, test_labels, k,
                                            args.temperature, num_classes, args.knn_vote,
                                            args.knn_metric)
                results["knn"][k] = (top1, top5)
                print(f"{k}-NN classifier result: Top1: {top1}, Top5: {top5} (on {split})")
        if args.output_dir:
            os.makedirs(args.output_dir, exist_ok=True)
            with open(os.path.join(args.output_dir, "results.json"), "w") as f:
                json.dump(results, f, indent=1)
    return results


def eval_knn(args):
    check_args(args)  # bad flags fail before any process group exists
    distu.init_distributed_mode(args)
    results = run_knn(args)
    distu.cleanup()
    return results


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    cli.run(lambda: eval_knn(args))
