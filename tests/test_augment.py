"""Augment (model/augment.py), Keras's random flip, translation, rotation and zoom applied to
a whole batch: what each does, the ranges it reaches, its sampling under bf16 autocast, and the
augment config group that switches it on."""

import math

import torch
import torch.nn.functional as F


def test_augment_flips_and_warps_on_the_batch():
    from cifar_lightning.model.augment import Augment

    torch.manual_seed(0)
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32) % 256
    x = x.repeat(32, 1, 1, 1)
    flipped = Augment(flip=True)(x)
    is_flip = [torch.equal(f, o.flip(-1)) for f, o in zip(flipped, x)]
    is_same = [torch.equal(f, o) for f, o in zip(flipped, x)]
    assert all(a or b for a, b in zip(is_flip, is_same)) and 16 <= sum(is_flip) <= 48
    warped = Augment(flip=False, rotation_deg=10, zoom=0.1, translate=0.1)(x)
    assert warped.shape == x.shape and not torch.equal(warped, x)
    assert warped.min() >= 0 and warped.max() <= 255  # reflection padding, bilinear: stays in range


def test_augment_ranges_reach_keras_bounds(monkeypatch):
    # RandomTranslation(0.1) shifts by up to 10% of the size (0.2 in grid units, where 2 = full
    # width), RandomRotation is given in degrees, RandomZoom(0.1) scales within [0.9, 1.1]. Read
    # them off the affine matrices over many images: within the bounds, and approaching them.
    import cifar_lightning.model.augment as augment

    thetas, affine_grid = [], F.affine_grid
    monkeypatch.setattr(
        augment.F,
        "affine_grid",
        lambda theta, *a, **k: thetas.append(theta) or affine_grid(theta, *a, **k),
    )
    torch.manual_seed(0)
    augment.Augment(flip=False, rotation_deg=10, zoom=0.1, translate=0.1)(
        torch.zeros(4000, 1, 4, 4)
    )
    (theta,) = thetas
    a, c = theta[:, 0, 0], theta[:, 1, 0]
    scale, angle = torch.hypot(a, c), torch.atan2(c, a)
    shift = theta[:, :, 2].abs()
    assert shift.max() <= 0.2 + 1e-6 and shift.max() > 0.8 * 0.2
    rad = math.radians(10)
    assert angle.abs().max() <= rad + 1e-6 and angle.abs().max() > 0.8 * rad
    assert scale.min() >= 0.9 - 1e-6 and scale.max() <= 1.1 + 1e-6
    assert scale.min() < 0.92 and scale.max() > 1.08


def test_augment_samples_the_same_pixels_under_bf16_autocast():
    # trainer.precision=bf16-mixed runs training_step under autocast; the warp's grid must stay fp32
    # (a bf16 grid moves sampling positions by up to ~1/256 of the image, a visible shift of edges).
    import cifar_lightning.model.augment as augment

    x = torch.randint(0, 256, (64, 3, 32, 32), generator=torch.Generator().manual_seed(1)).to(
        torch.uint8
    )
    warp = augment.Augment(flip=True, rotation_deg=10, zoom=0.1, translate=0.1)
    torch.manual_seed(0)
    fp32 = warp(x)
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = warp(x)
    assert mixed.dtype == torch.float32
    assert (mixed - fp32).abs().max() < 1e-2  # 0-255 scale


def test_random_crop_shifts_each_image_by_whole_pixels():
    # every output is one window of the reflect-padded image: sharp pixels, no interpolation;
    # the window is drawn per image, not once for the batch
    from cifar_lightning.model.augment import random_crop

    torch.manual_seed(0)
    x = torch.rand(64, 3, 8, 8) * 255
    padded = F.pad(x, (2, 2, 2, 2), mode="reflect")
    offsets = []
    for out, pad in zip(random_crop(x, 2), padded):
        hits = [
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            if torch.equal(out, pad[:, dy : dy + 8, dx : dx + 8])
        ]
        assert len(hits) == 1
        offsets += hits
    assert len(set(offsets)) >= 15 and (0, 0) in offsets and (4, 4) in offsets


def test_cutout_zeroes_one_square_per_image_clipped_at_the_borders():
    from cifar_lightning.model.augment import cutout

    torch.manual_seed(0)
    out = cutout(torch.ones(300, 3, 16, 16), 4)
    zero = out == 0
    assert torch.equal(zero, zero[:, :1].expand_as(zero))  # all channels alike
    counts = zero[:, 0].sum((1, 2))
    assert counts.max() == 16 and counts.min() >= 4  # 4x4 inside, clipped to 2x2 at worst corner
    for mask in zero[:, 0]:  # one rectangle: its bounding box is all zeros
        rows, cols = mask.any(1).nonzero(), mask.any(0).nonzero()
        box = mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert box.all() and len(rows) <= 4 and len(cols) <= 4


def test_augment_applies_crop_and_cutout_when_asked():
    from cifar_lightning.model.augment import Augment

    torch.manual_seed(0)
    x = torch.rand(32, 3, 8, 8) * 200 + 10  # no zeros of its own
    assert torch.equal(Augment(flip=False)(x), x)
    assert (Augment(flip=False, cutout=3)(x) == 0).any()
    assert not torch.equal(Augment(flip=False, crop_pad=1)(x), x)


def test_the_augment_group_reaches_the_module(tmp_path):
    # augment=none (the notebook's): no augmentation at all; augment=keras: the preprocessing
    # layers of the notebook's next step; single keys switch single augmentations on
    from cifar_lightning.model.augment import Augment
    from tests.conftest import make_classifier

    assert make_classifier(tmp_path).augment is None
    keras = make_classifier(tmp_path, "augment=keras").augment
    assert isinstance(keras, Augment)
    assert (keras.flip, keras.rotation_deg, keras.zoom, keras.translate) == (True, 10, 0.1, 0.1)
    assert (keras.crop_pad, keras.cutout) == (0, 0)
    crop = make_classifier(tmp_path, "augment.crop_pad=4").augment
    assert (crop.flip, crop.crop_pad, crop.rotation_deg) == (False, 4, 0)
