"""Not a test: runs sa.py's training with sa.py's arguments and saves this process's final weights to
OUT/rank<RANK>.pt, so that test_bad_input.py can compare the ranks of a torchrun job with each other and with one
process trained on the same global batch."""
import os
import sys
from pathlib import Path

import torch

import sa

models = []


class RecordedModel(sa.SlotAutoencoder):
    def __init__(self, cfg):
        super().__init__(cfg)
        models.append(self)


sa.SlotAutoencoder = RecordedModel
sa.main(sys.argv[1:])
out = Path(sys.argv[sys.argv.index("--out") + 1])
torch.save(models[0].state_dict(), out / f"rank{os.environ.get('RANK', '0')}.pt")
