"""`minitron demo`: the whole method on the embedded corpus, end to end, with a report.

    config.py   DemoConfig (every knob of the demo, documented) and the default pruning targets
    run.py      the stages on every rank of one torchrun job: teacher (cached), importance, plans,
                pruned checkpoints, zero-shot losses, retraining arms at equal tokens
    report.py   results.json -> report.md (tables, the paper's findings and whether this run agrees)
    plots.py    PNG plots (matplotlib, the `plot` extra)
    moe.py      `demo --moe`: a MoE teacher halved by whole experts, by expert width and by random
                experts at equal total parameters, each distilled at equal tokens (reuses run.py's stages)
    moe_report.py  its results.json and report.md (which arm wins)

Only run.py and moe.py import megatron; the report and the plots are computed from results.json and the
arms' metrics.jsonl files, so they can be rebuilt without a process group.
"""
