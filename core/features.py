"""Features of a whole dataset from a frozen backbone, in dataset order on every rank:

    extract_dataset_features(model, dataset, ...)   features (N, F), L2-normalised by default
    feature_function(n_last_blocks, avgpool_patchtokens, use_cls)   which tokens make a feature
    indexed_batches(dataset, ...)   (images, their indices), this rank's shard
"""
import datetime
import time

import torch
import torch.nn.functional as F

from core import amp
from core import dist as distu
from core.eval_data import LoadedSplit
from data.loaders import epoch_indices
from models import extract_features, feature_dim, is_vit


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
        return lambda model, x: extract_features(model, x, n_last_blocks, avgpool_patchtokens)

    def patch_means(model, x):
        if not is_vit(model):  # a ResNet's features are already pooled
            return extract_features(model, x)
        feature_dim(model, n_last_blocks)  # one-line error for an n outside 1..depth
        return torch.cat([o[:, 1:].mean(dim=1) for o in model.get_intermediate_layers(x, n_last_blocks)],
                         dim=-1)
    return patch_means


def indexed_batches(dataset, batch_size, num_workers, device):
    """(images, their indices in `dataset`) on `device`, this rank's shard in the order of
    DistributedSampler(shuffle=False), whose shards are padded to one length with the first
    indices again (harmless: the same image's features land twice in the same row).
    A LoadedSplit's batches come from its loader, which visits that very order; its index
    lists are recomputed here (data.loaders.epoch_indices)."""
    if isinstance(dataset, LoadedSplit):
        loader = dataset.loader
        order = torch.tensor(epoch_indices(len(dataset), 0, loader.seed, loader.rank,
                                           loader.world_size, shuffle=False))
        loader.set_epoch(0)
        for i, (images, _) in enumerate(loader):
            yield images, order[i * loader.batch_size:(i + 1) * loader.batch_size].to(device)
        return
    indexed = IndexedDataset(dataset)
    sampler = torch.utils.data.DistributedSampler(indexed, shuffle=False) \
        if distu.get_world_size() > 1 else None
    loader = torch.utils.data.DataLoader(indexed, sampler=sampler, batch_size=batch_size,
                                         num_workers=num_workers, pin_memory=device.type == "cuda",
                                         drop_last=False)
    for images, index in loader:
        yield images.to(device, non_blocking=True), index.to(device, non_blocking=True)


@torch.no_grad()
def extract_dataset_features(model, dataset, batch_size, num_workers, device, feature_fn=None,
                             normalize=True, precision="bf16", progress_secs=10.0, what="features"):
    """Features (N, F) of every image of `dataset` (a dataset, or a LoadedSplit of eval_split),
    in dataset order, on every rank: each rank runs its shard; shards are all-gathered.
    L2-normalised unless normalize=False.
    feature_fn(model, images (B, 3, H, W)) -> (B, F), default models.extract_features (the CLS
    token / pooled map); also e.g. a classifier's logits. Forward under autocast(precision).
    Progress: a line '<what>: <done>/<N> images  eta ...' whenever progress_secs have passed
    since the last (0: after every batch), and '<what>: N/N images in <time>' at the end;
    None: silent. The count is known on the host, so it costs no device sync."""
    feature_fn = feature_fn or feature_function()
    model.eval()
    features = None
    start = last = time.time()
    done, total = 0, len(dataset)
    for images, index in indexed_batches(dataset, batch_size, num_workers, device):
        with amp.autocast(precision, device):
            feats = feature_fn(model, images).float()
        if features is None:
            features = torch.zeros(total, feats.shape[-1], device=device)
        index = distu.all_gather_nograd(index)
        features.index_copy_(0, index, distu.all_gather_nograd(feats))
        done = min(done + len(index), total)  # (the padded last shards repeat a few images)
        now = time.time()
        if progress_secs is not None and now - last >= progress_secs and done < total:
            last = now
            eta = datetime.timedelta(seconds=int((now - start) / done * (total - done)))
            print(f"{what}: {done}/{total} images  eta {eta}", flush=True)
    if progress_secs is not None:
        took = datetime.timedelta(seconds=int(time.time() - start))
        print(f"{what}: {total}/{total} images in {took}", flush=True)
    return F.normalize(features, dim=1) if normalize else features
