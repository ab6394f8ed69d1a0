"""Training plumbing shared by the scripts, one topic per file:

dist.py        distributed init (torchrun, SLURM, one process), gathers with gradients
optim.py       parameter groups, LARS, cosine schedules, gradient clipping
checkpoint.py  atomic save, resume, loading pretrained weights into a backbone
logger.py      MetricLogger (periodic progress line), bool_flag
amp.py         --precision / --use_fp16, autocast, GradScaler, the one backward step
evaluation.py  what the evaluation scripts share: flags, checkpoint -> model flags, features,
               k-NN, default output folders and the resume guard
cli.py         the edge: a library's ValueError/OSError -> one `error: ...` line, exit code 2
report.py      classification report, prediction grid and bar chart of the evaluation scripts
"""
