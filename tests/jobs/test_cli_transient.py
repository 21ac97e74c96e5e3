"""A storage fault that outlasts every retry ends a command in one sentence, not a traceback."""

from __future__ import annotations

import logging

import pytest
import typer
from botocore.exceptions import EndpointConnectionError

from jobs.options import run_command


def test_a_store_out_of_reach_is_one_sentence(capsys):
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

    @app.command()
    def segment():
        raise EndpointConnectionError(endpoint_url="http://127.0.0.1:9")

    assert run_command(app, []) == 3
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the storage did not answer (EndpointConnectionError") and "re-run" in err
    assert "\n" not in err and "Traceback" not in err


def test_other_bugs_still_raise():
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

    @app.command()
    def segment():
        raise ZeroDivisionError

    try:
        run_command(app, [])
    except ZeroDivisionError:
        pass
    else:
        raise AssertionError("a bug must not pass for a storage fault")


@pytest.fixture
def run_log(tmp_path):
    """The run's log file, as the CLI sets it up; the process's logging as it was afterwards."""
    from pipeline.runtime import console

    saved, root = dict(console._state), logging.getLogger()
    handlers, level = list(root.handlers), root.level
    path = tmp_path / "run.log"
    console.configure(verbose=False, log_file=str(path))
    yield path
    for handler in console._state["handlers"]:
        root.removeHandler(handler)
        handler.close()
    root.handlers[:], root.level = handlers, level
    console._state.update(saved)
    logging.captureWarnings(False)


def test_a_storage_fault_leaves_its_traceback_in_the_log(run_log, capsys):
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

    @app.command()
    def segment():
        try:
            raise ConnectionResetError(104, "reset by http://user:CANARY@127.0.0.1:9/x?sig=CANARY")
        except ConnectionResetError as e:
            raise RuntimeError("the part could not be written") from e  # raised from a fault: still one

    assert run_command(app, []) == 3
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err and f"the traceback is in {run_log}" in err
    text = run_log.read_text()
    assert "Traceback" in text and "ConnectionResetError" in text and "RuntimeError" in text
    assert "CANARY" not in text and "CANARY" not in err  # redacted there as everywhere


def test_a_bug_while_handling_a_fault_is_a_bug(run_log, capsys):
    """An error raised while handling a reset (its __context__) is not the storage's: it raises."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

    @app.command()
    def segment():
        try:
            raise ConnectionResetError(104, "reset")
        except ConnectionResetError:
            {}["bug"]

    with pytest.raises(KeyError):
        run_command(app, [])
    assert "the storage did not answer" not in capsys.readouterr().err
    assert "KeyError" in run_log.read_text() and "Traceback" in run_log.read_text()


def test_a_corrupt_parquet_file_is_not_the_storage_not_answering(run_log, capsys):
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

    @app.command()
    def segment():
        raise OSError("Couldn't deserialize thrift: parquet footer is corrupt")  # pyarrow's, errno None

    with pytest.raises(OSError):
        run_command(app, [])
    assert "the storage did not answer" not in capsys.readouterr().err
