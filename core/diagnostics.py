"""Collapse diagnostics: numbers that say, while a run trains, whether its representation is
collapsing, and a once-per-epoch check that names the collapse and what to change.

Teacher-student methods (DINO, iBOT), as DINO's section 5.3 and fig. 7
(https://arxiv.org/abs/2104.14294) decompose the loss: H(P_t, P_s) = h(P_t) + KL(P_t || P_s).
    teacher_entropy        h(P_t), mean over samples of the entropy of the centred, sharpened
                           teacher softmax (nats, in [0, ln K])
    teacher_batch_entropy  h(mean over the batch of P_t): how many prototypes the batch uses;
                           minus teacher_entropy, what the output tells about the image (0 nats
                           when every image gets the same output: collapse, see collapse_mode)
    kl                     KL(P_t || P_s), mean over the loss's (teacher, student) pairs
Both collapses send kl to 0. Without sharpening every output goes uniform (h -> ln K); without
centring every image lands on the same dimension (h -> 0, and so does the batch entropy).

Methods with an embedding (SimCLR, rotation):
    emb_std    mean over dimensions of the per-dimension std of z / ||z|| over the batch
               (SimSiam, https://arxiv.org/abs/2011.10566, sec. 4.1): about 1/sqrt(d) for a
               healthy d-dimensional embedding, 0 when every image maps to one point
    erank      effective rank (Roy & Vetterli 2007): exp of the entropy of the singular values
               normalised to sum 1, between 1 (rank one) and min(N, d)

Everything here is computed from tensors the losses already have, under no_grad, and returned
as 0-d tensors for the method's stats dict: no `.item()`, no host-device sync in the step.
DINO and iBOT compute the teacher statistics only every print interval (Every) and repeat them
in between: they are read on printed lines and in the epoch's average only.
The one exception is the SVD behind erank (torch's CUDA solvers check convergence on the host),
so EffectiveRankEvery computes it once every print interval and repeats the value in between.
"""
import math

import torch
import torch.nn.functional as F

TEACHER_KEYS = ("teacher_entropy", "teacher_batch_entropy", "kl")
EMBEDDING_KEYS = ("emb_std", "erank")


def entropy(p, dim=-1):
    """-sum p ln p over `dim`, 0 ln 0 = 0. (torch.special.entr gives the same but is 20-30x
    slower on CPU; clamping p only changes terms below 1e-38.)"""
    return -(p * p.clamp(min=torch.finfo(p.dtype).tiny).log()).sum(dim=dim)


@torch.no_grad()
def teacher_stats(teacher_probs, cross_entropy):
    """teacher_probs: (N, K) the teacher softmax the loss uses (centred, temperature-scaled);
    cross_entropy: 0-d mean over the loss's (teacher row, student row) pairs of -sum q log p,
    where every teacher row is in equally many pairs (true of DINO's and iBOT's [CLS] loss).
    Then the mean KL over the same pairs is cross_entropy - the mean teacher entropy, for free.
    Returns {teacher_entropy, teacher_batch_entropy, kl}, 0-d float32 tensors."""
    p = teacher_probs.float()
    mean_entropy = entropy(p).mean()
    return {"teacher_entropy": mean_entropy, "teacher_batch_entropy": entropy(p.mean(dim=0)),
            "kl": cross_entropy.detach().float() - mean_entropy}


@torch.no_grad()
def embedding_std(z):
    """z: (N, d) -> 0-d mean over the d dimensions of the std over N of z / ||z|| (SimSiam)."""
    return F.normalize(z.detach().float(), dim=1).std(dim=0).mean()


@torch.no_grad()
def effective_rank(z):
    """z: (N, d) -> 0-d exp(-sum p_k ln p_k) with p_k = s_k / sum(s), s the singular values of
    z (Roy & Vetterli 2007; RankMe, https://arxiv.org/abs/2210.02885, uses the same on raw
    embeddings). Identity-like -> about min(N, d); rank one -> 1. An SVD: see EffectiveRankEvery.
    NaN when z is not finite (the SVD would raise, before train_ssl's own non-finite check
    could stop the run with its one clear line), decided on the device: no sync."""
    z = z.detach().float()
    finite = torch.isfinite(z).all()
    s = torch.linalg.svdvals(torch.where(finite, z, torch.zeros_like(z)))
    erank = torch.exp(entropy(s / s.sum().clamp(min=1e-12)))
    return torch.where(finite, erank, torch.full_like(erank, float("nan")))


class EffectiveRankEvery:
    """effective_rank(z) at iterations it % freq == 0 (and on the first call), the last value
    in between, so that the key is in every step's stats and its epoch average stays a mean
    over steps. freq: the print interval (train_ssl's --print_freq), as the value is only
    looked at when a line is printed."""

    def __init__(self, freq=10):
        self.freq, self.value = max(int(freq), 1), None

    def __call__(self, z, it):
        if self.value is None or it % self.freq == 0:
            self.value = effective_rank(z)
        return self.value


class Every:
    """For statistics only looked at on printed lines: due(it) is true at iterations
    it % freq == 0 (and on the first call); keep(value) stores a fresh value (None: keep the
    last) and returns it, so that every step's stats have the keys and their epoch average stays
    a mean over steps. freq: train_ssl's --print_freq."""

    def __init__(self, freq=10):
        self.freq, self.value = max(int(freq), 1), None

    def due(self, it):
        return self.value is None or it % self.freq == 0

    def keep(self, value):
        if value is not None:
            self.value = value
        return self.value


def embedding_stats(z, it, rank_every):
    """z: (N, d) embeddings -> {emb_std, erank}; rank_every: an EffectiveRankEvery."""
    return {"emb_std": embedding_std(z), "erank": rank_every(z, it)}


# ============ the per-epoch check ============

# One bit: below it, the teacher's output says almost nothing about which image it saw.
MIN_INFORMATION = math.log(2)

def collapse_mode(stats, out_dim):
    """stats: an epoch's averaged stats (names as the methods log them, optionally with a
    'train_' prefix); out_dim: K. Returns "uniform", "one-dimension" or None.

    Collapse is an output that does not depend on the image. Over a batch, how much the
    teacher's output tells about the image is the mutual information
        I = teacher_batch_entropy - teacher_entropy = h(mean_n p_n) - mean_n h(p_n) >= 0,
    0 exactly when every image gets the same distribution, whatever that distribution is.
    Collapsed: I < ln 2 (one bit). Then the mode:
        uniform        ln K - teacher_entropy < ln 2: every output within one bit of uniform
                       (no sharpening: entropy -> ln K)
        one-dimension  otherwise: the same peaked output for every image, its mass on the
                       same few dimensions (no centring: entropy on its way to 0)
    Why I and not only "entropy near ln K" or "near 0": on digits (ViT of depth 4, width 96,
    K = 1024, batch 64), a run without centring had I = 0.08, 0.05, 0.04 nats in epochs 1-3
    while its entropy went 4.9, 3.9, 3.4 of ln K = 6.9 on its way down; the entropy alone
    would have said nothing for many epochs. A run without sharpening (teacher temperature 1)
    sat at entropy = ln K, I = 0; one with DINO's defaults at 6.87 and I = 0.05 by epoch 2,
    its loss stuck at ln K. The paper's end states pass I < ln 2 too: within one bit of ln K
    leaves the batch mean at most one bit higher, and a batch mean within one bit of one-hot
    bounds I by that bit.
    A random-init ViT teacher is collapsed by this measure (I = 0.3 nats on digits: its
    features barely depend on the image), hence the check only after --warmup_epochs, and
    never on epoch 0, whose EMA teacher is still close to that random init (a one-epoch run
    with --warmup_epochs 0 would otherwise always be warned about). With
    B images per GPU the batch can show at most ln(2B) nats, so the check needs B >= 4 or so.
    """
    def get(name):
        return stats.get(name, stats.get(f"train_{name}"))

    entropy, batch_entropy = get("teacher_entropy"), get("teacher_batch_entropy")
    if entropy is None or batch_entropy is None or not out_dim:
        return None
    if batch_entropy - entropy >= MIN_INFORMATION:
        return None
    return "uniform" if math.log(out_dim) - entropy < MIN_INFORMATION else "one-dimension"


def check_collapse(stats, out_dim, epoch, warmup_epochs=0, advice=None):
    """Once per epoch, after the epoch's stats are averaged: from epoch max(warmup_epochs, 1)
    on (epoch 0's teacher is near its random init, which reads as collapsed), print one
    warning line naming the collapse mode, and what to change when the method's `advice`
    ({mode: text naming its flags}) has it. Training goes on. Returns the mode or None (always
    None for stats without teacher statistics). A teacher-student method calls it from its
    diagnose() (methods/__init__.py)."""
    if epoch < max(warmup_epochs, 1):
        return None
    mode = collapse_mode(stats, out_dim)
    if mode is not None:
        entropy = stats.get("teacher_entropy", stats.get("train_teacher_entropy"))
        batch = stats.get("teacher_batch_entropy", stats.get("train_teacher_batch_entropy"))
        fix = (advice or {}).get(mode)
        print(f"warning: {mode} collapse at epoch {epoch}: the teacher's output hardly depends "
              f"on the image (teacher entropy {entropy:.3g}, batch entropy {batch:.3g}, "
              f"ln K = {math.log(out_dim):.3g})" + (f"; {fix}." if fix else "."), flush=True)
    return mode
