"""Run by test_faults: the tiny training run of `config`, killed at one point (``os._exit``, which leaves
files as a SIGKILL would: no cleanup, nothing flushed) or, with no point, run to the end.

    python fault_worker.py DATA OUT [POINT COUNT]
    python fault_worker.py --serve

``--serve`` imports torch, timm and the trainer once, then runs each request line of stdin (``DATA OUT
[POINT COUNT] ERR``, tab-separated) in a forked child whose stdout and stderr go to ``ERR``, and answers
with the child's exit code: the same run as the command line's, without paying the imports each time.

POINT: ``step`` (the COUNT-th optimizer step), ``torch.save`` (the COUNT-th file Accelerate writes with
torch.save: optimizer, schedule, RNG, in the middle of a checkpoint), ``os.replace`` (the COUNT-th rename
of a folder: those that complete a checkpoint or swap ``best/`` in), ``checkpoint`` (the COUNT-th
checkpoint, right after that epoch's metrics line), ``write:NAME`` (in the middle of the COUNT-th write of
a file named NAME, or of the temporary file it is written through: half its bytes written) or ``pause``
(at the COUNT-th optimizer step, print "paused" and sleep, holding the run folder, until killed).
"""

import builtins
import io
import os
import sys
import time
import traceback

import torch

from timm_scan.training import RunFolder, TrainConfig, Trainer

calls = 0
count = 0


def die_at(owner, name, counted=lambda *args: True):
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        global calls
        if counted(*args):
            calls += 1
            if calls == count:
                os._exit(9)
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)


def run(data, out, point=None, at=0):
    """The tiny run into ``out``, killed at the ``at``-th ``point`` (see above), or run to the end."""
    global count
    count = at
    if point == "step":
        die_at(torch.optim.SGD, "step")
    elif point == "torch.save":
        die_at(torch, "save")
    elif point == "os.replace":  # the renames of folders, not those of the files written with atomic_write
        die_at(os, "replace", counted=lambda src, dst: os.path.isdir(src))
    elif point == "checkpoint":
        die_at(RunFolder, "save_checkpoint")
    elif point == "pause":
        original_step = torch.optim.SGD.step

        def paused_step(*args, **kwargs):
            global calls
            calls += 1
            if calls == count:
                print("paused", flush=True)
                time.sleep(600)
            return original_step(*args, **kwargs)

        torch.optim.SGD.step = paused_step
    elif point is not None and point.startswith("write:"):
        half_write(point.removeprefix("write:"))

    # the papers' heads: the kill points count on epoch 3 being a new best and epoch 2 not (test_faults.py)
    cfg = TrainConfig(dataset=data, output_dir=out, model="test_resnet", input_size=32, crop_pct=1.0, val_size=16,
                      epochs=3, batch_size=16, lr=0.05, num_workers=0, keep_checkpoints=2, attention="sd",
                      head_budget=None)
    Trainer(cfg).fit()


def half_write(name):
    """The ``count``-th write of a file named ``name`` (or ``name.partial``) takes half its bytes, then the
    process dies."""
    real_open = open

    class HalfWritten:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[:len(data) // 2])
            self.f.flush()
            os._exit(9)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def __getattr__(self, attr):
            return getattr(self.f, attr)

    def opening(file, mode="r", *args, **kwargs):
        global calls
        f = real_open(file, mode, *args, **kwargs)
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+") \
                and os.path.basename(file) in (name, f"{name}.partial"):
            calls += 1
            if calls == count:
                return HalfWritten(f)
        return f

    builtins.open = io.open = opening


def serve():
    """Answer each request line of stdin with the exit code of a forked child that runs it."""
    for line in sys.stdin:
        *args, err = line.rstrip("\n").split("\t")
        pid = os.fork()
        if pid == 0:  # the child: its own output, the run, and an exit code as the command line's
            fd = os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.stdin.close()
            code = 0
            try:
                run(*args[:2], *(args[2:3] + [int(a) for a in args[3:4]]))
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        serve()
    else:
        run(sys.argv[1], sys.argv[2], *(sys.argv[3:4] + [int(a) for a in sys.argv[4:5]]))
