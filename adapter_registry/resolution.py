"""Which adapter serves a request when the client did not name one, and why.

Order (docs/registry.md, "Resolution"): explicit name → (tenant, user, language) →
(tenant, user, any language) → (tenant, language) → global adapter for the language → base
model. Within a rule the newest registration wins. The returned reason goes to logs and
response headers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from adapter_registry.names import GLOBAL
from adapter_registry.records import AdapterRecord, Resolution

# (scope, user, language) → ready records
Lookup = Callable[[str, str | None, str | None], list[AdapterRecord]]


@dataclass(frozen=True)
class _Rule:
    name: str
    scope: str
    user: str | None
    language: str | None
    why: str
    any_language: bool = True  # False: only adapters registered without a language
    any_user: bool = True  # False: only adapters registered without a user

    def accepts(self, record: AdapterRecord) -> bool:
        return (self.any_language or record.language is None) and (
            self.any_user or record.user is None
        )


def _rules(tenant: str, user: str | None, language: str | None) -> list[_Rule]:
    rules = []
    if user and language:
        rules.append(
            _Rule(
                "user+language", tenant, user, language, f"user {user!r}'s adapter for {language}"
            )
        )
    if user:
        rules.append(
            _Rule("user", tenant, user, None, f"user {user!r}'s adapter", any_language=False)
        )
    if language:
        rules.append(
            _Rule(
                "language",
                tenant,
                None,
                language,
                f"{tenant}'s adapter for {language}",
                any_user=False,
            )
        )
        rules.append(
            _Rule(
                "global-language",
                GLOBAL,
                None,
                language,
                f"public adapter for {language}",
                any_user=False,
            )
        )
    return rules


def resolve_implicit(
    lookup: Lookup, tenant: str, user: str | None, language: str | None
) -> Resolution:
    for rule in _rules(tenant, user, language):
        found = [r for r in lookup(rule.scope, rule.user, rule.language) if rule.accepts(r)]
        if found:
            newest = max(found, key=lambda r: (r.created_at, r.version))
            return Resolution(
                adapter=newest, rule=rule.name, reason=f"{newest.label}: newest {rule.why}"
            )
    asked = ", ".join(f"{k}={v!r}" for k, v in (("user", user), ("language", language)) if v)
    return Resolution(
        adapter=None,
        rule="base",
        reason=f"base model: no adapter matches {asked}" if asked else "base model: none asked",
    )
