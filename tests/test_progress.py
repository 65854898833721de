"""Progress lines where output is not a terminal, with a mocked clock: one line every 30 s with the count, the
rate and the time left (hand-worked)."""
import io

from progress import Progress, duration


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_plain_lines_every_30_seconds_with_rate_and_time_left():
    clock, out = Clock(), io.StringIO()
    progress = Progress(100, "predict", "images", bar=False, clock=clock, out=out)
    for _ in range(10):  # 10 images in 25 s: no line yet
        clock.now += 2.5
        progress.update()
    assert out.getvalue() == ""
    for _ in range(4):  # the 12th at 30 s: 0.4 images/s, 88 left: 220 s; then 14 in 35 s
        clock.now += 2.5
        progress.update()
    assert out.getvalue() == "predict: 12/100 images (12%), 0.40 images/s, 3m40s left\n"
    clock.now += 10  # 15 images in 45 s: 15 s since the last line
    progress.update()
    assert out.getvalue().count("\n") == 1
    clock.now += 20  # 16 images in 65 s: 0.246 images/s, 84 left: 341 s
    progress.update()
    assert out.getvalue().splitlines()[-1] == "predict: 16/100 images (16%), 0.25 images/s, 5m41s left"
    progress.write("a.png -> a_mask.png")
    assert out.getvalue().endswith("a.png -> a_mask.png\n")


def test_durations():
    assert [duration(s) for s in (0, 59.4, 60, 187, 3600, 7500)] == ["0s", "59s", "1m00s", "3m07s", "1h00m", "2h05m"]


def test_predict_reports_images_and_the_tiles_of_a_large_image(tmp_path, monkeypatch, capsys):
    """Output to a file: plain lines for the folder's images and for the tiles of an image of 16 tiles or more."""
    import numpy as np
    from PIL import Image

    import predict
    import progress
    from test_predict import write_checkpoint

    monkeypatch.setattr(progress, "PLAIN_EVERY", 0.0)  # a line at every update
    checkpoint = write_checkpoint(tmp_path / "model.pth", 2, [0, 255])
    Image.fromarray(np.zeros((200, 200, 3), np.uint8)).save(tmp_path / "big.png")  # 4 x 4 tiles of 64 at 0.25
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "small.png")
    predict.main(["-m", checkpoint, "-i", str(tmp_path), "--tile", "64", "--overlap", "0.25", "--batch-size", "4"])
    lines = capsys.readouterr().out.splitlines()
    tiles = [line for line in lines if line.startswith("big.png: ")]
    assert [line.split(" (")[0] for line in tiles] == [f"big.png: {n}/16 tiles" for n in (4, 8, 12, 16)]
    assert [line.split(" (")[0] for line in lines if line.startswith("predict: ")] == [
        "predict: 1/2 images", "predict: 2/2 images"]
    assert not any(line.startswith("small.png: ") for line in lines)  # 1 tile: no tile progress
