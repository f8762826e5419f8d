"""train.py with torch.save slowed down by SECONDS on every call: a file system slower than the collective timeout.
    mpiexec -n 2 python tests/slow_save.py SECONDS [train.py's arguments]"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

import train  # noqa: E402

delay, save = float(sys.argv[1]), torch.save


def slow_save(*args, **kwargs):
    time.sleep(delay)
    return save(*args, **kwargs)


torch.save = slow_save
train.main(sys.argv[2:])
