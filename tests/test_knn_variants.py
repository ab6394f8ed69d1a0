"""k-NN variants (issue 21, item 4): beside DINO's weighted cosine vote, the plain majority vote
and the Euclidean distance, checked against scikit-learn's KNeighborsClassifier on the same
features; DINO's default unchanged; few-shot with each; eval_knn.py's flags end to end."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.neighbors import KNeighborsClassifier

import eval_knn
from core import cli
from core.knn import knn_classifier, knn_predict


def _features(seed=0, n_train=300, n_test=200, dim=16, classes=6):
    """Continuous random features (no two train points at the same distance from a query),
    classes as overlapping Gaussian clusters, so that 5-NN votes often tie (2-2-1)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g)
    y_train = torch.randint(0, classes, (n_train,), generator=g)
    y_test = torch.randint(0, classes, (n_test,), generator=g)
    x_train = centres[y_train] + 1.5 * torch.randn(n_train, dim, generator=g)
    x_test = centres[y_test] + 1.5 * torch.randn(n_test, dim, generator=g)
    return x_train.double(), y_train, x_test.double(), y_test, classes


def _dino_reference(train_f, train_y, test_f, test_y, k, T, C):
    """DINO's weighted k-NN as its paper and eval_knn.py define it, written out here for one
    query at a time: top-k cosine neighbours, class score sum of exp(s / T), ranked."""
    top1 = top5 = 0
    for x, y in zip(test_f, test_y):
        sim = train_f @ x
        s, idx = sim.topk(k)
        scores = torch.zeros(C, dtype=sim.dtype).index_add_(0, train_y[idx], (s / T).exp())
        ranked = scores.argsort(descending=True)
        top1 += int(ranked[0] == y)
        top5 += int(y in ranked[:min(5, k, C)])
    return 100.0 * top1 / len(test_y), 100.0 * top5 / len(test_y)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_majority_vote_gives_sklearns_predictions(metric):
    x_train, y_train, x_test, y_test, C = _features()
    sk = KNeighborsClassifier(n_neighbors=5, metric=metric, algorithm="brute")
    sk.fit(x_train.numpy(), y_train.numpy())
    expected = sk.predict(x_test.numpy())
    # the data do exercise sklearn's tie rule (the smallest class among those with most votes)
    neigh = sk.kneighbors(x_test.numpy(), return_distance=False)
    counts = np.stack([np.bincount(y_train.numpy()[n], minlength=C) for n in neigh])
    assert ((counts == counts.max(1, keepdims=True)).sum(1) > 1).sum() >= 5

    train, test = (x_train, x_test) if metric == "euclidean" else \
        (F.normalize(x_train, dim=1), F.normalize(x_test, dim=1))
    ours = knn_predict(train, y_train, test, 5, num_classes=C, vote="majority", metric=metric)
    assert np.array_equal(ours.numpy(), expected)
    top1, _ = knn_classifier(train, y_train, test, y_test, 5, 0.07, C, vote="majority",
                             metric=metric)
    assert top1 == pytest.approx(100.0 * (expected == y_test.numpy()).mean())
    # the weighted vote decides some of those ties otherwise: the two rules differ here
    weighted = knn_predict(train, y_train, test, 5, 0.07, C, metric=metric)
    assert not torch.equal(weighted, ours)


def test_the_default_stays_dinos_weighted_cosine_vote():
    x_train, y_train, x_test, y_test, C = _features(seed=1)
    train, test = F.normalize(x_train, dim=1).float(), F.normalize(x_test, dim=1).float()
    for k, T in ((20, 0.07), (5, 0.5), (1, 0.07)):
        expected = _dino_reference(train, y_train, test, y_test, k, T, C)
        assert knn_classifier(train, y_train, test, y_test, k, T, C) == pytest.approx(expected)
        assert knn_classifier(train, y_train, test, y_test, k, T, C, vote="weighted",
                              metric="cosine") == pytest.approx(expected)
    # euclidean weighted: exp(-d / T) ranks as the exp(-(d - d_min) / T) computed, no underflow
    far = x_train * 100, x_test * 100  # distances of hundreds: exp(-d / 0.07) is 0 in float64
    top1, _ = knn_classifier(far[0], y_train, far[1], y_test, 20, 0.07, C, metric="euclidean")
    one_nn, _ = knn_classifier(far[0], y_train, far[1], y_test, 1, 0.07, C, metric="euclidean")
    assert top1 == pytest.approx(one_nn)  # T small against the gaps: the nearest decides


@pytest.mark.parametrize("vote,metric", [("weighted", "cosine"), ("majority", "cosine"),
                                         ("weighted", "euclidean"), ("majority", "euclidean")])
def test_few_shot_with_each_vote_and_metric(vote, metric):
    x_train, y_train, x_test, y_test, C = _features(seed=2)
    train, test = (x_train, x_test) if metric == "euclidean" else \
        (F.normalize(x_train, dim=1), F.normalize(x_test, dim=1))  # as eval_knn.py extracts them
    res = eval_knn.few_shot_eval(train, y_train, test, y_test, C, n_shot=5, n_episodes=3,
                                 nb_knn=[1, 5], vote=vote, metric=metric)
    assert set(res) == {"1-NN", "5-NN"}
    for episode, acc in enumerate(res["1-NN"]["accs"]):  # 1-NN: sklearn's on the same shots
        idx = eval_knn.sample_few_shot(y_train.numpy(), 5, episode, C)
        sk = KNeighborsClassifier(n_neighbors=1, metric=metric, algorithm="brute")
        sk.fit(x_train[idx].numpy(), y_train[idx].numpy())
        assert acc == pytest.approx(100.0 * (sk.predict(x_test.numpy()) == y_test.numpy()).mean())
    if vote == "majority":
        for episode, acc in enumerate(res["5-NN"]["accs"]):
            idx = eval_knn.sample_few_shot(y_train.numpy(), 5, episode, C)
            sk = KNeighborsClassifier(n_neighbors=5, metric=metric, algorithm="brute")
            sk.fit(x_train[idx].numpy(), y_train[idx].numpy())
            right = sk.predict(x_test.numpy()) == y_test.numpy()
            assert acc == pytest.approx(100.0 * right.mean())


def _local(args):
    args.rank, args.world_size, args.gpu, args.distributed = 0, 1, 0, False
    args.device = torch.device("cpu")
    return args


def _npy(root, seed=0):
    rng = np.random.default_rng(seed)
    for split, n in (("train", 48), ("test", 24)):
        (root / split).mkdir(parents=True)
        labels = np.arange(n) % 4
        base = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40]])[labels]
        images = base[:, None, None, :] + rng.normal(0, 60, (n, 16, 16, 3))
        np.save(root / split / "images.npy", images.clip(0, 255).astype(np.uint8))
        np.save(root / split / "labels.npy", labels)
    return root


def test_eval_knn_flags_end_to_end(tmp_path, capsys):
    """eval_knn.py --knn_vote majority --knn_metric euclidean scores what sklearn's 5-NN scores
    on the features it extracted (unnormalised, dumped with --dump_features); a dump of
    normalised features refuses the Euclidean distance in one line."""
    root = _npy(tmp_path / "npy")
    common = ["--arch", "resnet18", "--image_size", "16", "--data_path", str(root),
              "--num_workers", "0", "--batch_size_per_gpu", "32"]
    args = _local(eval_knn.get_args_parser().parse_args(common + [
        "--nb_knn", "5", "--knn_vote", "majority", "--knn_metric", "euclidean",
        "--dump_features", str(tmp_path / "feats"), "--output_dir", str(tmp_path / "out")]))
    res = eval_knn.run_knn(args)
    assert "majority vote, euclidean distance" in capsys.readouterr().out
    feats = torch.load(tmp_path / "feats" / "features.pth", weights_only=True)
    assert feats["normalized"] is False
    assert not torch.allclose(feats["train_features"].norm(dim=1), torch.ones(48))
    sk = KNeighborsClassifier(n_neighbors=5).fit(feats["train_features"].numpy(),
                                                 feats["train_labels"].numpy())
    expected = 100.0 * (sk.predict(feats["test_features"].numpy())
                        == feats["test_labels"].numpy()).mean()
    assert res["knn"][5][0] == pytest.approx(expected)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert (saved["vote"], saved["metric"]) == ("majority", "euclidean")

    # the same dump, cosine: normalised as it is loaded, DINO's vote on it
    args = _local(eval_knn.get_args_parser().parse_args(common + [
        "--nb_knn", "5", "--load_features", str(tmp_path / "feats")]))
    res = eval_knn.run_knn(args)
    f = {k: F.normalize(feats[f"{k}_features"], dim=1) for k in ("train", "test")}
    assert res["knn"][5] == pytest.approx(knn_classifier(
        f["train"], feats["train_labels"], f["test"], feats["test_labels"], 5, 0.07, 4))

    # a cosine dump (normalised) cannot give Euclidean distances: one line, the way out
    eval_knn.run_knn(_local(eval_knn.get_args_parser().parse_args(common + [
        "--nb_knn", "5", "--dump_features", str(tmp_path / "cos")])))
    args = _local(eval_knn.get_args_parser().parse_args(common + [
        "--knn_metric", "euclidean", "--load_features", str(tmp_path / "cos")]))
    with pytest.raises(SystemExit):
        cli.run(lambda: eval_knn.run_knn(args))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "L2-normalised" in err[0] and "--knn_metric euclidean" in err[0]


def test_help_shows_the_vote_and_metric_with_defaults(capsys):
    with pytest.raises(SystemExit):
        eval_knn.get_args_parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--knn_vote {weighted,majority}" in text and "(default: weighted)" in text
    assert "--knn_metric {cosine,euclidean}" in text and "(default: cosine)" in text


def test_eval_compare_one_knn_row_per_vote():
    import eval_compare
    args = eval_compare.get_args_parser().parse_args([
        "--pretrained_weights", "w.pth", "--evals", "knn", "--knn_k", "5",
        "--knn_votes", "weighted", "majority", "--knn_args", "--knn_metric euclidean"])
    eval_compare.check_args(args)
    args.arch = "resnet18"
    runs = eval_compare.runs(args, depth=4)
    assert [(name, script) for name, script, _ in runs] == [("knn", "eval_knn.py"),
                                                            ("knn_majority", "eval_knn.py")]
    assert [" ".join(flags) for _, _, flags in runs] == [
        "--nb_knn 5 --knn_vote weighted --knn_metric euclidean",
        "--nb_knn 5 --knn_vote majority --knn_metric euclidean"]
    assert eval_compare.row_label("knn", "test/", args) == "5-NN top-1 (test/)"
    assert eval_compare.row_label("knn_majority", "test/", args, "majority vote, euclidean") \
        == "5-NN top-1, majority vote, euclidean (test/)"
