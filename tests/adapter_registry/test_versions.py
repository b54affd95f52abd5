"""Versions are ASCII digits (issue 14): ``str.isdigit`` also takes "²" (then ``int`` fails: a
500) and "𝟙" or "٣" (silently read as @1, @3). Every parser of ``name@version`` refuses them
with a 400 that names the version; ``x@1`` keeps working."""

from __future__ import annotations

from urllib.parse import quote

import pytest

from adapter_registry.client import RegistryClient
from adapter_registry.errors import InvalidName
from adapter_registry.names import AdapterSpec, InvalidVersion
from tests.adapter_registry.test_api import error_of, upload

NOT_ASCII = ["²", "𝟙", "٣", "1²", "１", "𝟙𝟚"]  # superscript, math, Arabic-Indic, fullwidth
MALFORMED = [*NOT_ASCII, "", "0", "x", "-1", "1.0", " 1", "1 ", "1" * 13, "9" * 5000]


@pytest.mark.parametrize("version", MALFORMED)
def test_only_ascii_digits_make_a_version(version: str):
    with pytest.raises(InvalidVersion) as refused:
        AdapterSpec.parse(f"py@{version}")
    assert isinstance(refused.value, InvalidName)  # still a 400 wherever InvalidName is one
    assert refused.value.status == 400
    assert f"invalid version {version[:20]!r}" in refused.value.message


def test_ascii_versions_still_parse():
    assert AdapterSpec.parse("py@1") == AdapterSpec("py", 1)
    assert AdapterSpec.parse("py@123456789012") == AdapterSpec("py", 123456789012)
    assert AdapterSpec.parse("py") == AdapterSpec("py", None)


def test_a_bad_name_is_a_bad_name_whatever_its_version():
    for ref in ("Py@1", "Py@²", "a/b@x"):
        with pytest.raises(InvalidName) as refused:
            AdapterSpec.parse(ref)
        assert not isinstance(refused.value, InvalidVersion)


@pytest.mark.parametrize("version", NOT_ASCII)
def test_show_and_delete_refuse_non_ascii_versions_with_400(acme: RegistryClient, version: str):
    assert upload(acme.http, "py").status_code == 201
    path = "/v1/adapters/" + quote(f"py@{version}", safe="")
    for method in ("GET", "DELETE"):
        error = error_of(acme.http.request(method, path), 400, "invalid_name")
        assert f"invalid version {version!r}" in error["message"], error
    resolved = acme.http.get("/v1/adapters/resolve", params={"adapter": f"py@{version}"})
    assert f"invalid version {version!r}" in error_of(resolved, 400)["message"]
    # nothing was read as @1 and deleted: the adapter is still there, and x@1 still works
    assert [r.label for r in acme.show("py@1")] == ["py@1"]
    assert acme.delete("py@1") == ["acme/py@1"]
