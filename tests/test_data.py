"""Real dataset layouts: class counts, readable names, labels, and every bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import CHESTX_ROWS, EUROSAT_FOLDERS, write_image

from cdfsl_core.data import DATA_ROOT_ENV, list_datasets, load_dataset
from cdfsl_core.data.real import plantvillage_name
from cdfsl_core.errors import DatasetError, ImageReadError


def test_registry_lists_the_real_datasets():
    assert {"miniimagenet", "cropdiseases", "eurosat", "isic", "chestx", "novel-json"} <= set(list_datasets())


def test_unknown_dataset_names_the_valid_ones():
    with pytest.raises(DatasetError, match="Unknown dataset 'imagenet-x'.*eurosat"):
        load_dataset("imagenet-x", ".")


def test_cropdiseases_has_38_readable_classes(crop_root):
    ds = load_dataset("cropdiseases", crop_root)
    assert len(ds.classes) == 38 and len(ds) == 76
    assert ds.classes[0] == "apple with apple scab"
    assert "healthy tomato" in ds.classes
    assert "corn with common rust" in ds.classes
    assert "bell pepper with bacterial spot" in ds.classes
    assert "tomato with spider mites two-spotted spider mite" in ds.classes
    assert all("_" not in name for name in ds.classes)
    image, label = ds[3]
    assert image.mode == "RGB" and label == 1


@pytest.mark.parametrize(
    "folder, expected",
    [
        ("Apple___Apple_scab", "apple with apple scab"),
        ("Tomato___healthy", "healthy tomato"),
        ("Corn_(maize)___Cercospora_leaf_spot Gray_leaf_spot", "corn with cercospora leaf spot gray leaf spot"),
        ("Grape___Esca_(Black_Measles)", "grape with esca (black measles)"),
    ],
)
def test_plantvillage_names(folder, expected):
    assert plantvillage_name(folder) == expected


def test_eurosat_has_the_10_named_classes(eurosat_root):
    ds = load_dataset("eurosat", eurosat_root)
    assert len(ds.classes) == 10 and len(ds) == 30
    assert ds.classes == [
        "Annual Crop Land", "Forest", "Herbaceous Vegetation Land", "Highway or Road",
        "Industrial Buildings", "Pasture Land", "Permanent Crop Land", "Residential Buildings",
        "River", "Sea or Lake",
    ]
    # the dataset's own folder works as a root too
    assert len(load_dataset("eurosat", eurosat_root / "EuroSAT")) == 30


def test_eurosat_rejects_unknown_class_folders(eurosat_root):
    write_image(eurosat_root / "EuroSAT" / "2750" / "Desert" / "Desert_1.jpg")
    with pytest.raises(DatasetError, match="Desert"):
        load_dataset("eurosat", eurosat_root)


def test_isic_labels_are_the_argmax_of_the_one_hot_row(isic_root):
    ds = load_dataset("isic", isic_root)
    assert ds.classes == [
        "Melanoma", "Melanocytic Nevus", "Basal Cell Carcinoma", "Actinic Keratosis",
        "Benign Keratosis", "Dermatofibroma", "Vascular Lesion",
    ]
    assert ds.targets == [(i * 3) % 7 for i in range(14)]
    assert sorted(set(ds.targets)) == list(range(7))
    assert ds.paths[0].name == "ISIC_0024306.jpg"


def test_chestx_keeps_single_label_rows_of_the_7_classes(chestx_root):
    ds = load_dataset("chestx", chestx_root)
    assert len(ds.classes) == 7
    kept = [r for r in CHESTX_ROWS if r[1] in ds.classes]
    assert len(ds) == len(kept) == 8  # multi-label, "No Finding", "Pneumonia", "Hernia" dropped
    assert [ds.classes[t] for t in ds.targets] == [r[1] for r in kept]
    assert ds.paths[0].name == "00000001_000.png"


def test_miniimagenet_csv_layout_uses_clip_readable_names(mini_csv_root):
    ds = load_dataset("miniimagenet", mini_csv_root, split="train")
    assert ds.classes == ["house finch", "American robin", "triceratops"]
    assert ds.targets == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_miniimagenet_imagefolder_layout(mini_folder_root):
    ds = load_dataset("miniimagenet", mini_folder_root)
    assert ds.classes == ["house finch", "American robin", "triceratops"] and len(ds) == 9


def test_novel_json_reroots_absolute_paths_from_another_machine(eurosat_root):
    folder = eurosat_root / "EuroSAT" / "2750"
    names = [f"/home/someone/data/EuroSAT/2750/{c}/{c}_1.jpg" for c in EUROSAT_FOLDERS[:3]]
    meta = {"image_names": names, "image_labels": [0, 1, 2], "label_names": ["a", "b", "c"]}
    (eurosat_root / "novel.json").write_text(__import__("json").dumps(meta))
    ds = load_dataset("novel-json", eurosat_root / "novel.json", image_root=eurosat_root)
    assert ds.paths[1] == folder / "Forest" / "Forest_1.jpg"
    assert ds.classes == ["a", "b", "c"] and ds.targets == [0, 1, 2]


def test_data_root_from_environment(eurosat_root, monkeypatch):
    monkeypatch.setenv(DATA_ROOT_ENV, str(eurosat_root))
    assert len(load_dataset("eurosat")) == 30


def test_transform_is_applied(eurosat_root):
    ds = load_dataset("eurosat", eurosat_root, transform=lambda im: torch.zeros(3, *im.size))
    image, _ = ds[0]
    assert image.shape == (3, 8, 8)


def test_fingerprint_changes_when_the_image_list_does(eurosat_root):
    before = load_dataset("eurosat", eurosat_root).fingerprint()
    assert load_dataset("eurosat", eurosat_root).fingerprint() == before
    write_image(eurosat_root / "EuroSAT" / "2750" / "Forest" / "Forest_9.jpg")
    assert load_dataset("eurosat", eurosat_root).fingerprint() != before


# ---------------------------------------------------------------- bad input
def test_missing_root_names_the_path_and_layout(tmp_path):
    with pytest.raises(DatasetError, match=r"does not exist.*EuroSAT/2750"):
        load_dataset("eurosat", tmp_path / "nowhere")


def test_no_root_at_all_says_how_to_give_one(monkeypatch):
    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)
    with pytest.raises(DatasetError, match=f"root=.*{DATA_ROOT_ENV}.*kaggle"):
        load_dataset("chestx")


def test_root_without_the_layout_lists_where_it_looked(tmp_path):
    (tmp_path / "something").mkdir()
    with pytest.raises(DatasetError, match=r"Looked for: .*CropDiseases/dataset/train"):
        load_dataset("cropdiseases", tmp_path)


def _rewrite_header(path: Path, old: str, new: str) -> None:
    lines = path.read_text().splitlines()
    lines[0] = lines[0].replace(old, new)
    path.write_text("\n".join(lines) + "\n")


def test_isic_misnamed_column(isic_root):
    csv_path = next(isic_root.rglob("*GroundTruth.csv"))
    _rewrite_header(csv_path, "AKIEC", "AK")
    with pytest.raises(DatasetError, match=r"lacks column\(s\) \['AKIEC'\]") as info:
        load_dataset("isic", isic_root)
    assert str(csv_path) in str(info.value)


def test_chestx_missing_column(chestx_root):
    csv_path = chestx_root / "chestX" / "Data_Entry_2017.csv"
    _rewrite_header(csv_path, "Finding Labels", "Findings")
    with pytest.raises(DatasetError, match=r"lacks column\(s\) \['Finding Labels'\]"):
        load_dataset("chestx", chestx_root)


def test_miniimagenet_csv_missing_column(mini_csv_root):
    csv_path = mini_csv_root / "miniImageNet" / "train.csv"
    _rewrite_header(csv_path, "filename", "file")
    with pytest.raises(DatasetError, match="filename"):
        load_dataset("miniimagenet", mini_csv_root)


def test_image_listed_in_csv_but_absent(isic_root):
    victim = next((isic_root / "ISIC" / "ISIC2018_Task3_Training_Input").glob("*.jpg"))
    victim.unlink()
    with pytest.raises(DatasetError, match=r"1 of 14 images listed in .*GroundTruth.csv are missing") as info:
        load_dataset("isic", isic_root)
    assert victim.name in str(info.value)


def test_chestx_image_absent(chestx_root):
    (chestx_root / "chestX" / "images" / "00000004_000.png").unlink()
    with pytest.raises(DatasetError, match="00000004_000.png"):
        load_dataset("chestx", chestx_root)


def test_truncated_image_is_a_clear_error(eurosat_root):
    victim = eurosat_root / "EuroSAT" / "2750" / "Forest" / "Forest_2.jpg"
    write_image(victim, size=64)
    victim.write_bytes(victim.read_bytes()[:200])
    ds = load_dataset("eurosat", eurosat_root)
    index = [p.name for p in ds.paths].index("Forest_2.jpg")
    with pytest.raises(ImageReadError, match=r"Forest_2.jpg cannot be decoded.*truncated"):
        ds[index]


def test_unreadable_image_is_a_clear_error(eurosat_root):
    victim = eurosat_root / "EuroSAT" / "2750" / "River" / "River_1.jpg"
    victim.write_text("this is not an image")
    ds = load_dataset("eurosat", eurosat_root)
    with pytest.raises(ImageReadError, match="River_1.jpg"):
        ds[[p.name for p in ds.paths].index("River_1.jpg")]


def test_check_command_reports_bad_images(eurosat_root, capsys):
    from cdfsl_core.data.__main__ import main

    assert main(["check", "eurosat", "--root", str(eurosat_root)]) == 0
    (eurosat_root / "EuroSAT" / "2750" / "River" / "River_1.jpg").write_text("junk")
    assert main(["check", "eurosat", "--root", str(eurosat_root)]) == 1
    assert "1 unreadable" in capsys.readouterr().out
