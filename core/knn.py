"""k-NN classification of features: DINO's weighted vote (Wu et al. 2018) and the majority
vote, by cosine similarity or Euclidean distance.

    knn_classifier(...)   top-1 / top-5 of test features against a memory bank
    knn_predict(...)      the predicted class of each test feature
    knn_rank(...)         the classes of a batch of queries, best first (both votes, both metrics)
    check_knn_rule(...)   one-line errors for a k, temperature, vote or metric that cannot vote
    KNNEvaluator          a backbone's k-NN on splits built once (train_ssl.py's --knn_freq)
    knn_eval_backbone()   the same, once
"""
import torch

from core.eval_data import check_scored_split, eval_split
from core.features import extract_dataset_features
from data import build_dataset, dataset_info, eval_transform


def knn_k_used(k, n_train):
    """The k a k-NN over n_train memory-bank images can use: at most all of them."""
    return min(k, n_train)


KNN_VOTES = ("weighted", "majority")
KNN_METRICS = ("cosine", "euclidean")


def check_knn_rule(k, T, vote="weighted", metric="cosine"):
    """One-line ValueErrors for a k-NN that cannot vote: k < 1, a temperature that is not a
    positive number (weighted vote), an unknown vote or metric."""
    if vote not in KNN_VOTES or metric not in KNN_METRICS:
        raise ValueError(f"k-NN vote '{vote}' / metric '{metric}' is unknown; use a vote of "
                         f"{', '.join(KNN_VOTES)} and a metric of {', '.join(KNN_METRICS)}")
    if vote == "weighted" and (not T > 0 or T == float("inf")):
        raise ValueError(f"k-NN temperature {T} is invalid: the votes are weighted by "
                         f"exp(similarity / T), so T must be a positive number (DINO: 0.07)")
    if k < 1:
        raise ValueError(f"k-NN with k = {k} has no neighbours; use k >= 1")


@torch.no_grad()
def knn_rank(train_features, train_labels, feats, k, T, num_classes, vote="weighted",
             metric="cosine"):
    """The classes (b, num_classes) of the queries `feats` (b, F), best first, by a vote of
    their k nearest train features (k <= N). metric: "cosine", the similarity s = x . y of
    L2-normalised features (DINO), or "euclidean", s = -||x - y|| on the features as they are.
    vote: "weighted" (Wu et al. 2018, DINO), each neighbour votes for its class with weight
    exp(s / T) (euclidean: exp(-(d - d_nearest) / T), the same ranking as exp(-d / T) without
    its underflow); "majority", one vote each, classes with as many votes ranked by their
    index, smallest first, as scikit-learn's KNeighborsClassifier (weights="uniform") breaks
    ties. Neighbours at equal distance are taken in topk's order."""
    if metric == "cosine":
        similarity = feats @ train_features.T                               # (b, N)
    else:
        similarity = -torch.cdist(feats, train_features)                    # (b, N)
    distances, indices = similarity.topk(k, largest=True, sorted=True)      # (b, k)
    retrieved = train_labels[indices]                                       # (b, k)
    b = feats.shape[0]
    one_hot = torch.zeros(b * k, num_classes, device=feats.device)
    one_hot.scatter_(1, retrieved.view(-1, 1), 1)
    if vote == "majority":
        votes = one_hot.view(b, k, num_classes).sum(1)
        return votes.sort(dim=1, descending=True, stable=True).indices
    if metric == "euclidean":
        distances = distances - distances[:, :1]
    weights = distances.div(T).exp()
    probs = (one_hot.view(b, k, num_classes) * weights.view(b, k, 1)).sum(1)
    return probs.argsort(1, descending=True)


@torch.no_grad()
def knn_classifier(train_features, train_labels, test_features, test_labels, k, T,
                   num_classes=1000, vote="weighted", metric="cosine"):
    """k-NN classification of the test features by the train features (the memory bank):
    by default DINO's, the weighted vote (Wu et al. 2018) of the k nearest by cosine
    similarity s, each with weight exp(s / T); vote="majority" and metric="euclidean" are the
    alternatives of knn_rank. Cosine needs L2-normalised features (extract_dataset_features'
    default); euclidean takes them as they are. train_features (N, F), train_labels (N,),
    test_features (M, F), test_labels (M,). Returns (top1, top5) in percent; k is capped at N
    (knn_k_used), top-5 uses min(5, k, num_classes) guesses."""
    check_knn_rule(k, T, vote, metric)
    top1, top5, total = 0.0, 0.0, 0
    k = knn_k_used(k, train_features.shape[0])
    n5 = min(5, k, num_classes)
    train_labels = train_labels.to(train_features.device)
    test_labels = test_labels.to(train_features.device)
    chunk = 256  # fixed chunks (DINO's n_test // 100 chunking breaks below 100 test images)
    for i in range(0, test_features.shape[0], chunk):
        feats = test_features[i:i + chunk].to(train_features.device)
        targets = test_labels[i:i + chunk]
        predictions = knn_rank(train_features, train_labels, feats, k, T, num_classes, vote,
                               metric)
        correct = predictions.eq(targets.view(-1, 1))
        top1 += correct[:, :1].sum().item()
        top5 += correct[:, :n5].sum().item()
        total += targets.shape[0]
    return top1 * 100.0 / total, top5 * 100.0 / total


@torch.no_grad()
def knn_predict(train_features, train_labels, test_features, k, T=0.07, num_classes=None,
                vote="weighted", metric="cosine"):
    """The predicted class (M,) of every test feature, as knn_classifier scores it."""
    check_knn_rule(k, T, vote, metric)
    num_classes = num_classes or int(train_labels.max()) + 1
    k = knn_k_used(k, train_features.shape[0])
    train_labels = train_labels.to(train_features.device)
    return torch.cat([knn_rank(train_features, train_labels,
                               test_features[i:i + 256].to(train_features.device), k, T,
                               num_classes, vote, metric)[:, 0]
                      for i in range(0, test_features.shape[0], 256)])


class KNNEvaluator:
    """Weighted k-NN top-1/top-5 of a backbone on a labelled dataset: `train` (a dataset or a
    LoadedSplit) is the memory bank, `test` the queries, both through the deterministic eval
    transform. Built once, so train_ssl.py calls it every --knn_freq epochs and for its final
    check; each call extracts the features of both splits once (all ranks take part, as in
    extract_dataset_features) and prints a line before it starts."""

    def __init__(self, train, test, k, batch_size, num_workers, device, temperature=0.07,
                 precision="bf16", name="", progress_secs=10.0):
        self.train, self.test = train, test
        self.progress_secs = progress_secs  # extract_dataset_features' progress lines
        self.train_labels = torch.as_tensor(train.targets)
        self.test_labels = torch.as_tensor(test.targets)
        self.k, self.temperature, self.name = k, temperature, name
        self.batch_size, self.num_workers = batch_size, num_workers
        self.device, self.precision = device, precision
        # what prints, log.txt and TensorBoard name: the k used and the split scored
        self.k_used = knn_k_used(k, len(train))
        self.split_name = getattr(test, "split_name", "test")
        self.split_key = getattr(test, "split_key", "test")
        if self.k_used < k:
            print(f"note: k = {k} exceeds the {len(train)} train images; the k-NN uses "
                  f"k = {self.k_used}", flush=True)
        check_scored_split(test)

    @classmethod
    def for_run(cls, args, info):
        """train_ssl.py's: --dataset's train/test splits at the training resolution, read
        through --data_backend as the evaluation scripts read them (eval_split)."""
        transform = eval_transform(args.input_size, info.mean, info.std)
        return cls(eval_split(args, "train", transform), eval_split(args, "test", transform),
                   args.knn_k, args.batch_size_per_gpu, args.num_workers, args.device,
                   precision=args.precision, name=args.dataset)

    def describe(self):
        """ "20-NN top-1 on cifar10 test", "20-NN top-1 on imagefolder val/": the k used and
        the split scored, for the lines that print the result."""
        return f"{self.k_used}-NN top-1 on {self.name} {self.split_name}"

    def __call__(self, model, what=""):
        """(top1, top5) in percent of `model` (left in eval mode)."""
        train_name = getattr(self.train, "split_name", "train")
        print(f"{self.k_used}-NN evaluation{' of the ' + what if what else ''}: features of "
              f"{len(self.train)} {self.name} {train_name} and {len(self.test)} "
              f"{self.split_name} images ...", flush=True)
        train_f, test_f = (extract_dataset_features(model, d, self.batch_size, self.num_workers,
                                                    self.device, precision=self.precision,
                                                    progress_secs=self.progress_secs,
                                                    what=f"{split} features")
                           for split, d in (("train", self.train), ("test", self.test)))
        return knn_classifier(train_f, self.train_labels, test_f, self.test_labels, self.k,
                              self.temperature, self.train.num_classes)


def knn_eval_backbone(model, dataset_name, data_path, image_size, k, batch_size, num_workers,
                      device, temperature=0.07, precision="bf16", eval_split="auto"):
    """k-NN top-1/top-5 of `model` on a labelled dataset (train split as memory bank, test split
    as queries, PIL eval transform), once; KNNEvaluator when the same splits are evaluated again."""
    info = dataset_info(dataset_name, data_path)
    transform = eval_transform(image_size, info.mean, info.std)
    train, test = (build_dataset(dataset_name, data_path, split, transform, eval_split=eval_split)
                   for split in ("train", "test"))
    return KNNEvaluator(train, test, k, batch_size, num_workers, device, temperature,
                        precision, dataset_name)(model)
