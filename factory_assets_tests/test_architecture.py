"""Dependencies point one way: the import contracts in `.importlinter` hold."""
import logging
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def logging_kept():
    """import-linter's CLI configures logging with ``dictConfig`` and its default
    ``disable_existing_loggers=True``: every logger that exists then (all of factory_assets',
    imported at collection) would stay disabled for the rest of the session, and later tests
    reading records through caplog would see none. Put every logger back as it was."""
    loggers = [logging.getLogger()] + [lg for lg in logging.root.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    saved = [(lg, lg.disabled, lg.level, lg.propagate, list(lg.handlers)) for lg in loggers]
    yield
    for lg, disabled, level, propagate, handlers in saved:
        lg.disabled, lg.propagate = disabled, propagate
        lg.setLevel(level)
        lg.handlers[:] = handlers
    for lg in logging.root.manager.loggerDict.values():  # created by the lint: left as they are, enabled
        if isinstance(lg, logging.Logger) and lg not in loggers:
            lg.disabled = False


def test_the_import_contracts_hold(monkeypatch, capsys):
    from importlinter.cli import lint_imports

    monkeypatch.chdir(ROOT)
    exit_code = lint_imports(config_filename=str(ROOT / ".importlinter"), no_cache=True)
    report = capsys.readouterr().out
    assert exit_code == 0, report


def test_a_forbidden_import_breaks_a_contract(tmp_path, monkeypatch, capsys):
    # the contracts really bite: a copy of the config that forbids storage -> vocabulary fails
    from importlinter.cli import lint_imports

    config = (ROOT / ".importlinter").read_text() + (
        "\n[importlinter:contract:probe]\nname = probe\ntype = forbidden\n"
        "source_modules =\n    factory_assets.storage\nforbidden_modules =\n    pymongo\n")
    path = tmp_path / "probe.ini"
    path.write_text(config)
    monkeypatch.chdir(ROOT)
    assert lint_imports(config_filename=str(path), no_cache=True) != 0
    assert "probe BROKEN" in capsys.readouterr().out
