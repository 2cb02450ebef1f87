"""Entry point for the torchrun tests: runs train_RawNet2.cli with two test-only instruments.

ENTRY_SAVE_LOG=DIR      every process appends the paths it saves to DIR/rank<R>.txt
ENTRY_KILL_AT_EPOCH=E   rank 1 kills itself (SIGKILL) when it starts epoch E, on the first attempt only
"""

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import runs  # noqa: E402
import train_RawNet2 as train  # noqa: E402

rank = int(os.environ["RANK"])
log_dir = os.environ.get("ENTRY_SAVE_LOG")
if log_dir:
    save = runs.save_atomic

    def logged_save(obj, path):
        with open(os.path.join(log_dir, f"rank{rank}.txt"), "a") as f:
            f.write(f"{path}\n")
        save(obj, path)

    runs.save_atomic = logged_save

kill_epoch = os.environ.get("ENTRY_KILL_AT_EPOCH")
if kill_epoch is not None and rank == 1 and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
    train_epoch = train.train_epoch

    def dying_train_epoch(model, loader, optimizer, scheduler, device, epoch, *args, **kwargs):
        if epoch == int(kill_epoch):
            os.kill(os.getpid(), signal.SIGKILL)
        return train_epoch(model, loader, optimizer, scheduler, device, epoch, *args, **kwargs)

    train.train_epoch = dying_train_epoch

train.cli(sys.argv[1:])
