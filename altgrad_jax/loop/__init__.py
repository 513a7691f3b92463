"""The host loop around the jitted step: batches, metrics read a step late, evaluation,
checkpoints, alerts, tracking, progress and signals.

trainer.py        `train`: the loop itself, and `StepResults` (what the host does with each step)
alerts.py         AlertMonitor: metrics -> `Action` (continue, save, stop) and alerts
tracker.py        the Tracker interface every log implements
local_tracker.py  metrics.jsonl and alerts.jsonl (always on), `read_jsonl`
wandb_tracker.py  Weights & Biases, which never stops a run
progress.py       a tqdm bar on a terminal, plain lines otherwise
interrupts.py     SIGINT/SIGTERM as a stop at the next step boundary
summary.py        the lines printed when a run ends
"""
