"""What train.py's steps read: an epoch of a given length as (index, seed) keys that a resumed run replays
exactly, the dataset that loads them, and the data loader."""
import math
import signal

import torch

from utils import derived_seed


class EpochSampler(torch.utils.data.Sampler):
    """This process's share of an epoch of `steps` batches, from a given batch on, as (index, seed) keys.
    An epoch runs through random passes over the dataset (each a new permutation, the same in every process)
    and is cut at its length: a small dataset is seen several times an epoch, and no pass drops its last
    items. The order is a pure function of (run seed, epoch), and each item's random augmentation runs from a
    seed of (run seed, epoch, position), so a resumed epoch sees exactly the items an uninterrupted one would,
    whichever worker loads them: one loader with persistent workers serves the whole run."""

    def __init__(self, dataset_size, batch_size, seed, rank=0, world_size=1):
        self.size, self.batch_size, self.seed = dataset_size, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.steps, self.start = 0, 0, 0

    def set_epoch(self, epoch, steps, start_batch=0):
        self.epoch, self.steps, self.start = epoch, steps, start_batch * self.batch_size

    def __len__(self):
        return self.steps * self.batch_size - self.start

    def __iter__(self):
        generator = torch.Generator().manual_seed(derived_seed(self.seed, self.epoch))
        wanted = self.steps * self.batch_size * self.world_size
        order = torch.cat([torch.randperm(self.size, generator=generator)
                           for _ in range(math.ceil(wanted / self.size))])
        positions = range(self.rank, wanted, self.world_size)
        for position in positions[self.start:]:
            yield int(order[position]), derived_seed(self.seed, self.epoch, position)


class SeededItems(torch.utils.data.Dataset):
    """Loads the (index, seed) keys of EpochSampler: the item's augmentation draws from its own seed."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        with torch.random.fork_rng(devices=[]):  # leaves the caller's random state alone (--workers 0)
            torch.default_generator.manual_seed(seed)  # the CPU generator alone: fork_rng restores only that
            return self.dataset[index]


def make_loader(dataset, sampler, batch_size, config, device):
    """Persistent workers (started once, not every epoch: slow on Windows and macOS, which spawn them), pinned
    memory only with CUDA; workers ignore Ctrl-C, which the main process handles."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=config.workers,
        pin_memory=device.type == "cuda", persistent_workers=config.workers > 0,
        generator=torch.Generator().manual_seed(config.seed), worker_init_fn=ignore_sigint)


def ignore_sigint(worker_id):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
