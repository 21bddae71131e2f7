"""YAML rule files: compiled once at load, matched per request without I/O.

A rule file has ``defaults`` (applied before any rule) and ``rules`` (the first
matching rule wins; its fields override the defaults). Matching happens at two
moments, with one meaning of "first match":

- at request time, before the lookup, the first rule whose request conditions
  hold *and that has no response conditions* decides ``bypass``, the cache
  ``key`` and ``client_cache_control``;
- at store time (and when a reply is written, for ``response_headers``), the
  first rule whose request *and* response conditions (``status``,
  ``content_type``) hold decides ``ttl``, ``no_store``, ``tags`` and the rest.
  A rule with no response conditions holds for every response, so the two
  moments agree unless a rule with response conditions comes first.

A HEAD that misses fills the GET entry, so a HEAD is decided at both moments as a
GET of it; a rule for HEAD without GET met first adds only the HEAD's own ``bypass``,
reply edits and ``client_cache_control``, read on the rules' own reading (``RuleSet._head``).

Three modules, one job each:

- ``match``    a rule's conditions, each compiled into one check that both the hot
               predicate and explain's first failing condition use;
- ``plan``     what the rules decide for a request (``RuleSet.plan`` -> ``RequestPlan``)
               and for its response (``StorePlan``), built at load where it can be;
- ``compile``  YAML to rules, rejecting with ``FILE:LINE`` what could never work.

Adding a match field: its key in ``compile.MATCH_KEYS`` and its parsing in
``compile._compile_match``, a field on ``match.Match``, and one ``Check`` (predicate and
explanation together) in ``Match._request_checks`` (or ``_response_checks``). Adding an
action: a field on ``plan.Actions``, its key in ``compile.RULE_KEYS`` (and the lists of
what it applies to: ``DEFAULT_KEYS``, ``CACHE_ACTIONS``, ``REQUEST_TIME_ACTIONS``), its
parsing in ``compile._actions``, and where it lands: a field of ``plan.StorePlan`` set in
``RuleSet._store_plan`` (``compile._merge_defaults`` too when defaults may set it).
"""

from __future__ import annotations

from proxy.policy.request import normalise_path
from proxy.rules.compile import compile_rule_file, glob_to_regex, load_rules
from proxy.rules.match import Check, Condition, HostPattern, Match, RequestView
from proxy.rules.plan import (
    CACHED_METHODS,
    Actions,
    HeaderEdits,
    RequestPlan,
    Rule,
    RuleSet,
    StorePlan,
    header_edits,
    lowered_path,
)

__all__ = [
    "CACHED_METHODS",
    "Actions",
    "Check",
    "Condition",
    "HeaderEdits",
    "HostPattern",
    "Match",
    "RequestPlan",
    "RequestView",
    "Rule",
    "RuleSet",
    "StorePlan",
    "compile_rule_file",
    "glob_to_regex",
    "header_edits",
    "load_rules",
    "lowered_path",
    "normalise_path",
]
