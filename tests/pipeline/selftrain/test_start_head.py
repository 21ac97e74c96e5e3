"""self-train --start-head: the head is checked before any work (it loads, and predicts the
classes --classes names: its pseudo-labels are indices into its own class map)."""

import pytest
import torch

from model.checkpoint import HeadCheckpoint, save_head_checkpoint
from model.classes import ClassMap, save_class_map
from model.errors import DinosegError
from model.heads import prototype_config, prototype_state
from pipeline.selftrain import SelfTrainConfig, run_self_train
from pipeline.train import TrainConfig


def prototype_head(path, names) -> str:
    classes = ClassMap(tuple(names), tuple((10 * i, 0, 0) for i in range(len(names))))
    state = prototype_state(torch.randn(len(names), 1, 384), torch.ones(len(names), 1, dtype=torch.bool))
    save_head_checkpoint(
        HeadCheckpoint("dinov2_vits14", prototype_config((11,), 384, len(names), 1), classes, state), str(path)
    )
    return str(path)


def config(tmp_path, head, classes) -> SelfTrainConfig:
    train = TrainConfig(None, None, classes=classes, output=str(tmp_path / "st"), backbone_weights="random")
    return SelfTrainConfig(train, unlabeled=str(tmp_path / "unlabeled"), rounds=1, start_head=head)


def test_a_start_head_of_other_classes_is_refused_in_one_sentence(tmp_path):
    head = prototype_head(tmp_path / "head.pt", ["cluster_0", "cluster_1", "cluster_2"])
    classes = tmp_path / "classes.yaml"
    save_class_map(ClassMap(("sky", "road"), ((0, 0, 255), (90, 90, 90))), str(classes))
    with pytest.raises(DinosegError, match=r"predicts 3 classes \(cluster_0, cluster_1, cluster_2\).*names 2") as e:
        run_self_train(config(tmp_path, head, str(classes)))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "st").exists()  # nothing was started or written


def test_a_missing_start_head_fails_before_any_work(tmp_path):
    with pytest.raises(DinosegError) as e:
        run_self_train(config(tmp_path, str(tmp_path / "nowhere.pt"), "voc2012"))
    assert "nowhere.pt" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "st").exists()


def test_without_images_or_a_start_head_it_says_what_to_give(tmp_path):
    with pytest.raises(DinosegError, match="--start-head"):
        run_self_train(config(tmp_path, None, "voc2012"))
