"""Shared fixtures: tiny image trees in the real datasets' layouts, generated per test."""

from __future__ import annotations

import csv
import socket
from pathlib import Path

import pytest
import torch
from helpers import CHESTX_ROWS, EUROSAT_FOLDERS, write_image

PLANTVILLAGE_CLASSES = [
    "Apple___Apple_scab", "Apple___Black_rot", "Apple___Cedar_apple_rust", "Apple___healthy",
    "Blueberry___healthy", "Cherry_(including_sour)___Powdery_mildew", "Cherry_(including_sour)___healthy",
    "Corn_(maize)___Cercospora_leaf_spot Gray_leaf_spot", "Corn_(maize)___Common_rust_",
    "Corn_(maize)___Northern_Leaf_Blight", "Corn_(maize)___healthy", "Grape___Black_rot",
    "Grape___Esca_(Black_Measles)", "Grape___Leaf_blight_(Isariopsis_Leaf_Spot)", "Grape___healthy",
    "Orange___Haunglongbing_(Citrus_greening)", "Peach___Bacterial_spot", "Peach___healthy",
    "Pepper,_bell___Bacterial_spot", "Pepper,_bell___healthy", "Potato___Early_blight",
    "Potato___Late_blight", "Potato___healthy", "Raspberry___healthy", "Soybean___healthy",
    "Squash___Powdery_mildew", "Strawberry___Leaf_scorch", "Strawberry___healthy",
    "Tomato___Bacterial_spot", "Tomato___Early_blight", "Tomato___Late_blight", "Tomato___Leaf_Mold",
    "Tomato___Septoria_leaf_spot", "Tomato___Spider_mites Two-spotted_spider_mite",
    "Tomato___Target_Spot", "Tomato___Tomato_Yellow_Leaf_Curl_Virus", "Tomato___Tomato_mosaic_virus",
    "Tomato___healthy",
]
ISIC_COLUMNS = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]


@pytest.fixture
def crop_root(tmp_path: Path) -> Path:
    for c, name in enumerate(PLANTVILLAGE_CLASSES):
        for i in range(2):
            write_image(tmp_path / "CropDiseases" / "dataset" / "train" / name / f"img_{i}.jpg", seed=c * 10 + i)
    return tmp_path


@pytest.fixture
def eurosat_root(tmp_path: Path) -> Path:
    for c, name in enumerate(EUROSAT_FOLDERS):
        for i in range(1, 4):
            write_image(tmp_path / "EuroSAT" / "2750" / name / f"{name}_{i}.jpg", seed=c * 10 + i)
    return tmp_path


@pytest.fixture
def isic_root(tmp_path: Path) -> Path:
    base = tmp_path / "ISIC"
    gt = base / "ISIC2018_Task3_Training_GroundTruth" / "ISIC2018_Task3_Training_GroundTruth.csv"
    gt.parent.mkdir(parents=True)
    rows = []
    for i in range(14):
        label = (i * 3) % 7
        name = f"ISIC_{24306 + i:07d}"
        rows.append([name] + [f"{float(j == label):.1f}" for j in range(7)])
        write_image(base / "ISIC2018_Task3_Training_Input" / f"{name}.jpg", seed=i)
    with gt.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", *ISIC_COLUMNS])
        writer.writerows(rows)
    return tmp_path


@pytest.fixture
def chestx_root(tmp_path: Path) -> Path:
    base = tmp_path / "chestX"
    (base / "images").mkdir(parents=True)
    header = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age",
              "Patient Gender", "View Position", "OriginalImage[Width", "Height]",
              "OriginalImagePixelSpacing[x", "y]"]
    with (base / "Data_Entry_2017.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for i, (image, labels) in enumerate(CHESTX_ROWS):
            writer.writerow([image, labels, 0, i, 50, "M", "PA", 1024, 1024, 0.14, 0.14])
            write_image(base / "images" / image, seed=i)
    return tmp_path


MINI_WNIDS = ["n01532829", "n01558993", "n01704323"]  # house finch, American robin, triceratops


@pytest.fixture
def mini_csv_root(tmp_path: Path) -> Path:
    base = tmp_path / "miniImageNet"
    base.mkdir()
    with (base / "train.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["filename", "label"])
        for c, wnid in enumerate(MINI_WNIDS):
            for i in range(3):
                name = f"{wnid}0000{i + 1:04d}.jpg"
                writer.writerow([name, wnid])
                write_image(base / "images" / name, seed=c * 10 + i)
    return tmp_path


@pytest.fixture
def mini_folder_root(tmp_path: Path) -> Path:
    for c, wnid in enumerate(MINI_WNIDS):
        for i in range(3):
            write_image(tmp_path / "miniImageNet" / "train" / wnid / f"{wnid}_{i}.JPEG", seed=c * 10 + i)
    return tmp_path


@pytest.fixture
def bundle():
    """The 2-block test architecture with seeded random weights, new for each test."""
    from cdfsl_core.models import load_clip

    torch.manual_seed(0)
    return load_clip("cdfsl-test-vit")


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] if len(args) > 1 else args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


