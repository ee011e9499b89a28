"""The training loop of one stage (train.py) and what it is made of: the LM-head loss (loss.py),
the learning-rate schedule (lr.py), compute precision (precision.py), checkpoints (checkpoint.py),
stopping at a step boundary (preempt.py), metrics and MFU (metrics.py, flops.py), the console and
experiment trackers (console.py, tracking.py), and the diagnostics a run needs: out-of-memory
messages (oom.py), the host-sync check (syncdebug.py) and the tests' fault injection (faults.py)."""
