"""The memory plan: parsing sizes, reading the available memory, the footprint tracker, and the choice of whole
images or tiles under mocked memory, against hand-worked figures."""
import numpy as np
import pytest
import torch
from PIL import Image

import memory
import predict
from errors import ConfigError
from memory import Footprint, PeakTracker, cgroup_free, measure_footprint, meminfo_available, parse_memory, plan_memory
from test_predict import models, rgb  # noqa: F401 (models is a fixture)

MB = 2 ** 20


@pytest.mark.parametrize("text, expected", [("4G", 4 * 2 ** 30), ("512M", 512 * MB), ("1.5g", 1536 * MB),
                                            ("2GB", 2 * 2 ** 30), ("300KiB", 300 * 1024), ("1000", 1000)])
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["4X", "", "-1G", "0", "G"])
def test_parse_memory_refuses_what_is_no_size(text):
    with pytest.raises(ConfigError, match="not an amount of memory; write e.g. 4G"):
        parse_memory(text)


def test_available_memory_from_meminfo_and_cgroups(tmp_path):
    (tmp_path / "meminfo").write_text("MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   2000000 kB\n")
    assert meminfo_available(tmp_path / "meminfo") == 2000000 * 1024
    assert meminfo_available(tmp_path / "missing") is None
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text("max\n")
    (v2 / "memory.current").write_text("1000\n")
    assert cgroup_free(v2) is None  # no limit
    (v2 / "memory.max").write_text("5000\n")
    assert cgroup_free(v2) == 4000
    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    (v1 / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's 'no limit'
    (v1 / "memory" / "memory.usage_in_bytes").write_text("10\n")
    assert cgroup_free(v1) is None
    (v1 / "memory" / "memory.limit_in_bytes").write_text("3000\n")
    assert cgroup_free(v1) == 2990


def test_peak_tracker_counts_live_storages_once():
    with PeakTracker() as tracker:
        a = torch.zeros(100)  # 400 bytes
        view = a[10:]  # the same storage: not counted again
        b = torch.zeros(200)  # 800: 1,200 held
        del a, b  # the view keeps a's storage: 400 held
        c = torch.zeros(150)  # 600: 1,000 held, below the peak
        assert tracker.now == 1000
        del view
        assert tracker.now == 600
    assert tracker.peak == 1200
    del c


def test_footprint_is_affine_in_pixels():
    def run(side):  # 1,000 bytes whatever the size, then 10 bytes a pixel
        fixed = torch.empty(1000, dtype=torch.uint8)
        per_pixel = torch.empty(side * side * 10, dtype=torch.uint8)
        del fixed, per_pixel

    footprint = measure_footprint(run, stride=16)
    assert footprint.bytes(100) == pytest.approx(memory.OVERHEAD * 2000)
    assert footprint.bytes(10 ** 6) == pytest.approx(memory.OVERHEAD * (1000 + 10 ** 7))


def test_footprint_follows_the_peak_as_it_moves():
    """A pass whose peak is a fixed 1 MB buffer on small images and 8 bytes a pixel on large ones (a deep layer's
    weights, then the full-size activations): the peaks of two small probes alone would miss the second."""
    def run(side):
        weights = torch.empty(2 ** 20, dtype=torch.uint8)
        del weights
        activations = torch.empty(side * side * 8, dtype=torch.uint8)
        del activations

    footprint = measure_footprint(run)  # probes of 64 and 128: peaks 1 MB and 1 MB
    assert footprint.bytes(64 * 64) == pytest.approx(memory.OVERHEAD * 2 ** 20)
    assert footprint.bytes(1024 * 1024) == pytest.approx(memory.OVERHEAD * 8 * 2 ** 20)
    assert footprint.bytes(4096 * 4096) == pytest.approx(memory.OVERHEAD * 8 * 4096 ** 2)


def test_plan_whole_images_tiles_and_batches():
    footprint = Footprint([(0, 100)])  # 125 bytes a pixel with the overhead, plus 4 for the image and its labels
    size = (1000, 1000)
    whole = plan_memory(footprint, size, 10 ** 9, 2)
    assert (whole.tile, whole.batch_size) == (None, 4)  # 4 x 129 MB fit in 1 GB
    assert whole.estimate == 4 * 129 * 10 ** 6
    assert plan_memory(footprint, size, 200 * 10 ** 6, 2).batch_size == 1  # 2 x 129 MB do not fit
    # 20 MB: 384-pixel tiles take 18.4 MB + a band of 2 x 384 rows x 1000 x 2 classes x 4 bytes + 4 MB: too much;
    # 256-pixel tiles 8.2 + 4.1 + 4 = 16.3 MB fit, two of them (24.5 MB) do not.
    tiled = plan_memory(footprint, size, 20 * 10 ** 6, 2, stride=16)
    assert (tiled.tile, tiled.batch_size) == (256, 1)
    assert tiled.estimate == int(125 * 256 ** 2 + 2 * 256 * 1000 * 2 * 4 + 4 * 10 ** 6)
    assert plan_memory(footprint, size, 20 * 10 ** 6, 2, tile=512).tile == 512  # --tile stands
    assert plan_memory(footprint, size, 1, 2, batch_size=3) .batch_size == 3  # so does --batch-size
    assert plan_memory(footprint, size, 1, 2, stride=64).tile == 64  # nothing fits: the smallest tile
    assert plan_memory(footprint, size, None, 2).tile is None  # memory unknown: whole images
    assert plan_memory(footprint, size, 10 ** 9, 2, max_pixels=300_000).batch_size == 1  # 1 M pixels a pass: 1
    assert plan_memory(footprint, (200, 300), 10 ** 9, 2, max_pixels=150_000).batch_size == 2  # 60,000 pixels
    assert plan_memory(footprint, (4000, 4000), 10 ** 9, 2, max_pixels=2 ** 20).tile == 1024  # 2048 would fit
    assert plan_memory(footprint, (4000, 4000), 10 ** 9, 2, max_pixels=2 ** 20 - 1).tile == 768
    assert plan_memory(footprint, size, 10 ** 12, 2, max_whole=1000).tile is None  # 1 M pixels: whole
    assert plan_memory(footprint, (1001, 1000), 10 ** 12, 2, max_whole=1000).tile == 768  # more: tiles
    assert "in 256-pixel tiles, 1 per pass" in tiled.describe(size)


def test_plan_stops_at_the_cpu_ceiling_but_fills_a_gpu(monkeypatch):
    """With memory to spare, a CPU plans passes of at most CPU_PASS_PIXELS (256-pixel tiles two at a time for a
    6000 x 6000 image; whole images up to 2048 x 2048, as many a pass as the ceiling holds), while a GPU with 80 GB
    free (mocked torch.cuda.mem_get_info) takes the whole image, and 4 of 2048 x 2048 a pass: there batches pay."""
    import inference
    from model import IMAGENET_NORMALIZE, UNet
    options = {"scale": 1.0, "tile": None, "overlap": 0.125, "flips": ((),), "amp_dtype": None}
    model = UNet(3, 2, base_channels=4, depth=2)  # output stride 4
    monkeypatch.setattr(memory, "meminfo_available", lambda: 2 ** 40)  # 1 TB
    monkeypatch.setattr(memory, "cgroup_free", lambda: None)
    cpu = inference.Planner(model, IMAGENET_NORMALIZE, options, 2, log=lambda line: None)
    cpu.footprint = Footprint([(0, 1000)])  # 1,250 bytes a pixel with the overhead: about the classic U-Net's
    assert memory.CPU_PASS_PIXELS == 2 * 256 * 256 and memory.CPU_MAX_WHOLE == 2048
    plans = {size: cpu.plan(size) for size in [(6000, 6000), (2048, 2048), (2049, 2048), (200, 300)]}
    # 2049 rows: 10 tiles of 256 at overlap 0.125, or of 236 (inference.balanced_tile)
    assert [(plan.tile, plan.batch_size) for plan in plans.values()] == [(256, 2), (None, 1), (236, 2), (None, 2)]
    monkeypatch.setattr(inference, "model_device", lambda model: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (80 * 10 ** 9, 80 * 10 ** 9))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    gpu = inference.Planner(model, IMAGENET_NORMALIZE, options, 2, log=lambda line: None)
    gpu.footprint = cpu.footprint
    assert "free CUDA memory" in gpu.source
    # 6000 x 6000: 1,254 bytes a pixel x 36 M = 45 GB of the 64 GB budget (80%); 2048 x 2048: 5.3 GB each
    assert (gpu.plan((6000, 6000)).tile, gpu.plan((6000, 6000)).batch_size) == (None, 1)
    assert (gpu.plan((2048, 2048)).tile, gpu.plan((2048, 2048)).batch_size) == (None, 4)


@pytest.mark.parametrize("available, expected", [(10 ** 12, "whole 200x300 images"),
                                                 (2 * MB, "200x300 images in 60-pixel tiles")])  # 64, balanced
def test_predict_plans_tiles_when_memory_is_short(models, tmp_path, monkeypatch, capsys, available,  # noqa: F811
                                                  expected):
    monkeypatch.setattr(memory, "meminfo_available", lambda: available)
    monkeypatch.setattr(memory, "cgroup_free", lambda: None)
    Image.fromarray(rgb(300, 200)).save(tmp_path / "a.png")
    predict.main(["-m", models["spread"], "-i", str(tmp_path / "a.png"), "-o", str(tmp_path / "planned")])
    out = capsys.readouterr().out
    assert f"memory plan: {expected}" in out and "(80% of" in out and "MemAvailable" in out
    tile = ["--tile", "60"] if "tiles" in expected else []
    predict.main(["-m", models["spread"], "-i", str(tmp_path / "a.png"), "-o", str(tmp_path / "given"), *tile])
    planned, given = (np.asarray(Image.open(tmp_path / kind / "a_mask.png")) for kind in ("planned", "given"))
    np.testing.assert_array_equal(planned, given)


def test_max_memory_flag_overrides_the_available_memory(models, tmp_path, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setattr(memory, "process_rss", lambda: 100 * MB)
    Image.fromarray(rgb(300, 200)).save(tmp_path / "a.png")
    predict.main(["-m", models["random"], "-i", str(tmp_path / "a.png"), "--max-memory", "102M"])
    assert "-pixel tiles" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        predict.main(["-m", models["random"], "-i", str(tmp_path / "a.png"), "--max-memory", "lots"])
    assert "--max-memory 'lots' is not an amount of memory" in capsys.readouterr().err


def test_validation_splits_batches_as_planned(monkeypatch, capsys):
    """Training's validation (inference.evaluate) follows the plan: in little memory one image at a time, in
    tiles, scoring as whole batches do (random tiny model: tiles agree with whole images to within a few pixels)."""
    from inference import evaluate
    from model import IMAGENET_NORMALIZE, UNet

    torch.manual_seed(0)
    model = UNet(3, 3, base_channels=4, depth=2).eval()
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (4, 3, 96, 128), dtype=np.uint8))
    masks = torch.from_numpy(np.random.default_rng(1).integers(0, 3, (4, 96, 128)))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, masks), batch_size=4)
    monkeypatch.setattr(memory, "cgroup_free", lambda: None)
    scores = {}
    for available in (10 ** 12, 2 * 2 ** 20):
        monkeypatch.setattr(memory, "meminfo_available", lambda: available)
        scores[available] = evaluate(model, loader, 3, IMAGENET_NORMALIZE, 255, "cpu")
    lines = capsys.readouterr().out
    assert "memory plan: whole 128x96 images, 4 per pass" in lines and "images in 64-pixel tiles" in lines
    assert scores[10 ** 12]["pixel_acc"] == pytest.approx(scores[2 * 2 ** 20]["pixel_acc"], abs=0.002)
