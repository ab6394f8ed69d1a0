"""Classifier heads shared by the evaluation scripts (eval_linear.py's MLP probe, finetune.py's
--head mlp), so that no script imports another."""
import torch.nn as nn


class MLPClassifier(nn.Module):
    """The non-linear head: [Linear-BN-ReLU] per hidden width, then Linear (keys mlp.*).
    MLPClassifier(384, 10, [512, 256]): 384 -> 512 -> 256 -> 10."""

    def __init__(self, dim, num_labels, hidden_dims):
        super().__init__()
        layers = []
        for h in hidden_dims:
            layers += [nn.Linear(dim, h), nn.BatchNorm1d(h), nn.ReLU(inplace=True)]
            dim = h
        self.mlp = nn.Sequential(*layers, nn.Linear(dim, num_labels))

    def forward(self, x):
        return self.mlp(x.view(x.size(0), -1))
