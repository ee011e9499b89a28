"""The training console without torchrun: a tqdm bar on a pseudo-terminal, whole lines into a pipe.

(tests/test_tracking.py checks both modes again through a real stage run.)
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import termios
from types import SimpleNamespace

from stepc.runtime.loop.console import Console, echo

# stage 1 is half done at 5,000 tok/s with 1,000 tokens per step; stage 2 costs twice stage 1's FLOPs
STAGES = [SimpleNamespace(index=1, steps=20, flops=1e12, tokens=10**6), SimpleNamespace(index=2, steps=20, flops=2e12, tokens=10**6)]


def drive(stream) -> None:
    console = Console(1, STAGES, 0, 1000, True, stream)
    console.update(10, 3.2, 1e-3, 5000.0, 0.41, 2_500_000_000)
    echo("eval stage 1 step 10: heldout ppl 24.50")
    console.update(20, 3.1, 5e-4, 5000.0, None, 2_500_000_000)
    console.close()
    stream.flush()


def test_terminal_gets_a_bar_redrawn_in_place():
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 200, 0, 0))
    with os.fdopen(slave, "w") as stream:
        drive(stream)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 1 << 16)
        except OSError:  # EIO: the terminal's writer is closed and everything was read
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    out = b"".join(chunks).decode()
    assert re.search(r"\r(?!\n)", out)
    # 10 steps left at 0.2 s each; the run: half of stage 1 + stage 2 = 2.5e12 FLOPs at 5e9 FLOP/s
    assert re.search(r"stage 1/2 10/20 \|[^|]+\| loss 3.2000 lr 1.00e-03 5,000 tok/s MFU 41.0% proc peak 2.500 GB "
                     r"eta stage 0:00:02 run 0:08:20", out), out
    assert "eval stage 1 step 10: heldout ppl 24.50" in out
    assert re.search(r"stage 1/2 20/20 \|[^|]+\| loss 3.1000 lr 5.00e-04 5,000 tok/s proc peak 2.500 GB eta stage 0:00:00 run 0:06:40", out)


def test_a_pipe_gets_whole_lines_only():
    read, write = os.pipe()
    with os.fdopen(write, "w") as stream:
        drive(stream)
    with os.fdopen(read) as pipe:
        out = pipe.read()
    assert "\r" not in out
    assert out.splitlines() == [
        "stage 1/2 step 10/20 loss 3.2000 lr 1.00e-03 5,000 tok/s MFU 41.0% proc peak 2.500 GB eta stage 0:00:02 run 0:08:20",
        "stage 1/2 step 20/20 loss 3.1000 lr 5.00e-04 5,000 tok/s proc peak 2.500 GB eta stage 0:00:00 run 0:06:40",
    ]


def test_etas_count_the_steps_left_exactly():
    """At a rate where one step moves each rounded ETA: 1,000 tokens per step at 100 tok/s is 10 s a
    step, so stage 1 at step 7 of 20 has 13 steps left = 130 s (12 would read 0:02:00, 14 0:02:20).
    The run: 13/20 of stage 1's 1e12 FLOPs + stage 2's 2e12 = 2.65e12 FLOPs at 100 tok/s x 1e12 FLOPs
    / 1e6 tokens = 1e8 FLOP/s = 26,500 s (a step of stage 1 is 500 s of it)."""
    console = Console(1, STAGES, 0, 1000, enabled=False)
    fields = console.fields(7, 3.0, 1e-3, 100.0, None, None)
    assert fields[-2:] == ["eta stage 0:02:10", "run 7:21:40"]
    later = Console(2, STAGES, 0, 1000, enabled=False).fields(19, 3.0, 1e-3, 100.0, None, None)
    # the last stage: 1 step left = 10 s; its FLOPs rate is 100 x 2e12 / 1e6 = 2e8, 1/20 of 2e12 = 1e11 -> 500 s
    assert later[-2:] == ["eta stage 0:00:10", "run 0:08:20"]
