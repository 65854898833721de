"""What the scripts may write over (outputs.py): never an input, a checkpoint, or an image, mask or other file this
tool did not write; only its own marked outputs. The battery's lost-work cases, each run as a user would; and
pictures of any mask value (16-bit id masks) read back against the predicted ids."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import eval as eval_script
import export
import predict
import train
from checkpoints import load_model
from drawing import VOID_COLOUR, class_colours, colour_table, label_image, sample_grid, voc_palette
from images import open_mask
from model import IMAGENET_NORMALIZE
from outputs import MARK, MARK_KEY, Planned, check_outputs, is_own_output, save_png
from test_predict import rgb, write_checkpoint

MASK_VALUES = [0, 10, 20]


def fingerprint(path):
    return path.read_bytes(), path.stat().st_mtime_ns


def exits(script, argv, capsys):
    """The one line of a script's error (SystemExit's text), with no traceback."""
    with pytest.raises(SystemExit) as stopped:
        script.main(argv)
    assert "Traceback" not in capsys.readouterr().err
    line = str(stopped.value.code)
    assert line.startswith("error: ") and "\n" not in line.strip(), line
    return line


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny 3-class checkpoint (mask values 0, 10, 20), as best.pth and last.pth of a run folder."""
    run = tmp_path_factory.mktemp("run")
    write_checkpoint(run / "best.pth", 3, MASK_VALUES, spread=100.0)
    shutil.copy(run / "best.pth", run / "last.pth")
    return run


def write_pairs(folder, count=2, size=(24, 32), values=MASK_VALUES, dtype=np.uint8):
    """images/ and masks/ of `count` random images and masks holding `values`; returns the two folders."""
    rng = np.random.default_rng(1)
    images, masks = folder / "images", folder / "masks"
    images.mkdir(parents=True), masks.mkdir()
    for i in range(count):
        Image.fromarray(rgb(*size, seed=i)).save(images / f"{i}.png")
        Image.fromarray(np.asarray(values, dtype)[rng.integers(0, len(values), size)]).save(masks / f"{i}.png")
    return images, masks


def test_marks_tell_our_files_from_others(tmp_path):
    picture = Image.fromarray(rgb(4, 5))
    save_png(picture, tmp_path / "ours.png")
    picture.save(tmp_path / "theirs.png")
    (tmp_path / "ours.json").write_text(json.dumps({MARK_KEY: MARK, "miou": 0.5}))
    (tmp_path / "theirs.json").write_text(json.dumps({"miou": 0.5}))
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "older.json").write_text(json.dumps({"checkpoint": "best.pth", "classes": [], "mask_values": [],
                                                     "miou": 0.5, "confusion_matrix": []}))  # eval.py's, unmarked
    torch.save({"model": {}}, tmp_path / "checkpoint.pth")
    torch.jit.save(torch.jit.script(torch.nn.Identity()), tmp_path / "theirs.pt")
    torch.jit.save(torch.jit.script(torch.nn.Identity()), tmp_path / "ours.pt", _extra_files={MARK_KEY: MARK})
    np.save(tmp_path / "ours.npy", np.zeros((2, 3, 4), np.float16))  # predict.py --probs' form
    np.save(tmp_path / "theirs.npy", np.zeros((2, 3, 4), np.float32))
    (tmp_path / "ours.html").write_text(f"<!DOCTYPE html>\n<html>\n<head>\n<meta name=\"generator\" "
                                        f"content=\"{MARK}\">\n</head></html>")
    (tmp_path / "theirs.html").write_text("<!DOCTYPE html>\n<html></html>")
    (tmp_path / "notes.txt").write_text("mine")
    ours = sorted(path.name for path in tmp_path.iterdir() if is_own_output(path))
    assert ours == ["older.json", "ours.html", "ours.json", "ours.npy", "ours.png", "ours.pt"]


def test_onnx_of_an_older_export_is_ours(tmp_path):
    onnx = pytest.importorskip("onnx")
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g",
                                   [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    for name, keys in [("old.onnx", ["classes", "mask_values", "normalize"]), ("other.onnx", ["classes"])]:
        model = onnx.helper.make_model(graph)
        onnx.helper.set_model_props(model, {key: "[]" for key in keys})
        onnx.save(model, tmp_path / name)
    (tmp_path / "garbage.onnx").write_bytes(b"\x00\xff" * 50)
    assert [is_own_output(tmp_path / name) for name in ("old.onnx", "other.onnx", "garbage.onnx")] == [
        True, False, False]


def test_check_outputs_refuses_inputs_links_and_foreign_files(tmp_path):
    source = tmp_path / "a.png"
    Image.fromarray(rgb(4, 4)).save(source)
    os.link(source, tmp_path / "hard.png")
    (tmp_path / "soft.png").symlink_to(source)
    save_png(Image.fromarray(rgb(4, 4)), tmp_path / "ours.png")
    torch.save({}, tmp_path / "run.pth")
    cases = [("hard.png", "would overwrite the input"), ("soft.png", "would overwrite the input"),
             ("a.png", "would overwrite the input"),
             ("run.pth", "is a checkpoint that this tool did not write, and it is never replaced")]
    for name, message in cases:
        with pytest.raises(Exception, match=message):
            check_outputs([Planned(tmp_path / name, "-o")], [source])
    (tmp_path / "b.png").write_bytes(source.read_bytes())  # a copy is not the input, but not ours either
    with pytest.raises(Exception, match="-o '.*b.png' is an image or mask that this tool did not write"):
        check_outputs([Planned(tmp_path / "b.png", "-o")], [source])
    with pytest.raises(Exception, match="would both be written to one file"):
        check_outputs([Planned(tmp_path / "new" / "x.png", "-o"), Planned(tmp_path / "new" / "x.png", "-o")])
    assert not (tmp_path / "new").exists()  # refused before any folder is made
    check_outputs([Planned(tmp_path / "ours.png", "-o"), Planned(tmp_path / "new" / "x.png", "-o")], [source])
    assert (tmp_path / "new").is_dir()


def test_predict_leaves_true_masks_beside_their_images(model, tmp_path, capsys):
    folder = tmp_path / "pairs"
    folder.mkdir()
    for name in ("a", "b"):
        Image.fromarray(rgb(8, 8)).save(folder / f"{name}.png")
        Image.fromarray(np.full((8, 8), 10, np.uint8)).save(folder / f"{name}_mask.png")
    before = {path.name: fingerprint(path) for path in folder.iterdir()}
    line = exits(predict, ["-m", str(model / "best.pth"), "-i", str(folder), "--workers", "0"], capsys)
    assert "a_mask.png' (the output of" in line and "did not write" in line and "choose another -o" in line
    assert {path.name: fingerprint(path) for path in folder.iterdir()} == before
    predict.main(["-m", str(model / "best.pth"), "-i", str(folder), "-o", str(tmp_path / "out"), "--workers", "0"])
    out = capsys.readouterr().out
    assert "note: skipped 2 true masks" in out and "2 images in" in out
    assert sorted(os.listdir(tmp_path / "out")) == ["a_mask.png", "b_mask.png"]
    predict.main(["-m", str(model / "best.pth"), "-i", str(tmp_path / "out" / "a_mask.png"), "-o",
                  str(tmp_path / "again.png")])  # a mask named alone is an image to segment
    assert (tmp_path / "again.png").is_file()


def test_predict_replaces_only_its_own_outputs(model, tmp_path, capsys):
    image = tmp_path / "a.png"
    Image.fromarray(rgb(8, 8)).save(image)
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.fromarray(np.full((8, 8), 10, np.uint8)).save(masks / "a_mask.png")  # someone's mask
    before = fingerprint(masks / "a_mask.png")
    line = exits(predict, ["-m", str(model / "best.pth"), "-i", str(image), "-o", str(masks)], capsys)
    assert f"-o '{masks / 'a_mask.png'}' (the output of '{image}') is an image or mask" in line
    assert fingerprint(masks / "a_mask.png") == before
    os.link(image, tmp_path / "link.png")
    line = exits(predict, ["-m", str(model / "best.pth"), "-i", str(image), "-o", str(tmp_path / "link.png")],
                 capsys)
    assert f"would overwrite the input '{image}'" in line
    for _ in range(2):  # a second run replaces the first one's outputs
        predict.main(["-m", str(model / "best.pth"), "-i", str(image), "-o", str(tmp_path / "out"), "--overlay",
                      "--viz", "--probs"])
    assert sorted(os.listdir(tmp_path / "out")) == ["a_mask.png", "a_overlay.png", "a_probs.npy", "a_viz.png"]


def test_export_never_replaces_a_checkpoint_or_an_image(model, tmp_path, capsys):
    pytest.importorskip("onnx"), pytest.importorskip("onnxscript")
    photo = tmp_path / "image.png"
    Image.fromarray(rgb(8, 8)).save(photo)
    for flags, target, message in [(["-o", str(model / "last.pth")], model / "last.pth", "a checkpoint"),
                                   (["-o", str(photo)], photo, "an image or mask"),
                                   (["-o", str(tmp_path / "m.onnx"), "--torchscript", str(model / "last.pth")],
                                    model / "last.pth", "a checkpoint")]:
        before = fingerprint(target)
        line = exits(export, ["-m", str(model / "best.pth"), *flags], capsys)
        assert f"'{target}' is {message} that this tool did not write" in line
        assert fingerprint(target) == before
    assert not (tmp_path / "m.onnx").exists()


def test_eval_never_replaces_a_checkpoint_an_image_or_masks(model, tmp_path, capsys):
    images, masks = write_pairs(tmp_path / "data")
    data = ["-m", str(model / "best.pth"), "--images", str(images), "--masks", str(masks), "--workers", "0"]
    photo = tmp_path / "photo.png"
    Image.fromarray(rgb(8, 8)).save(photo)
    someone = tmp_path / "someone"
    someone.mkdir()
    Image.fromarray(np.zeros((24, 32), np.uint8)).save(someone / "0.png")
    (tmp_path / "report").mkdir()
    Image.fromarray(rgb(8, 8)).save(tmp_path / "report" / "worst_01_image.png")
    for flags, target, message in [
            (["--json", str(model / "last.pth")], model / "last.pth", "--json '{}' is a checkpoint"),
            (["--confusion", str(photo)], photo, "--confusion '{}' is an image or mask"),
            (["--save-labels", str(someone)], someone / "0.png", "--save-labels '{}' holds '0.png'"),
            (["--overlays", str(someone)], someone / "0.png", "--overlays '{}' holds '0.png'"),
            (["--report", str(tmp_path / "report")], tmp_path / "report" / "worst_01_image.png",
             "--report '{}' holds 'worst_01_image.png'")]:
        before = fingerprint(target)
        line = exits(eval_script, data + flags, capsys)
        named = target if flags[0] in ("--json", "--confusion") else target.parent.resolve()
        assert message.format(named) in line and ("delete the file yourself" in line or "of its own" in line)
        assert fingerprint(target) == before
    outputs = ["--json", str(tmp_path / "o" / "s.json"), "--confusion", str(tmp_path / "o" / "c.png"),
               "--save-labels", str(tmp_path / "labels"), "--overlays", str(tmp_path / "overlays"),
               "--report", str(tmp_path / "o" / "report")]
    for _ in range(2):  # a second run replaces the first one's outputs
        eval_script.main(data + outputs)
    assert json.loads((tmp_path / "o" / "s.json").read_text())[MARK_KEY] == MARK


# Pictures of any mask value: 16-bit id masks (values above 255) used to crash label_image's uint8 cast and the
# 256-row palette look-up, after the run's checkpoints were saved.
WIDE_VALUES = [0, 300, 1000, 65535]


def test_label_images_and_colours_of_16_bit_values(tmp_path):
    labels = np.random.default_rng(0).integers(0, len(WIDE_VALUES), (9, 13)).astype(np.uint8)
    save_png(label_image(labels, WIDE_VALUES), tmp_path / "wide.png")
    read = np.asarray(open_mask(tmp_path / "wide.png"))  # as the data readers read a mask
    assert read.dtype == np.uint16 and np.array_equal(read, np.asarray(WIDE_VALUES)[labels])
    colours = class_colours(WIDE_VALUES)
    assert len({tuple(c) for c in colours}) == len(WIDE_VALUES)
    assert tuple(colours[1]) == (voc_bits(300)) and tuple(voc_palette()[20]) == voc_bits(20)
    table = colour_table(WIDE_VALUES)  # the sample grid's and the report's: class index -> colour, void white
    assert np.array_equal(table[:4], colours) and tuple(table[255]) == VOID_COLOUR == (255, 255, 255)
    truth = torch.from_numpy(labels).long()
    truth[0, 0] = 255  # void
    grid = np.asarray(sample_grid([torch.zeros(3, 9, 13, dtype=torch.uint8)], [truth], [truth.flip(0)],
                                  ["a", "b", "c", "d"], WIDE_VALUES))
    assert all((grid == colour).all(-1).any() for colour in colours)


def voc_bits(value):
    """The VOC colour of one value, bit by bit as the devkit's labelcolormap computes it."""
    r = g = b = 0
    for j in range(8):
        r |= ((value >> (3 * j)) & 1) << (7 - j)
        g |= ((value >> (3 * j + 1)) & 1) << (7 - j)
        b |= ((value >> (3 * j + 2)) & 1) << (7 - j)
    return r, g, b


def predicted_values(checkpoint, image_path):
    """The mask values of the argmax of the network alone on the normalised image (numpy around torch's model)."""
    network, state = load_model(checkpoint)
    mean, std = (np.array(IMAGENET_NORMALIZE[key])[:, None, None] for key in ("mean", "std"))
    pixels = np.asarray(Image.open(image_path).convert("RGB")).transpose(2, 0, 1) / 255
    with torch.no_grad():
        logits = network(torch.from_numpy((pixels - mean) / std).float()[None])[0].numpy()
    return np.asarray(state["mask_values"])[logits.argmax(0)]


def test_16_bit_id_masks_train_evaluate_and_predict(tmp_path):
    images, masks = write_pairs(tmp_path / "data", count=8, size=(24, 32), values=WIDE_VALUES[:3],
                                dtype=np.uint16)
    run = train.main(["--images", str(images), "--masks", str(masks), "--epochs", "1", "--steps-per-epoch", "1",
                      "--batch-size", "4", "--base-channels", "4", "--depth", "2", "--workers", "0",
                      "--crop-size", "16", "--val-percent", "25", "--sample-every", "1", "--amp", "off",
                      "--checkpoint-dir", str(tmp_path / "runs")])
    assert list((run / "samples").glob("*.png"))
    best = run / "best.pth"
    eval_script.main(["-m", str(best), "--images", str(images), "--masks", str(masks), "--workers", "0",
                      "--amp", "off", "--save-labels", str(tmp_path / "labels"), "--overlays",
                      str(tmp_path / "overlays"), "--report", str(tmp_path / "report")])
    predict.main(["-m", str(best), "-i", str(images / "0.png"), "-o", str(tmp_path / "p.png"), "--amp", "off",
                  "--overlay"])
    expected = predicted_values(best, images / "0.png")
    for written in (tmp_path / "labels" / "0.png", tmp_path / "p.png"):
        assert np.array_equal(np.asarray(open_mask(written)), expected)
    assert (tmp_path / "report" / "index.html").is_file() and (tmp_path / "p_overlay.png").is_file()
