"""Training plumbing shared by the scripts, one topic per file:

dist.py         distributed init (torchrun, SLURM, one process), gathers with gradients
optim.py        parameter groups, LARS, cosine schedules, gradient clipping
checkpoint.py   atomic save, resume, loading pretrained weights into a backbone
preempt.py      preemption: signals, mid-epoch checkpoints, SLURM requeue, an exact resume
logger.py       MetricLogger (periodic progress line), bool_flag
amp.py          --precision / --use_fp16, autocast, GradScaler, the one backward step
syncbn.py       BatchNorm with the statistics of the global batch, on any device
diagnostics.py  collapse diagnostics of a training run and the check that names a collapse
curves.py       curves.png of a run, from the JSON lines of its log.txt
cli.py          the edge: a library's ValueError/OSError -> one `error: ...` line, exit code 2

What the evaluation scripts (and train_ssl.py's k-NN check) share, so no script imports another:
eval_args.py    the flags they share (parent parsers), check_common_args
model_flags.py  checkpoint -> model flags -> backbone (load_backbone), the file read once
eval_data.py    the labelled splits (eval_split, train_loader) and the checks before reading them
features.py     features (N, F) of a whole dataset, in dataset order on every rank
knn.py          k-NN classification (DINO's weighted vote, majority vote), KNNEvaluator
eval_runs.py    default output folder, the run's flags and the resume guard
report.py       classification report, prediction grid and bar chart of the evaluation scripts
"""
