"""`dinoseg text-head` and `segment --classes-text`: the refusals that keep a user's files and
an OUTPUT's masks safe, checked before the text tower runs or anything is written."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dinotxt_files import write_dinotxt_hub
from hubs import write_backbone

from model.errors import DinosegError, UnknownModelError
from model.text_head import TextHeadRequest, build_text_head
from pipeline.label.text_head import TextHeadConfig, run_text_head
from pipeline.segment import SegmentConfig, run_segment

SMALL = "dinov2_vits14_reg"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    root = tmp_path / "hub"
    write_dinotxt_hub(root, dim=384, width=64, layers=1)
    write_backbone(root, SMALL)
    monkeypatch.setenv("DINOSEG_HUB", str(root))
    return root


def test_the_record_beside_the_head_never_replaces_a_users_file(tmp_path, hub):
    classes = tmp_path / "labels" / "classes.json"
    classes.parent.mkdir()
    classes.write_text('{"classes": [{"id": 0, "name": "sky"}, {"id": 1, "name": "road"}]}')
    before = classes.read_bytes()
    with pytest.raises(DinosegError, match="record over CLASSES"):
        run_text_head(TextHeadConfig(str(classes), str(tmp_path / "labels" / "classes.pt"), backbone=SMALL))
    assert classes.read_bytes() == before and not (tmp_path / "labels" / "classes.pt").exists()

    notes = tmp_path / "heads" / "street.json"  # a file of the user's where the record would go
    notes.parent.mkdir()
    notes.write_text("mine")
    with pytest.raises(DinosegError, match="--overwrite") as e:
        run_text_head(TextHeadConfig("sky, road", str(tmp_path / "heads" / "street.pt"), backbone=SMALL))
    assert "\n" not in str(e.value) and notes.read_text() == "mine"
    assert not (tmp_path / "heads" / "street.pt").exists()


def test_a_backbone_without_registers_is_refused(hub):
    with pytest.raises(DinosegError, match="register") as e:
        build_text_head(TextHeadRequest("sky, road", backbone="dinov2_vits14"))
    assert "\n" not in str(e.value)


def test_the_digest_names_the_classes_not_how_they_were_typed(tmp_path):
    assert TextHeadRequest("sky,road").digest() == TextHeadRequest(" sky, road ").digest()
    path = tmp_path / "c.yaml"
    path.write_text("classes:\n- {id: 0, name: sky}\n- {id: 1, name: road}\n")
    assert TextHeadRequest(str(path)).digest() == TextHeadRequest(f"{tmp_path}/./c.yaml").digest()


def test_a_tab_indented_json_class_map_reads(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(
        '{\n\t"classes": [\n\t\t{"id": 0, "name": "sky", "prompts": ["the sky"]},\n\t\t{"id": 1, "name": "road"}\n\t]\n}'
    )
    from model.text_head import class_prompts

    spec = class_prompts(TextHeadRequest(str(path)))
    assert spec.prompts[0] == ["the sky"] and len(spec.prompts[1]) == 80


def test_segment_refuses_an_empty_class_list_and_points_the_dinotxt_name_to_classes_text():
    with pytest.raises(DinosegError, match="empty"):
        SegmentConfig("in", "out", classes_text="  ")
    from model.weights import segmentation_model

    with pytest.raises(UnknownModelError, match="--classes-text"):
        segmentation_model("dinov2_vitl14_reg4_dinotxt_tet1280d20h24l")


def _masks_of_another_model(out):
    (out / "predictions").mkdir(parents=True)
    table = pa.table({"key": ["a"], "model": ["dinov2_vits14_voc2012_linear"], "head_checksum": ["0123456789abcdef"]})
    pq.write_table(table, out / "predictions" / "part-00000.parquet")


def test_classes_text_into_an_output_of_another_model_is_refused_before_the_head_is_written(tmp_path, hub):
    out = tmp_path / "seg"
    _masks_of_another_model(out)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(b"listed, never read")  # INPUT is listed before the head is built
    config = SegmentConfig(str(tmp_path / "in"), str(out), classes_text="sky, road", backbone=SMALL)
    with pytest.raises(DinosegError, match="another model") as e:
        run_segment(config)
    assert "\n" not in str(e.value)
    assert not (out / "text_head.pt").exists()


def test_a_damaged_text_head_in_output_is_refused_without_overwrite(tmp_path, hub):
    out = tmp_path / "seg"
    out.mkdir()
    (out / "text_head.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(b"listed, never read")  # INPUT is listed before the head is built
    config = SegmentConfig(str(tmp_path / "in"), str(out), classes_text="sky, road", backbone=SMALL)
    with pytest.raises(DinosegError, match="--overwrite") as e:
        run_segment(config)
    assert "\n" not in str(e.value) and (out / "text_head.pt").read_bytes() == b"not a checkpoint"


def test_classes_text_resumes_into_an_output_url_with_user_info(tmp_path, hub, monkeypatch):
    """The one resume check (the identity) compares the text head's model as rows hold it, with
    the URL's user-info redacted: an earlier run's masks of this very head are resumed, not
    refused as another model's."""
    import fsspec

    from model.hub import head_checksum

    out = "memory://user:secret@bkt/seg"
    head = build_text_head(TextHeadRequest("sky, road", backbone=SMALL))
    rows = pa.table(
        {
            "key": ["a"],
            "model": [f"{head.backbone}+memory://***@bkt/seg/text_head.pt"],  # as redact_table wrote it
            "head_checksum": [head_checksum(head.state_dict)],
        }
    )
    import model.text_head

    monkeypatch.setattr(model.text_head, "build_text_head", lambda *a, **k: head)  # built once, above
    fs = fsspec.filesystem("memory")
    with fs.open("user:secret@bkt/seg/predictions/part-00000000-00000.parquet", "wb") as f:
        pq.write_table(rows, f)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(b"done by the earlier run, never read")
    try:
        counts = run_segment(SegmentConfig(str(tmp_path / "in"), out, classes_text="sky, road", backbone=SMALL))
        assert counts == {"inputs": 1, "predicted": 0, "skipped": 1, "failed": 0}
        assert fs.exists("user:secret@bkt/seg/text_head.pt"), "written once the resume check passed"
    finally:
        fs.rm("user:secret@bkt", recursive=True)
