"""``flora train`` and ``flora eval loss`` from the shell: files, resume, push, clear errors."""

from __future__ import annotations

import json

import pytest

from adapter_registry import BaseModelCatalog, Registry
from adapter_registry.app import create_app
from adapter_registry.blobs import LocalBlobStore
from adapter_registry.client import RegistryClient
from adapter_registry.index.sqlite import SqliteIndex
from flora.cli import main
from flora.model.adapter_files import load_adapter_dir, read_config
from flora.model.checkpoint import load_model
from tests.adapter_registry.conftest import ADMIN_KEY, SPEC
from tests.servers import http_server


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    """A JSONL corpus with two languages and several 'files' each (held-out split by file)."""
    path = tmp_path_factory.mktemp("data") / "texts.jsonl"
    rows = []
    for i in range(8):
        rows.append(
            {"language": "perl", "text": f"sub f{i} {{ my $x = {i}; return $x * 2; }}\n" * 30}
        )
        rows.append(
            {"language": "tcl", "text": f"proc p{i} {{x}} {{ return [expr $x + {i}] }}\n" * 30}
        )
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _train(micro_model, texts, out, *extra):
    return main(
        [
            "train",
            "--model",
            str(micro_model),
            "--out",
            str(out),
            "--data",
            str(texts),
            "--language",
            "perl",
            "tcl",
            "--steps",
            "4",
            "--batch-size",
            "2",
            "--seq-len",
            "32",
            "--eval-every",
            "2",
            "--quiet",
            *extra,
        ]
    )


def test_train_then_eval(micro_model, texts, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert _train(micro_model, texts, out, "--kind", "lora", "--rank", "2", "--lr", "1e-3") == 0
    printed = capsys.readouterr().out
    assert "training 2 lora adapter(s), rank 2, lr 0.001" in printed
    for lang in ("perl", "tcl"):
        config = read_config(out / lang)
        assert config["peft_type"] == "LORA" and config["r"] == 2
        assert load_adapter_dir(out / lang, load_model(micro_model).args).rank == 2
        assert json.loads((out / lang / "training.json").read_text())["steps"] == 4
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [2, 4]
    # Same command again: resumes at the end and rewrites the same adapters.
    assert _train(micro_model, texts, out, "--kind", "lora", "--rank", "2", "--lr", "1e-3") == 0
    assert "resumed from step 4" in capsys.readouterr().out

    table = tmp_path / "eval.md"
    assert (
        main(
            [
                "eval",
                "loss",
                "--model",
                str(micro_model),
                "--data",
                str(texts),
                "--language",
                "perl",
                "tcl",
                "--seq-len",
                "32",
                "--adapter",
                f"perl={out / 'perl'}",
                "--adapter",
                f"tcl={out / 'tcl'}",
                "--out",
                str(table),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "| language | tokens | base | perl | tcl |" in printed
    assert "| perl |" in table.read_text()


def test_clear_errors(micro_model, texts, tmp_path, capsys) -> None:
    assert _train(micro_model, texts, tmp_path / "a", "--kind", "ia3", "--rank", "4") == 2
    assert "IA3 adapters have no rank" in capsys.readouterr().err
    assert (
        main(
            [
                "train",
                "--model",
                str(tmp_path / "nope"),
                "--out",
                str(tmp_path / "b"),
                "--language",
                "perl",
            ]
        )
        == 2
    )
    assert "error:" in capsys.readouterr().err
    assert _train(micro_model, tmp_path / "missing.jsonl", tmp_path / "c") == 2
    assert "neither a folder nor a .jsonl" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x", "language": "perl"}\nnot json\n')
    assert _train(micro_model, bad, tmp_path / "d") == 2
    assert "bad.jsonl:2: not valid JSON" in capsys.readouterr().err
    assert (
        main(
            ["eval", "loss", "--model", str(micro_model), "--language", "perl", "--adapter", "oops"]
        )
        == 2
    )
    assert "NAME=DIR" in capsys.readouterr().err
    # A finished run's directory is not silently reused for different settings.
    assert _train(micro_model, texts, tmp_path / "e") == 0
    capsys.readouterr()
    assert _train(micro_model, texts, tmp_path / "e", "--seed", "7") == 2
    assert "other settings" in capsys.readouterr().err


def test_push_registers_each_language(micro_model, texts, tmp_path, capsys, monkeypatch) -> None:
    """--push uploads every adapter to a real registry (embedded backend, real HTTP server)."""
    monkeypatch.delenv("FLORA_API_KEY", raising=False)
    assert _train(micro_model, texts, tmp_path / "nokey", "--push") == 2
    assert "FLORA_API_KEY" in capsys.readouterr().err
    assert not (tmp_path / "nokey").exists()  # refused before any training

    registry = Registry(
        SqliteIndex(tmp_path / "index.sqlite3"),
        LocalBlobStore(tmp_path / "blobs"),
        BaseModelCatalog([SPEC]),
        admin_key=ADMIN_KEY,
    )
    with http_server(create_app(registry)) as url, RegistryClient(url, ADMIN_KEY) as admin:
        _, key = admin.create_tenant("acme")
        monkeypatch.setenv("FLORA_API_KEY", key)
        extra = ["--push", "--registry-url", url, "--name-prefix", "ft-", "--user", "ann"]
        assert _train(micro_model, texts, tmp_path / "run", *extra, "--base-model", SPEC.name) == 0
        assert "registered acme/ft-perl@1 (flora, rank 1, perl)" in capsys.readouterr().out
        with RegistryClient(url, key) as acme:
            records = {r.name: r for r in acme.list()}
    assert set(records) == {"ft-perl", "ft-tcl"}
    assert records["ft-tcl"].language == "tcl" and records["ft-tcl"].user == "ann"
