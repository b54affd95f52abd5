"""`flora k8s render --check` holds the committed serveConfigV2 files to deployments/."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from flora.cli import main
from flora.k8s.render import TARGETS
from tests.k8s.conftest import ROOT


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """Copies of what render reads and writes: the real files are never touched."""
    for part in ("deployments", "k8s"):
        shutil.copytree(ROOT / part, tmp_path / part)
    return tmp_path


def render(root: Path, *flags: str) -> int:
    return main(["k8s", "render", "--root", str(root), *flags])


def test_the_committed_files_are_current(capsys):
    assert render(ROOT, "--check") == 0, capsys.readouterr().err
    assert capsys.readouterr().out.count("unchanged") == len(TARGETS)


def test_a_change_in_deployments_is_drift_until_rendered(repo, capsys):
    source = repo / "deployments" / "starcoder-gpu.yaml"
    config = yaml.safe_load(source.read_text())
    config["applications"][0]["deployments"][0]["autoscaling_config"]["max_replicas"] = 6
    source.write_text(yaml.safe_dump(config, sort_keys=False))
    output = repo / "k8s" / "overlays" / "gpu" / "serve-config.yaml"
    before = output.read_text()

    assert render(repo, "--check") == 1
    err = capsys.readouterr().err
    assert "-          max_replicas: 8" in err and "+          max_replicas: 6" in err
    assert output.read_text() == before  # --check writes nothing

    assert render(repo) == 0
    assert "max_replicas: 6" in output.read_text()
    assert render(repo, "--check") == 0


def test_a_missing_file_is_drift(repo, capsys):
    (repo / "k8s" / "overlays" / "cpu-demo" / "serve-config.yaml").unlink()
    assert render(repo, "--check") == 1
    assert "missing" in capsys.readouterr().out


def test_an_invalid_serve_config_is_refused_and_nothing_is_written(repo, capsys):
    source = repo / "deployments" / "starcoder.yaml"
    source.write_text(source.read_text().replace("torch_threads: 2", "torch_thread: 2"))
    output = repo / "k8s" / "overlays" / "cpu-demo" / "serve-config.yaml"
    before = output.read_text()
    assert render(repo) == 2
    assert "torch_thread" in capsys.readouterr().err
    assert output.read_text() == before


def test_the_demo_overrides_reach_the_embedded_config(repo):
    (target,) = [t for t in TARGETS if "cpu-demo" in t.output]
    patch = yaml.safe_load((repo / target.output).read_text())
    embedded = yaml.safe_load(patch["spec"]["serveConfigV2"])
    source = yaml.safe_load((repo / target.source).read_text())
    assert source["http_options"]["host"] == "127.0.0.1"
    assert embedded["http_options"]["host"] == "0.0.0.0"
    assert embedded["proxy_location"] == "EveryNode"
    assert embedded["applications"] == source["applications"]
