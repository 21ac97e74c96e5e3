"""No credential in a Parquet row, a config's repr, or the CLI's one-sentence error."""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil

import pyarrow as pa
import pytest

import pipeline
from model.errors import DinosegError
from pipeline.io.secrets import redact_table

CANARY = "CANARY-5ecret"


def test_urls_in_string_columns_lose_user_info_and_query_values():
    table = pa.table(
        {
            "path": [f"https://u:{CANARY}@h/a.jpg", "s3://b/ok.jpg", None, f"https://h/b.jpg?X-Amz-Signature={CANARY}"],
            "message": [f"cannot read 'https://u:{CANARY}@h/a.jpg': 403", "", None, "x"],
            "n": [1, 2, 3, 4],
        }
    )
    out = redact_table(table)
    assert out.schema == table.schema and out["n"] == table["n"]
    assert out["path"].to_pylist() == [
        "https://***@h/a.jpg",
        "s3://b/ok.jpg",
        None,
        "https://h/b.jpg?X-Amz-Signature=***",
    ]
    assert out["message"].to_pylist()[0] == "cannot read 'https://***@h/a.jpg': 403"
    clean = pa.table({"path": ["s3://b/a.jpg", "s3://b/what?.jpg"]})  # '?' in an object's name is a name
    assert redact_table(clean).to_pylist() == clean.to_pylist()


def test_a_query_addressed_path_still_names_its_object():
    """Only credential parameters are masked: `?id=1` and `?id=2` stay two images, and a later
    command that re-reads `path` (pseudo-label's pairs, export) reaches the same one."""
    table = pa.table({"path": ["https://api/get?id=1", f"https://api/get?id=2&token={CANARY}"]})
    assert redact_table(table)["path"].to_pylist() == ["https://api/get?id=1", "https://api/get?id=2&token=***"]


def _configs():
    """Every dataclass in pipeline/ with a storage_options field."""
    for info in pkgutil.walk_packages(pipeline.__path__, "pipeline."):
        if ".runtime" in info.name or info.name.endswith(("serve_labelstudio", "backend")):
            continue
        module = importlib.import_module(info.name)
        for obj in vars(module).values():
            if dataclasses.is_dataclass(obj) and isinstance(obj, type) and obj.__module__ == module.__name__:
                if any(f.name in ("storage_options", "weights_env") for f in dataclasses.fields(obj)):
                    yield obj


def test_no_config_repr_shows_storage_options_or_the_hubs():
    found = list(_configs())
    assert {c.__name__ for c in found} >= {"SegmentConfig", "WriteConfig", "PredictConfig", "TrainConfig"}
    for cls in found:
        shown = [f.name for f in dataclasses.fields(cls) if f.name in ("storage_options", "weights_env") and f.repr]
        assert shown == [], f"{cls.__module__}.{cls.__name__} shows {shown} in its repr"


def test_the_clis_error_sentence_shows_no_credential(capsys):
    import typer

    from jobs.options import run_command

    app = typer.Typer(add_completion=False)

    @app.command()
    def fail() -> None:
        raise DinosegError(f"cannot open 'https://user:{CANARY}@host/x.jpg?sig={CANARY}': check the URL.")

    assert run_command(app, []) == 2
    err = capsys.readouterr().err
    assert "https://***@host/x.jpg?sig=***" in err and CANARY not in err


@pytest.mark.parametrize("text", [f'{{"secret": "{CANARY}"', f'["{CANARY}"]'])
def test_bad_storage_options_do_not_echo_their_text(text):
    from pipeline.options import parse_storage_options

    with pytest.raises(DinosegError) as e:
        parse_storage_options(text)
    assert CANARY not in str(e.value)
