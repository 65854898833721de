"""The network of a --time run that names none (no --arch, --encoder, --base-channels, --depth or
--decoder-channels): the plan times each candidate's training step on this machine, gives each the steps that
fit in the budget, and picks the one whose learning curve promises the best score after those steps.

The curves (LEARNING_CURVES) are validation scores after n steps as a share of the best score any candidate
reached on the dataset, the mean over datasets of different kinds; docs/models.md has the runs they come from.
The rule rests on measured step times, never on the device's name: a GPU's faster steps move the choice
towards the deeper network by themselves."""
import bisect
import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torchvision

from errors import ConfigError
from model import ModelConfig, read_state_dict

NETWORK_FLAGS = ("arch", "encoder", "base_channels", "depth", "decoder_channels")  # naming one skips the choice

# Candidates: the classic U-Net at width 16 ("unet16": full-resolution features, 1.9 M parameters) and U-Nets on
# torchvision ResNets (random weights unless ImageNet's are on disk). At the classic width of 64 the U-Net is no
# candidate: a step cost 8x a ResNet-18 U-Net's, and it scored lower in the same time (VNC 10 min: 0.541 against
# 0.697). At width 16 its step costs less than the ResNet-18 U-Net's (0.30 s against 0.33 s, 2-core CPU, batch 4
# of 256x256) and it learnt the VNC stack's synapses best (10 min: test mIoU 0.727, synapses 0.497).
CLASSIC = "unet16"
CLASSIC_WIDTH = 16
ENCODERS = ("resnet18", "resnet34")
CANDIDATES = (CLASSIC, *ENCODERS)
CANDIDATE_STRIDE = 32  # the ResNets halve the image five times
# The ResNet candidates' decoder: half the default widths but for the full-size block. On a 2-core CPU it made a
# ResNet-18 U-Net's step 0.33 s instead of 0.41 s, so a --time 10m run took 1,538 steps instead of 1,143-1,223, and
# it learnt as much a step: VNC validation mIoU 0.755 against 0.737-0.742 (test 0.717 against 0.688-0.718), ISBI
# 0.811 against 0.803 (test membrane Dice 0.812 against 0.814-0.817). docs/models.md has the runs.
CANDIDATE_DECODER = (128, 64, 32, 16, 16)

# (steps, share of the best score) points of each candidate's learning curve with random weights: the best
# validation mIoU reached by that step (what best.pth holds) over the best any candidate reached on the dataset,
# the mean of the VNC stack (5 classes) and ISBI 2012 (membranes), --time 10m runs on a 2-core Zen 4 CPU, batch 4
# crops of 256, the defaults of the time (ResNet-34: its wider decoder, with zoom, rotation and elastic deformation
# and no class weights; docs/models.md). Between two points the share is interpolated in log(steps); beyond the
# last it stays flat (no run measured further); before the first it falls in proportion to the steps.
LEARNING_CURVES = {
    CLASSIC: ((100, 0.74), (200, 0.86), (400, 0.92), (650, 0.96), (800, 0.96), (1000, 0.98), (1200, 0.98),
              (1500, 1.0)),
    "resnet18": ((100, 0.52), (200, 0.73), (400, 0.92), (650, 0.94), (800, 0.96), (1000, 0.98), (1200, 0.98),
                 (1500, 0.99)),
    "resnet34": ((100, 0.63), (200, 0.72), (400, 0.84), (650, 0.88)),
}


def expected_share(curve, steps):
    """The share of the best score a candidate with learning curve `curve` reaches after `steps` steps."""
    points, shares = [p for p, _ in curve], [s for _, s in curve]
    if steps <= points[0]:
        return shares[0] * steps / points[0]
    if steps >= points[-1]:
        return shares[-1]
    i = bisect.bisect_right(points, steps)
    t = (math.log(steps) - math.log(points[i - 1])) / (math.log(points[i]) - math.log(points[i - 1]))
    return shares[i - 1] + t * (shares[i] - shares[i - 1])


@dataclass
class Timed:
    """A candidate measured by the probe: its step and validation seconds, the steps the budget gives it."""
    network: str  # one of CANDIDATES
    weights: str  # 'imagenet' (found in torch's hub cache), a weights file, or 'none'
    step_seconds: float
    epoch_end_seconds: float
    steps: int
    one_off_seconds: float = 0.0  # what the first step costs beyond the others: compiling, with --compile

    @property
    def expected(self):
        return expected_share(LEARNING_CURVES[self.network], self.steps)


def choose(timed):
    """The Timed candidate expected to score best; of two expected alike (to 0.001), the one of more steps.
    Candidates with pretrained weights on disk come first: ImageNet features are the largest gain on photographs
    the peers report (TernausNet, segmentation_models_pytorch), and the curves, measured with random weights, can
    only understate them. (A 0.01 band in which the candidate of more steps won once made the choice follow the
    probe's noise: unet16 and the ResNet-18 U-Net step within 0-15% of each other on a 2-core CPU, and in 2 of
    12 VNC probes the ResNet-18 U-Net won by steps, scoring test mIoU 0.718 against unet16's 0.734-0.745.)"""
    pool = [t for t in timed if t.weights != "none"] or timed
    return max(pool, key=lambda t: (round(t.expected, 3), t.steps))


def candidate_config(model_config, network, weights):
    """The ModelConfig (train.py's architecture flags) of candidate `network` starting from `weights`."""
    if network == CLASSIC:  # no encoder, so no encoder weights: the flag's default, as in any classic run
        return replace(model_config, base_channels=CLASSIC_WIDTH, encoder_weights=ModelConfig.encoder_weights)
    return replace(model_config, encoder=network, encoder_weights=weights, decoder_channels=list(CANDIDATE_DECODER))


def imagenet_weights_file(encoder):
    """The path where torchvision keeps `encoder`'s ImageNet weights once downloaded (torch hub's cache)."""
    url = torchvision.models.get_model_weights(encoder).DEFAULT.url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def candidate_weights(network, weights="imagenet"):
    """The weights a candidate starts from, for --encoder-weights `weights`: 'imagenet' where they are in the hub
    cache (the plan never downloads), a file where it holds this encoder's weights, else 'none'."""
    if network == CLASSIC:
        return "none"
    if weights == "imagenet":
        return "imagenet" if imagenet_weights_file(network).is_file() else "none"
    return weights if weights != "none" and weights_file_encoder(weights) == network else "none"


def weights_file_encoder(path):
    """The candidate encoder whose torchvision state_dict `path` holds (same names and shapes): ConfigError if
    none, EncoderWeightsError if the file is no state_dict."""
    shapes = {k: tuple(v.shape) for k, v in read_state_dict(path).items()}
    for encoder in ENCODERS:
        model = torchvision.models.get_model(encoder, weights=None)
        if shapes == {k: tuple(v.shape) for k, v in model.state_dict().items()}:
            return encoder
    raise ConfigError(f"--encoder-weights '{path}' holds the weights of none of the networks the plan chooses "
                      f"from ({', '.join(ENCODERS)}); name its network with --encoder")


def missing_weights_note(encoders):
    """One line on the ImageNet weights not on disk: what they would add and how to get them."""
    urls = " and ".join(torchvision.models.get_model_weights(e).DEFAULT.url for e in encoders)
    return (f"note: no ImageNet weights on disk for {' or '.join(encoders)}, so the candidates start from random "
            f"weights; pretrained encoders learn faster, above all on photographs: fetch {urls} into "
            f"{imagenet_weights_file(encoders[0]).parent} (or run once with --encoder {encoders[0]} where there is "
            f"internet)")


def probe(time_candidate, plan_steps, weights="imagenet", candidates=CANDIDATES):
    """The Timed candidates, fastest first: `time_candidate(network, weights)` -> (step seconds, validation
    seconds, one-off seconds of the first step) measures one; `plan_steps(step, validation, one-off seconds)`
    gives the steps the budget left after the whole probe pays for: a candidate that takes longer to compile
    (--compile) has fewer."""
    timings = [(network, candidate_weights(network, weights)) for network in candidates]
    timings = [(network, weights, *time_candidate(network, weights)) for network, weights in timings]
    timed = [Timed(network, weights, step, end, plan_steps(step, end, one_off), one_off)
             for network, weights, step, end, one_off in timings]
    return sorted(timed, key=lambda t: t.step_seconds)


def describe(timed, chosen, compiled=False):
    """The plan's lines on the choice: each candidate with its step time, planned steps (and with --compile
    `compiled`, its compile time) and expected share."""
    decoder = " ".join(map(str, CANDIDATE_DECODER))
    lines = [f"network: the plan chose among these U-Nets ({CLASSIC}: the classic U-Net, width {CLASSIC_WIDTH}; "
             f"the others on a ResNet encoder, decoder widths {decoder}; --encoder NAME or --base-channels N names "
             f"one):"]
    for t in timed:
        weights = {"imagenet": "ImageNet weights", "none": "random weights"}.get(t.weights, f"weights {t.weights}")
        mark = "  <- chosen" if t.network == chosen.network else ""  # under torchrun, `chosen` is rank 0's copy
        compiling = f" after {t.one_off_seconds:.0f}s to compile" if compiled else ""
        lines.append(f"  {t.network:9} ({weights}): a step {t.step_seconds:.3g}s, {t.steps} steps in the budget"
                     f"{compiling}, expected {t.expected:.2f} of the best score{mark}")
    return "\n".join(lines)


def as_record(timed, chosen):
    """What args.json and the checkpoint keep of the choice."""
    return {"chosen": chosen.network, "weights": chosen.weights,
            "candidates": [{**asdict(t), "expected": round(t.expected, 3)} for t in timed]}
