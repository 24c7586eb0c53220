"""Model factory: simple_cnn, timm names, in_chans adaptation, local and packaged pretrained weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_image
from timm.data import ImageNetInfo

from classifier.data.transforms import Normalise, image_to_tensor
from classifier.errors import UserError
from classifier.nets.models import (
    MetadataFusion,
    apply_model,
    create_model,
    frozen_backbone,
    head_and_backbone,
    model_from_checkpoint,
    packaged_weights,
)

# ImageNet classes a photo of a Chinese temple roof by a lake may fairly be called.
TEMPLE_CLASSES = {"bell cote", "church", "palace", "dome", "monastery", "mosque", "pagoda", "stupa", "boathouse"}


@pytest.mark.parametrize(("name", "in_chans"), [("simple_cnn", 1), ("simple_cnn", 4), ("resnet18", 1)])
def test_models_take_the_data_channels_and_class_count(name: str, in_chans: int) -> None:
    model = create_model(name, num_classes=3, in_chans=in_chans).eval()

    assert model(torch.zeros(2, in_chans, 32, 32)).shape == (2, 3)


def test_unknown_model_name_suggests_close_matches() -> None:
    with pytest.raises(UserError, match=r"unknown model 'resnet81'; did you mean .*resnet18"):
        create_model("resnet81", 2, 3)


def test_weights_that_do_not_fit_are_a_user_error(tmp_path: Path) -> None:
    path = tmp_path / "cnn.pt"
    torch.save(create_model("simple_cnn", 2, 3).state_dict(), path)

    with pytest.raises(UserError, match="weights do not fit"):
        create_model("resnet18", 2, 3, weights=path)
    with pytest.raises(UserError, match="weights do not fit"):
        create_model("simple_cnn", 5, 3, weights=path)


def test_local_timm_weights_are_adapted_to_new_channels_and_classes(tmp_path: Path) -> None:
    source = create_model("resnet18", 10, 3)
    path = tmp_path / "resnet18.pt"
    torch.save({"state_dict": source.state_dict()}, path)

    model = create_model("resnet18", 2, 1, weights=path)

    assert model.conv1.weight.shape == (64, 1, 7, 7)
    assert torch.allclose(model.conv1.weight, source.conv1.weight.sum(dim=1, keepdim=True))
    assert torch.equal(model.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    assert model.fc.weight.shape == (2, 512)


def test_packaged_efficientnet_lite0_weights_classify_a_real_photo_offline() -> None:
    model = create_model("efficientnet_lite0", 1000, 3, pretrained=True).eval()
    photo = Image.fromarray(load_sample_image("china.jpg")).resize((224, 224), Image.BICUBIC)
    normalise = Normalise((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

    with torch.no_grad():
        probabilities = model(normalise(image_to_tensor(photo, 8)[None])).softmax(1)[0]

    top1 = ImageNetInfo().index_to_description(int(probabilities.argmax())).split(",")[0]
    assert top1 in TEMPLE_CLASSES


def test_packaged_weights_load_into_timm_names_by_position() -> None:
    model = create_model("efficientnet_lite0", 2, 1, pretrained=True)
    packaged = torch.load(packaged_weights("efficientnet_lite0"), weights_only=True)

    ours = model.state_dict()
    for (name, tensor), theirs in zip(ours.items(), packaged.values(), strict=True):
        if not name.startswith(("conv_stem.", "classifier.")):
            assert torch.equal(tensor, theirs), name
    assert model.classifier.weight.shape == (2, 1280)
    assert torch.allclose(model.conv_stem.weight, packaged["_conv_stem.weight"].sum(1, keepdim=True))


def test_model_from_checkpoint_rebuilds_the_same_network() -> None:
    model = create_model("resnet18", 3, 4).eval()
    checkpoint = {"architecture": "resnet18", "num_classes": 3, "in_chans": 4, "state_dict": model.state_dict()}
    images = torch.rand(2, 4, 32, 32)

    with torch.no_grad():
        assert torch.equal(model_from_checkpoint(checkpoint)(images), model(images))


def test_freezing_leaves_only_the_head_trainable() -> None:
    model = create_model("resnet18", 2, 3)
    with frozen_backbone(model):
        trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
        assert trainable == {"fc.weight", "fc.bias"}
    assert all(parameter.requires_grad for parameter in model.parameters())


@pytest.mark.parametrize(
    ("name", "metadata_width"), [("simple_cnn", 0), ("resnet18", 0), ("efficientnet_lite0", 0), ("simple_cnn", 3)]
)
def test_a_frozen_backbone_keeps_its_weights_and_batchnorm_statistics_while_the_head_trains(
    name: str, metadata_width: int
) -> None:
    torch.manual_seed(0)
    model = create_model(name, 2, 3, metadata_width=metadata_width)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    head = {id(parameter) for parameter in head_and_backbone(model)[0]}
    head_names = {key for key, parameter in model.named_parameters() if id(parameter) in head}
    start = {key: value.clone() for key, value in model.state_dict().items()}

    def step() -> None:
        images = torch.randn(8, 3, 32, 32) * 3 + 1  # far from the running statistics: BatchNorm would move them
        inputs = (images, torch.randn(8, metadata_width)) if metadata_width else images
        loss = torch.nn.functional.cross_entropy(apply_model(model, inputs), torch.randint(0, 2, (8,)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    model.train()
    with frozen_backbone(model, optimizer):
        for _ in range(3):
            step()
    frozen = model.state_dict()

    assert set(frozen) == set(start)  # the ordinary network again: same state_dict keys, BatchNorm layers
    assert any(isinstance(module, torch.nn.BatchNorm2d) for module in model.modules())
    backbone = [key for key in start if key not in head_names]
    assert any("running_mean" in key for key in backbone)
    for key in backbone:
        assert torch.equal(frozen[key], start[key]), key
    assert any(not torch.equal(frozen[key], start[key]) for key in head_names)
    optimised = {id(parameter) for group in optimizer.param_groups for parameter in group["params"]}
    assert optimised == {id(parameter) for parameter in model.parameters()}  # the new BatchNorm weights train on

    model.train()
    step()  # unfrozen: the backbone and its statistics move
    assert any(not torch.equal(model.state_dict()[key], start[key]) for key in backbone if "running_mean" in key)
    assert any(not torch.equal(model.state_dict()[key], start[key]) for key in backbone if key.endswith("weight"))


def test_image_to_tensor_scales_8_and_16_bit() -> None:
    grey16 = Image.fromarray(np.full((4, 5), 65535, dtype=np.uint16))
    rgb = Image.fromarray(np.full((4, 5, 3), 51, dtype=np.uint8))

    assert image_to_tensor(grey16, 16).shape == (1, 4, 5)
    assert image_to_tensor(grey16, 16).max() == 1.0
    assert image_to_tensor(rgb, 8).shape == (3, 4, 5)
    assert torch.allclose(image_to_tensor(rgb, 8), torch.full((3, 4, 5), 0.2))


def test_pretrained_first_conv_is_adapted_to_rgby_as_timm_does() -> None:
    model = create_model("efficientnet_lite0", 28, 4, pretrained=True)
    rgb = torch.load(packaged_weights("efficientnet_lite0"), weights_only=True)["_conv_stem.weight"]

    stem = model.conv_stem.weight
    assert stem.shape == (32, 4, 3, 3)
    # timm repeats the RGB filters over the extra channel (yellow gets red's) and scales by 3/4 to keep activations
    assert torch.allclose(stem, torch.cat([rgb, rgb[:, :1]], dim=1) * 3 / 4)


def test_a_metadata_model_keeps_the_pretrained_backbone_and_joins_the_metadata_before_the_head() -> None:
    model = create_model("efficientnet_lite0", 7, 3, pretrained=True, metadata_width=5).eval()
    plain = create_model("efficientnet_lite0", 7, 3, pretrained=True)

    assert isinstance(model, MetadataFusion)
    assert torch.equal(model.backbone.conv_stem.weight, plain.conv_stem.weight)
    images, metadata = torch.rand(2, 3, 32, 32), torch.rand(2, 5)
    assert apply_model(model, (images, metadata)).shape == (2, 7)
    with torch.no_grad():  # the metadata changes the prediction
        assert not torch.equal(model(images, metadata), model(images, metadata + 1))
    head, backbone = head_and_backbone(model)
    assert len(head) == 4 and all(any(p is q for q in model.backbone.parameters()) for p in backbone)
