"""What the benchmark scripts share: the flags for the CPU threads they run on and for the classic U-Net they
time."""
import torch


def add_threads_arg(parser):
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default); 1 avoids the large per-layer cost of threads "
                             "waiting for each other when other jobs load the cores")


def use_threads(threads):
    """Set torch's CPU threads (0 or None: leave torch's default); returns the number in use."""
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def add_unet_args(parser, base_channels, depth):
    """--base-channels and --depth of the classic U-Net a benchmark times."""
    parser.add_argument("--base-channels", type=int, default=base_channels, help="width of the benchmark U-Net")
    parser.add_argument("--depth", type=int, default=depth, help="down-sampling steps of the benchmark U-Net")

