"""Dependencies point one way: the import contracts in `.importlinter` hold."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
