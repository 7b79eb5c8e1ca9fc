"""`minitron demo`: the whole method on the embedded corpus, end to end, with a report.

    config.py   DemoConfig (every knob of the demo, documented) and the default pruning targets
    run.py      the stages on every rank of one torchrun job: teacher (cached), importance, plans,
                pruned checkpoints, zero-shot losses, retraining arms at equal tokens
    report.py   results.json -> report.md (tables, the paper's findings and whether this run agrees)
    plots.py    PNG plots (matplotlib, the `plot` extra)

Only run.py imports megatron; the report and the plots are computed from results.json and the
arms' metrics.jsonl files, so they can be rebuilt without a process group.
"""
