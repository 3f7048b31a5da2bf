"""The data layer: synthetic shapes, image folders, CIM's two views, masks and the collators."""

from __future__ import annotations

import io
import pickle
import sys
import types
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cim_models.data import (
    SHAPE_CLASSES,
    CIMDataCollator,
    ClassificationCollator,
    DataArguments,
    ImageFolderDataset,
    SeededDataset,
    SeededRandomSampler,
    SyntheticShapes,
    TwoViewTransform,
    UnreadableImageError,
    create_eval_transform,
    load_hf_dataset,
    load_split,
    to_rgb,
)
from cim_models.masking import BlockMaskingGenerator


def _photo(width: int = 96, height: int = 72, seed: int = 0) -> Image.Image:
    """A smooth, left-right asymmetric image: a wrong crop or a one-sided flip shows up clearly."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    red = 255 * x / width
    green = 255 * (0.5 + 0.5 * np.sin(x / 9 + y / 13))
    blue = 255 * ((x - 0.7 * width) ** 2 + (y - 0.3 * height) ** 2 < (0.2 * height) ** 2)
    pixels = np.stack([red, green, blue], -1) + rng.normal(0, 2, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _unnormalise(pixel_values: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    return pixel_values * std + mean


def _jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------------
# SyntheticShapes
# --------------------------------------------------------------------------------------------------


def test_synthetic_shapes_are_deterministic_by_seed_and_index():
    first, second = SyntheticShapes(num_samples=20, seed=3), SyntheticShapes(num_samples=20, seed=3)
    for index in (0, 7, 19):
        a, b = first[index], second[index]
        assert a["label"] == b["label"]
        assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
    # Order of access does not matter: item 7 drawn after item 19 is the same item 7.
    assert np.array_equal(
        np.asarray(first[7]["image"]), np.asarray(SyntheticShapes(20, seed=3)[7]["image"])
    )


def test_synthetic_shapes_differ_across_seeds_and_indices():
    a, b = SyntheticShapes(num_samples=10, seed=0), SyntheticShapes(num_samples=10, seed=1)
    assert not np.array_equal(np.asarray(a[0]["image"]), np.asarray(b[0]["image"]))
    assert not np.array_equal(np.asarray(a[0]["image"]), np.asarray(a[1]["image"]))
    assert [a[i]["label"] for i in range(10)] != [b[i]["label"] for i in range(10)]


def test_synthetic_shapes_labels_in_range_and_every_class_present():
    dataset = SyntheticShapes(num_samples=50, image_size=32)
    labels = [dataset[i]["label"] for i in range(len(dataset))]
    assert dataset.classes == list(SHAPE_CLASSES)
    assert set(labels) == set(range(10))
    assert np.bincount(labels).tolist() == [5] * 10  # balanced
    item = dataset[-1]
    assert item["image"].mode == "RGB" and item["image"].size == (32, 32)
    assert isinstance(item["label"], int)


def test_synthetic_shapes_fewer_classes_and_bad_arguments():
    dataset = SyntheticShapes(num_samples=12, image_size=48, num_classes=3)
    assert dataset.classes == ["disc", "square", "triangle"]
    assert {dataset[i]["label"] for i in range(12)} == {0, 1, 2}
    with pytest.raises(ValueError, match="at most 10 classes"):
        SyntheticShapes(num_classes=11)
    with pytest.raises(IndexError):
        dataset[12]


# --------------------------------------------------------------------------------------------------
# TwoViewTransform
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size,tokenizer_size", [(224, 112), (64, 32), (128, 64)])
def test_two_views_show_the_same_crop(size, tokenizer_size):
    image = _photo(160, 120)
    transform = TwoViewTransform(size, tokenizer_size, scale=(0.2, 1.0))
    for seed in range(4):
        torch.manual_seed(seed)
        views = transform(image)
        assert views["pixel_values"].shape == (3, size, size)
        assert views["tokenizer_pixel_values"].shape == (3, tokenizer_size, tokenizer_size)
        assert (
            0 <= views["tokenizer_pixel_values"].min()
            and views["tokenizer_pixel_values"].max() <= 1
        )
        big = _unnormalise(views["pixel_values"]).unsqueeze(0)
        shrunk = F.interpolate(big, size=tokenizer_size, mode="area")[0]
        error = (shrunk - views["tokenizer_pixel_values"]).abs().mean().item()
        mirrored = (shrunk.flip(-1) - views["tokenizer_pixel_values"]).abs().mean().item()
        assert error < 0.03, f"seed {seed}: the two views differ by {error:.3f}"
        assert error < mirrored / 3, "only one of the two views was flipped"


def test_flip_mirrors_both_views_with_the_same_crop():
    image = _photo()
    torch.manual_seed(0)
    plain = TwoViewTransform(64, 32, hflip=0.0)(image)
    torch.manual_seed(0)
    flipped = TwoViewTransform(64, 32, hflip=1.0)(image)
    for key in ("pixel_values", "tokenizer_pixel_values"):
        assert torch.allclose(flipped[key], plain[key].flip(-1), atol=1e-6)


def test_seeding_torch_reproduces_the_views():
    image, transform = _photo(), TwoViewTransform(64, 32)
    torch.manual_seed(7)
    first = [transform(image) for _ in range(3)]
    torch.manual_seed(7)
    second = [transform(image) for _ in range(3)]
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a["pixel_values"], b["pixel_values"])
        assert torch.equal(a["tokenizer_pixel_values"], b["tokenizer_pixel_values"])
    assert not torch.equal(first[0]["pixel_values"], first[1]["pixel_values"])


def test_images_smaller_than_the_crop_and_other_modes_work():
    transform = TwoViewTransform(64, 32)
    for image in (
        Image.new("RGB", (5, 5), (10, 200, 30)),
        Image.new("L", (1, 1), 90),
        _photo().convert("RGBA"),
    ):
        views = transform(image)
        assert views["pixel_values"].shape == (3, 64, 64)
        assert torch.isfinite(views["pixel_values"]).all()


# --------------------------------------------------------------------------------------------------
# Collators
# --------------------------------------------------------------------------------------------------


def test_cim_collator_batches_views_masks_and_labels():
    dataset = SyntheticShapes(num_samples=8, image_size=48)
    collator = CIMDataCollator(TwoViewTransform(64, 32), BlockMaskingGenerator((4, 4), 6))
    batch = collator([dataset[i] for i in range(8)])
    assert set(batch) == {"pixel_values", "tokenizer_pixel_values", "bool_masked_pos", "labels"}
    assert (
        batch["pixel_values"].shape == (8, 3, 64, 64)
        and batch["pixel_values"].dtype == torch.float32
    )
    assert batch["tokenizer_pixel_values"].shape == (8, 3, 32, 32)
    assert batch["tokenizer_pixel_values"].dtype == torch.float32
    masks = batch["bool_masked_pos"]
    assert masks.shape == (8, 4, 4) and masks.dtype == torch.bool
    assert masks.flatten(1).sum(1).tolist() == [6] * 8
    assert len({tuple(m.flatten().tolist()) for m in masks}) > 1, "every sample needs its own mask"
    assert batch["labels"].dtype == torch.long
    assert batch["labels"].tolist() == [dataset[i]["label"] for i in range(8)]


def test_cim_collator_drops_labels_unless_every_example_has_one():
    collator = CIMDataCollator(TwoViewTransform(32, 16), BlockMaskingGenerator((2, 2), 1))
    unlabeled = collator([{"image": _photo()}, {"image": _photo(seed=1)}])
    assert "labels" not in unlabeled
    mixed = collator([{"image": _photo(), "label": 1}, {"image": _photo(seed=1)}])
    assert "labels" not in mixed


def test_image_folder_and_collator_run_in_dataloader_workers(tmp_path):
    for i in range(6):
        (tmp_path / f"{i}.jpg").write_bytes(_jpeg_bytes(_photo(seed=i)))
    transform = TwoViewTransform(32, 16)
    dataset = ImageFolderDataset(tmp_path)
    collator = CIMDataCollator(transform, BlockMaskingGenerator((2, 2), 2))
    pickle.loads(pickle.dumps((dataset, collator)))  # spawn/forkserver workers need this
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=1, collate_fn=collator)
    batches = list(loader)
    assert [b["pixel_values"].shape[0] for b in batches] == [4, 2]
    assert "labels" not in batches[0]


def test_eval_transform_resizes_crops_and_normalises_like_timm():
    image = _photo(120, 90)
    ours = create_eval_transform(64, crop_pct=0.875)(image)
    # By hand: shorter side to floor(64 / 0.875) = 73 (bicubic), centre 64 x 64, ImageNet mean/std.
    resized = image.resize((97, 73), Image.Resampling.BICUBIC)
    left, top = round((97 - 64) / 2), round((73 - 64) / 2)
    crop = torch.from_numpy(np.asarray(resized.crop((left, top, left + 64, top + 64))).copy())
    expected = crop.permute(2, 0, 1).float() / 255
    assert torch.allclose(_unnormalise(ours), expected, atol=2 / 255)
    batch = ClassificationCollator(create_eval_transform(64))([{"image": image, "label": 3}] * 2)
    assert batch["pixel_values"].shape == (2, 3, 64, 64) and batch["labels"].tolist() == [3, 3]
    with pytest.raises(ValueError, match="crop_pct"):
        create_eval_transform(crop_pct=1.5)


# --------------------------------------------------------------------------------------------------
# ImageFolderDataset
# --------------------------------------------------------------------------------------------------


def test_image_folder_with_class_subfolders_is_labeled(tmp_path):
    for name in ("cats", "dogs"):
        (tmp_path / name / "nested").mkdir(parents=True)
        _photo(seed=1).save(tmp_path / name / "a.png")
        _photo(seed=2).save(tmp_path / name / "nested" / "b.JPG")
    (tmp_path / "cats" / "notes.txt").write_text("not an image")
    (tmp_path / ".ipynb_checkpoints").mkdir()
    _photo().save(tmp_path / ".ipynb_checkpoints" / "c.png")
    dataset = ImageFolderDataset(tmp_path)
    assert dataset.classes == ["cats", "dogs"] and len(dataset) == 4
    assert [dataset[i]["label"] for i in range(4)] == [0, 0, 1, 1]
    assert dataset[0]["image"].mode == "RGB"


def test_image_folder_without_subfolders_is_unlabeled(tmp_path):
    _photo().save(tmp_path / "a.png")
    (tmp_path / "more").mkdir()
    _photo().save(tmp_path / "more" / "b.png")
    dataset = ImageFolderDataset(tmp_path)
    assert len(dataset) == 2 and dataset.classes == []
    assert set(dataset[0]) == {"image"}


def test_empty_or_missing_image_folder_fails_with_its_name(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="No image files found under .*empty"):
        ImageFolderDataset(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="missing"):
        ImageFolderDataset(tmp_path / "missing")


def _write_odd_images(folder):
    Image.new("L", (20, 16), 80).save(folder / "gray.png")
    palette = Image.new("P", (20, 16), 0)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.paste(1, (0, 0, 10, 16))
    palette.save(folder / "palette.png", transparency=1)  # left half transparent
    rgba = Image.new("RGBA", (20, 16), (0, 0, 0, 0))
    rgba.paste((0, 200, 0, 255), (10, 0, 20, 16))
    rgba.save(folder / "rgba.png")
    Image.new("CMYK", (20, 16), (0, 255, 255, 0)).save(folder / "cmyk.jpg")
    ramp = np.linspace(0, 65535, 32 * 8).reshape(8, 32).astype(np.uint16)
    Image.fromarray(ramp).save(folder / "deep.png")  # 16-bit grayscale
    Image.new("RGB", (5, 5), (1, 2, 3)).save(folder / "tiny.bmp")
    Image.new("1", (9, 9), 1).save(folder / "bilevel.tif")


def test_every_mode_becomes_rgb_without_clipping(tmp_path):
    _write_odd_images(tmp_path)
    dataset = ImageFolderDataset(tmp_path)
    images = {p.split("/")[-1]: dataset[i]["image"] for i, p in enumerate(dataset.paths)}
    assert len(images) == 7 and all(image.mode == "RGB" for image in images.values())
    palette = np.asarray(images["palette.png"])
    assert (palette[:, :10] == 255).all() and (palette[:, 10:] == [255, 0, 0]).all()  # on white
    rgba = np.asarray(images["rgba.png"])
    assert (rgba[:, :10] == 255).all() and (rgba[:, 10:] == [0, 200, 0]).all()
    assert np.abs(np.asarray(images["cmyk.jpg"]).astype(int) - [255, 0, 0]).max() < 8
    deep = np.asarray(images["deep.png"])[..., 0].astype(int)
    assert deep.min() == 0 and deep.max() == 255 and 100 < deep.mean() < 155, "16-bit was clipped"
    assert images["tiny.bmp"].size == (5, 5)
    assert (np.asarray(images["bilevel.tif"]) == 255).all()


def test_high_depth_modes_scale_by_their_range():
    assert to_rgb(Image.new("I;16", (2, 2), 65535)).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("I;16B", (2, 2), 32896)).getpixel((0, 0)) == (128, 128, 128)
    assert to_rgb(Image.new("I", (2, 2), 4112)).getpixel((0, 0)) == (16, 16, 16)
    assert to_rgb(Image.new("F", (2, 2), 0.5)).getpixel((0, 0)) == (128, 128, 128)


def _write_bad_files(folder):
    (folder / "corrupt.jpg").write_bytes(b"this is not a jpeg at all" * 10)
    (folder / "empty.png").write_bytes(b"")
    data = _jpeg_bytes(
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8))
    )
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    return {str(folder / name) for name in ("corrupt.jpg", "empty.png", "truncated.jpg")}


def test_unreadable_files_are_skipped_with_a_warning_naming_them(tmp_path):
    _photo().save(tmp_path / "a_good.png")
    _photo(seed=1).save(tmp_path / "z_good.jpg")
    bad = _write_bad_files(tmp_path)
    dataset = ImageFolderDataset(tmp_path)
    assert len(dataset) == 5
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = [dataset[i] for i in range(len(dataset))]
    assert all(item["image"].mode == "RGB" for item in items)  # every slot filled by a good file
    assert dataset.skipped_files == bad
    messages = "\n".join(str(w.message) for w in caught)
    assert all(path in messages for path in bad)
    with warnings.catch_warnings(record=True) as caught:  # known-bad files are not decoded again
        warnings.simplefilter("always")
        dataset[1]
    assert not caught


def test_strict_mode_raises_naming_the_file(tmp_path):
    _photo().save(tmp_path / "a_good.png")
    (tmp_path / "b_broken.jpg").write_bytes(b"")
    dataset = ImageFolderDataset(tmp_path, strict=True)
    dataset[0]
    with pytest.raises(UnreadableImageError, match=r"b_broken\.jpg.*--strict_data"):
        dataset[1]


def test_no_readable_file_at_all_raises(tmp_path):
    _write_bad_files(tmp_path)
    dataset = ImageFolderDataset(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(UnreadableImageError, match="None of the 3 image files"):
            dataset[0]


# --------------------------------------------------------------------------------------------------
# Hugging Face datasets (faked: the library is optional)
# --------------------------------------------------------------------------------------------------


class _FakeClassLabel:
    names = ("cat", "dog")


class _FakeHFDataset:
    def __init__(self, rows, features):
        self.rows, self.features = rows, features
        self.column_names = list(rows[0])

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return self.rows[index]

    def select_columns(self, columns):
        return _FakeHFDataset([{c: r[c] for c in columns} for r in self.rows], self.features)


def _fake_datasets(monkeypatch, rows, features=None):
    calls = {}

    def load_dataset(name, config_name=None, split=None):
        calls.update(name=name, config_name=config_name, split=split)
        return _FakeHFDataset(rows, features or {})

    module = types.SimpleNamespace(load_dataset=load_dataset, DatasetDict=dict)
    monkeypatch.setitem(sys.modules, "datasets", module)
    return calls


def test_hf_dataset_finds_image_and_label_columns(monkeypatch):
    rows = [{"img": Image.new("L", (8, 8), 9), "labels": i % 2, "caption": "x"} for i in range(3)]
    calls = _fake_datasets(monkeypatch, rows, {"labels": _FakeClassLabel()})
    dataset = load_hf_dataset("user/pets", split="validation", config_name="small")
    assert calls == {"name": "user/pets", "config_name": "small", "split": "validation"}
    assert len(dataset) == 3 and dataset.classes == ["cat", "dog"]
    item = dataset[1]
    assert item["image"].mode == "RGB" and item["label"] == 1 and set(item) == {"image", "label"}


def test_hf_dataset_without_labels_and_with_a_wrong_column(monkeypatch):
    rows = [{"image": {"bytes": _jpeg_bytes(_photo()), "path": None}}]
    _fake_datasets(monkeypatch, rows)
    item = load_hf_dataset("user/photos")[0]
    assert set(item) == {"image"} and item["image"].size == (96, 72)
    with pytest.raises(ValueError, match="no label column 'target'"):
        load_hf_dataset("user/photos", label_column="target")
    _fake_datasets(monkeypatch, [{"picture": Image.new("RGB", (2, 2))}])
    with pytest.raises(ValueError, match="image_column="):
        load_hf_dataset("user/photos")
    image_feature = type("Image", (), {})()  # found by its feature type, whatever the column name
    _fake_datasets(monkeypatch, [{"picture": Image.new("RGB", (2, 2))}], {"picture": image_feature})
    assert load_hf_dataset("user/photos")[0]["image"].size == (2, 2)


def test_missing_datasets_library_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError, match=r'pip install "cim-models\[datasets\]"'):
        load_hf_dataset("user/pets")


def test_seeded_sampler_gives_each_draw_its_own_reproducible_seed():

    sampler = SeededRandomSampler(10, seed=3)
    first = list(sampler)
    assert sorted(i for i, _ in first) == list(range(10)) and list(sampler) == first
    sampler.set_epoch(1)
    second = list(sampler)
    assert [i for i, _ in second] != [i for i, _ in first]  # a new permutation per epoch
    assert {s for _, s in second}.isdisjoint({s for _, s in first})  # and new augmentations
    dataset = SeededDataset(SyntheticShapes(10, image_size=32))
    assert dataset[first[0]]["seed"] == first[0][1] and "seed" not in dataset[0]
    assert dataset.classes == dataset.dataset.classes


def test_collator_draws_from_the_sample_seed_not_the_global_rng(monkeypatch):
    collate = CIMDataCollator(TwoViewTransform(32, 16), BlockMaskingGenerator(4, 6))
    image = SyntheticShapes(1, image_size=48)[0]["image"]
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    a = collate([{"image": image, "seed": 7}])
    assert torch.equal(torch.random.get_rng_state(), before)  # the global stream was not consumed
    torch.manual_seed(1)
    b = collate([{"image": image, "seed": 7}])
    assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(
        a["bool_masked_pos"], b["bool_masked_pos"]
    )
    c = collate([{"image": image, "seed": 8}])
    assert not torch.equal(a["bool_masked_pos"], c["bool_masked_pos"]) or not torch.equal(
        a["pixel_values"], c["pixel_values"]
    )

    # Only the CPU generator is seeded: CUDA's streams (torch.manual_seed reseeds them) stay put.
    cuda_seeds = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", cuda_seeds.append)
    monkeypatch.setattr(torch.cuda, "manual_seed", cuda_seeds.append)
    collate([{"image": image, "seed": 9}, {"image": image, "seed": 10}])
    assert cuda_seeds == []


def test_seeded_sampler_epoch_changes_order_and_is_reproducible():
    first = SeededRandomSampler(50, seed=1)
    first.set_epoch(3)
    again = SeededRandomSampler(50, seed=1)
    again.set_epoch(3)
    assert list(first) == list(again)  # a resumed run re-creates the epoch's order exactly
    again.set_epoch(4)
    assert list(first) != list(again)


# --------------------------------------------------------------------------------------------------
# The dispatch from the data flags
# --------------------------------------------------------------------------------------------------


def test_load_split_reads_folders_and_the_built_in_data(tmp_path):
    for split in ("train", "val"):
        for label in ("a", "b"):
            (tmp_path / split / label).mkdir(parents=True)
            _photo(seed=len(label)).save(tmp_path / split / label / "x.png")
    folders = DataArguments(train_dir=str(tmp_path / "train"), validation_dir=str(tmp_path / "val"))
    train, validation = load_split(folders, "train", 32), load_split(folders, "validation", 32)
    assert isinstance(train, ImageFolderDataset) and train.classes == ["a", "b"]
    assert validation.root == tmp_path / "val"
    assert load_split(DataArguments(train_dir=str(tmp_path / "train")), "validation", 32) is None
    with pytest.raises(ValueError, match="without --train_dir"):
        load_split(DataArguments(validation_dir=str(tmp_path / "val")), "train", 32)
    built_in = DataArguments(synthetic_train_samples=12, synthetic_eval_samples=5)
    train, validation = load_split(built_in, "train", 40), load_split(built_in, "validation", 40)
    assert (len(train), len(validation), train.image_size) == (12, 5, 40)
    assert train.seed != validation.seed  # held-out images, not the training ones
    assert not np.array_equal(np.asarray(train[0]["image"]), np.asarray(validation[0]["image"]))
