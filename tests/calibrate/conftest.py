import torch

# The CI machines are shared and small: one thread is much faster than two contended ones for tiny models.
torch.set_num_threads(1)
