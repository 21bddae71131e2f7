"""Plans: what the rules decide for one request, and for its response.

``RuleSet.plan(request)`` is run before every lookup, hits included. It returns the
``RequestPlan`` of the first rule whose request conditions hold and that has no
response conditions (bypass, key, client_cache_control), with the rules *with*
response conditions met before it; ``RequestPlan.for_response`` then picks the
``StorePlan`` (ttl, no_store, tags, ...) of the first of those whose status and type
hold, else its own. The contract of the two moments is stated once, in ``proxy.rules``.

A rule whose ``key`` lower-cases the path has the origin asked for the lower-cased path: the
rules are then read again on that path, and what they decide there wins (``RuleSet._lowered``).
A path that some origins read as another path (``;`` parameters, an escaped ``/`` they do not
decode, ``\\``, a NUL, a segment's trailing dots or spaces) is read that way too, and a plan there
unsafe to share with this one bypasses (``RuleSet._read_otherwise``). A HEAD is planned as a GET
of it, every reading and check included, with only the bypass, reply edits and
client_cache_control of a rule for HEAD without GET met first on the rules' own reading
(``RuleSet._head``): its miss fills the entry every GET is answered from.

Speed: the path's first segment picks the (precomputed, ordered) rules that can match
it, and the scan stops at the first request-time rule. A rule's plan and store plan
are built at load, so a request without response-dependent rules allocates nothing
here but its ``RequestView``; the few combinations with them are memoised.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TypeVar

from proxy.policy.fields import ambiguous_cookie
from proxy.policy.headers import caching_field, reply_edits
from proxy.policy.keys import DEFAULT_KEY, KeySpec, lower_path
from proxy.policy.messages import CacheOptions, ClientCacheControl, RequestHead
from proxy.policy.partial import representation_status
from proxy.policy.request import PATH_READ_OTHERWISE, normalise_path, path_readings
from proxy.policy.spellings import aliases, spelled_otherwise
from proxy.rules.match import Match, Predicate, QueryReading, RequestView, first_segment

T = TypeVar("T")
CACHED_METHODS = frozenset({"GET", "HEAD"})
# More ambiguous fields the rules read than this in one request: a bypass at once (``_reread``).
MAX_AMBIGUOUS = 8


@dataclass(frozen=True, slots=True)
class HeaderEdits:
    add: tuple[tuple[str, str], ...] = ()  # set (replacing any origin value) on the way to the client
    remove: tuple[str, ...] = ()
    drop: frozenset[str] = frozenset()  # lower-cased names of both, precomputed
    caching: bool = False  # touches a field later caches obey (``policy.headers.caching_field``)

    def __bool__(self) -> bool:
        return bool(self.add or self.remove)

    def apply(self, headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """``headers`` edited; on a personal reply, without the edits ``reply_edits`` withholds."""
        add, drop = reply_edits(headers, self.add, self.drop) if self.caching else (self.add, self.drop)
        out = [(k, v) for k, v in headers if k.lower() not in drop]
        out.extend(add)
        return out


def header_edits(add: tuple[tuple[str, str], ...], remove: tuple[str, ...]) -> HeaderEdits:
    drop = frozenset(n.lower() for n in remove) | frozenset(n.lower() for n, _ in add)
    return HeaderEdits(add, remove, drop, any(caching_field(n) for n in drop))


@dataclass(frozen=True, slots=True)
class Actions:
    """What a rule (or the defaults) sets; None means "not set here"."""

    ttl: Mapping[int, float] | None = None
    ttl_default: float | None = None
    override_origin: bool | None = None
    bypass: bool = False
    no_store: bool = False
    key: KeySpec | None = None
    stale_while_revalidate: float | None = None
    stale_if_error: float | None = None
    tags: tuple[str, ...] = ()
    response_headers: HeaderEdits | None = None
    client_cache_control: ClientCacheControl | None = None
    deception_guard: bool | None = None
    ttl_jitter: float | None = None  # a fraction: 0.1 shortens lifetimes by 0-10%
    allow_set_cookie: bool | None = None


@dataclass(frozen=True, slots=True)
class StorePlan:
    """The store-time outcome of the rules for one response."""

    rule: Rule | None
    options: CacheOptions
    no_store: bool
    tags: tuple[str, ...]
    deception_guard: bool
    ttl_jitter: float
    response_headers: HeaderEdits | None  # the rule's, else the defaults'

    @property
    def no_store_rule(self) -> str | None:
        """The name of the rule that says no_store, if one does (``policy.fill.StoreRules``)."""
        return self.rule.name if self.no_store and self.rule is not None else None


@dataclass(eq=False, slots=True)
class Rule:
    name: str
    file: str
    line: int
    match: Match
    actions: Actions
    set_fields: tuple[str, ...] = ()  # the action keys written in the file, for explain
    catch_all: bool = False  # written without match conditions: it wins for every request
    store: StorePlan = field(init=False)  # built by RuleSet, which knows the defaults
    holds: Predicate = field(init=False)  # the request conditions, compiled
    needs_response: bool = field(init=False)
    # Matches HEAD without GET: it may only bypass the HEAD or edit its reply (``RuleSet._head``).
    head_only: bool = field(init=False)
    plan: RequestPlan = field(init=False)  # the request plan when this rule decides alone

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True, slots=True)
class RequestPlan:
    """The request-time outcome of the rules for one request."""

    rule: Rule | None  # decides bypass, key and client_cache_control
    bypass: bool
    key: KeySpec
    options: CacheOptions
    store: StorePlan  # the store-time plan when no rule with response conditions applies
    # Rules with response conditions whose request conditions held, before ``rule``.
    response_rules: tuple[Rule, ...] = ()
    # The rule whose key lower-cases the path, when the plan was decided on the lower-cased path
    # (the one the origin is asked for) instead of the client's (``RuleSet.plan``).
    lowered_by: Rule | None = None
    # The Cache-Status detail of a bypass the rules did not ask for (``AMBIGUOUS-COOKIE:<name>``,
    # ``AMBIGUOUS-HEADER:<name>``, ``AMBIGUOUS-QUERY:<name>``, ``AMBIGUOUS-PATH``).
    detail: str | None = None
    # The path as some origins read it, when the rules decide otherwise there (``RuleSet._read_otherwise``).
    read_as: str | None = None
    # A HEAD's plan when a rule for HEAD without GET holds for it (``RuleSet._head``): the
    # rules its own reading met, those with response conditions then the one that decided,
    # whose first holding one edits the HEAD's reply when it is such a rule with response_headers
    # (``response_headers_for``). Empty for every other plan.
    head_rules: tuple[Rule, ...] = ()

    @property
    def bypass_detail(self) -> str:
        """The Cache-Status detail of a bypass: the rule's, or why the request could not be cached."""
        if self.detail is not None:
            return self.detail
        assert self.rule is not None
        return f"RULE-BYPASS:{self.rule.name}"

    @property
    def response_headers(self) -> HeaderEdits | None:
        """The edits when they do not depend on the response (see ``response_headers_for``)."""
        return self.store.response_headers

    def for_response(self, status: int, content_type: str | None) -> StorePlan:
        for r in self.response_rules:
            if r.match.response_holds(status, content_type):
                return r.store
        return self.store

    def response_headers_for(self, status: int, content_type: str | None) -> HeaderEdits | None:
        """The edits for a reply of this status and type; a 206 takes its 200's
        (``representation_status``), from whichever source it comes."""
        if self.head_rules:
            return self._head_edits(representation_status(status), content_type)
        if not self.response_rules:
            return self.store.response_headers
        return self.for_response(representation_status(status), content_type).response_headers

    def _head_edits(self, status: int, content_type: str | None) -> HeaderEdits | None:
        """A HEAD's edits: those of the first of its own rules that holds for the reply when it
        is for HEAD without GET and sets response_headers, else the GET's."""
        for r in self.head_rules:
            if r.needs_response and not r.match.response_holds(status, content_type):
                continue
            if r.head_only and r.actions.response_headers is not None:
                return r.actions.response_headers
            break
        return self.for_response(status, content_type).response_headers


def lowered_path(request: RequestHead) -> RequestHead:
    """``request`` with its path lower-cased as ``key.lowercase_path`` sends it to the origin
    (``request`` itself when that changes nothing)."""
    path, sep, query = request.target.partition("?")
    lowered = lower_path(path)
    return request if lowered == path else request._replace(target=lowered + sep + query)


def origin_readings(request: RequestHead) -> tuple[RequestHead, ...]:
    """``request`` with its path as each origin that reads it otherwise acts on it
    (``path_readings``: a servlet's ``/cart`` for ``/cart;x``, IIS's ``/account`` for
    ``/a%5C..%5Caccount``, a raw router's ``/static/..%2Faccount`` for what the rules read as
    ``/account``); ``()`` when every origin reads it as the rules do. Each is escaped again so
    that ``normalise_path`` gives the reading back as it is.

    >>> [r.target for r in origin_readings(RequestHead("GET", "http", "h", "/cart;x?a=1", ()))]
    ['/cart?a=1']
    >>> origin_readings(RequestHead("GET", "http", "h", "/plain/path", ()))
    ()
    """
    raw, sep, query = request.target.partition("?")
    return tuple(request._replace(target=other.replace("%", "%25").replace("?", "%3F") + sep + query)
                 for other in path_readings(raw))


def first(*values: T | None) -> T | None:
    """The first value that is set here (not None): a rule's, else the defaults'."""
    for v in values:
        if v is not None:
            return v
    return None


def _shared_as(plan: RequestPlan) -> tuple[object, ...]:
    """What of a plan decides what one client's answer may do to another's: bypass, key, storing
    at all, the edits clients get, the options that loosen what is stored or served, the tags a
    purge finds it by, and which statuses a ttl of 0 keeps from being served from the store
    (Varnish's idiom for "never from the cache"). A lifetime's length (ttl, stale_*, jitter) is
    left out: two readings that differ only there cache the same answer under the same key, only
    for longer or shorter. With override_origin, the ttl table is whole: it decides where the
    origin's no-cache and must-revalidate are dropped."""
    store, options = plan.store, plan.store.options
    ttls = ((options.ttl_by_status, options.ttl_default) if options.override_origin else
            (frozenset(s for s, t in options.ttl_by_status.items() if t <= 0),
             options.ttl_default is not None and options.ttl_default <= 0))
    return (plan.bypass, plan.key, plan.response_rules, store.no_store, store.response_headers,
            store.deception_guard, options.override_origin, options.allow_set_cookie,
            options.client_cache_control, store.tags, ttls)


def _same_rules(again: RequestPlan, plan: RequestPlan) -> bool:
    """Whether two plans come from the same rules. Both are a GET's (a HEAD's readings are its
    GET's: ``RuleSet._head``), so a rule for HEAD alone is in neither."""
    return again.rule is plan.rule and again.response_rules == plan.response_rules


def _decides_otherwise(again: RequestPlan, plan: RequestPlan) -> bool:
    """Whether another reading of a request does something unsafe to share with this one
    (``_shared_as``): ``?category[]=shoes``, which PHP reads as ``category``, is still cached
    when the rule for ``category`` only sets a longer ttl."""
    if _same_rules(again, plan):
        return again.bypass != plan.bypass
    return _shared_as(again) != _shared_as(plan)


class RuleSet:
    """Compiled rules of every file, in order, with the merged defaults."""

    def __init__(self, defaults: Actions | None = None, rules: tuple[Rule, ...] = (),
                 base: CacheOptions | None = None, files: tuple[str, ...] = ()) -> None:
        self.defaults = defaults or Actions()
        self.rules = rules
        self.base = base or CacheOptions()
        self.files = files
        self.default_store = self._store_plan(None)
        self.default_plan = RequestPlan(None, False, DEFAULT_KEY, self.default_store.options,
                                        self.default_store)
        for r in rules:
            r.holds = r.match.predicate()
            r.needs_response = r.match.needs_response
            r.store = self._store_plan(r)
            r.head_only = r.match.methods is not None and "GET" not in r.match.methods
            a = r.actions
            r.plan = RequestPlan(r, a.bypass, a.key or DEFAULT_KEY, r.store.options, r.store)
        self._plans: dict[tuple[Rule | None, ...], RequestPlan] = {}
        self._unkeyable: dict[tuple[str | Rule | None, ...], RequestPlan] = {}
        # The cookies any rule reads in a condition: a request whose Cookie reads ambiguously
        # for one of them (``policy.fields.cookies``) is not cached (see ``plan``). Not those
        # only a rule for HEAD without GET reads: they decide nothing stored (``_head``), and a
        # GET with ``beta=1; beta=2`` was bypassed for a HEAD rule's ``beta``.
        self.cookie_names = tuple(dict.fromkeys(c.name for r in rules if not r.head_only
                                                for c in r.match.cookies))
        # The header fields any rule's condition reads, lower-cased (``_field_readings``).
        self.header_names = tuple(dict.fromkeys(c.name.lower() for r in rules for c in r.match.headers))
        # Index by the first path segment: the rules a path with segment S can match, in order
        # (those fixing S and those fixing none). One pass over the rules: asking every rule
        # its segment once per segment made 5000 one-path rules take seconds to load.
        segments = [(r, r.match.first_segment()) for r in rules]
        by_segment: dict[str, list[Rule]] = {s: [] for _, s in segments if s is not None}
        other: list[Rule] = []
        for r, seg in segments:
            if seg is not None:
                by_segment[seg].append(r)
                continue
            other.append(r)
            for matching in by_segment.values():
                matching.append(r)
        self._other = tuple(other)
        self._by_segment = {s: tuple(matching) for s, matching in by_segment.items()}
        # Whether some rule is for HEAD without GET: a HEAD is then planned as a GET of it plus
        # what such a rule adds (``_head``); otherwise it is scanned as a GET, once.
        self._head_only = any(r.head_only for r in rules)
        self._heads: dict[tuple[int | Rule, ...], tuple[RequestPlan, RequestPlan]] = {}

    def rebased(self, base: CacheOptions) -> RuleSet:
        return RuleSet(self.defaults, tuple(replace(r) for r in self.rules), base, self.files)

    def plan(self, request: RequestHead) -> RequestPlan:
        if self._head_only and request.method == "HEAD":
            return self._head(request)
        plan = self._first_match(request)
        if plan.key.lowercase_path and not plan.bypass:
            plan = self._lowered(request, plan)
        if not plan.bypass and PATH_READ_OTHERWISE.search(request.target) is not None:
            plan = self._read_otherwise(request, plan)
        if plan.key.headers and not plan.bypass and (request.underscores or plan.key.underscores):
            return self._keyed_once(request, plan)
        return plan

    def _keyed_once(self, request: RequestHead, plan: RequestPlan) -> RequestPlan:
        """``plan``, or a bypass when the request also carries a field its key reads under another
        spelling (``_`` and ``-`` swapped: ``policy.spellings``). A CGI, WSGI or Rack origin reads
        ``X-Tenant: acme`` with ``X_Tenant: evil`` as tenant ``evil`` (the later line wins), while
        the key held ``acme``: ``evil``'s page was stored for every ``acme`` client. Neither
        looked up nor stored (``Cache-Status`` detail ``AMBIGUOUS-HEADER:<name>``). Asked only of a
        plan whose key reads headers, for a request with ``_`` in a field name (or a keyed name
        with one): ``normalise_request`` saw the names already (``RequestHead.underscores``)."""
        name = spelled_otherwise(plan.key.headers, request.headers)
        if name is None:
            return plan
        return self._unkeyable_plan(f"AMBIGUOUS-HEADER:{name}", plan)

    def _read_otherwise(self, request: RequestHead, plan: RequestPlan) -> RequestPlan:
        """``plan``, or a bypass when the rules decide otherwise on the path as some origin reads
        it (``origin_readings``): the origin may answer that other path, and its answer must not
        be stored for everyone under this one (web cache deception). ``/account;%2f..%2fstatic%2fx.html``
        is ``/static/x.html`` to the rules but a servlet's ``/account``: the static rule stored
        the victim's page. A bypass or ``no_store`` there gives ``RULE-BYPASS:<that rule>``;
        another plan unsafe to share (``_decides_otherwise``) ``AMBIGUOUS-PATH``."""
        for other in origin_readings(request):
            again = self._first_match(other)
            if again.key.lowercase_path and not again.bypass:
                again = self._lowered(other, again)
            read_as = normalise_path(other.target.partition("?")[0])
            if again.bypass:
                return replace(plan, bypass=True, detail=again.bypass_detail, read_as=read_as)
            if _same_rules(again, plan):
                continue
            if again.store.no_store and not plan.store.no_store and again.rule is not None:
                return replace(plan, bypass=True, detail=f"RULE-BYPASS:{again.rule.name}", read_as=read_as)
            if _shared_as(again) != _shared_as(plan):
                return replace(plan, bypass=True, detail="AMBIGUOUS-PATH", read_as=read_as)
        return plan

    def _lowered(self, request: RequestHead, plan: RequestPlan) -> RequestPlan:
        """The plan for a request whose key lower-cases the path: the origin is asked for the
        lower-cased path (``fill_target``), so the rules must be read on that path, not on the
        client's. Matched on the client's ``/Account/x``, a ``bypass`` rule for ``/account/**``
        would not hold while the origin answered ``/account/x``, stored for everyone under the
        lower-cased key (web cache deception with one capital letter).

        The plan for the lower-cased path wins when it lower-cases the path too, or bypasses;
        otherwise (its key keeps the case: the origin would then be asked for the client's
        path, which the rules did not decide) the request is bypassed.
        """
        lowered = lowered_path(request)
        if lowered is request:
            return plan
        again = self._first_match(lowered)
        if _same_rules(again, plan):
            return plan
        if again.bypass or again.key.lowercase_path:
            return replace(again, lowered_by=plan.rule)
        return replace(plan, bypass=True, lowered_by=plan.rule)

    def _first_match(self, request: RequestHead) -> RequestPlan:
        view = RequestView(request)
        plan = self._scan(view)
        if plan.bypass or (view.repeated_param is None and view.repeated is None):
            return plan
        return self._reread(request, view, plan)

    def _reread(self, request: RequestHead, view: RequestView, plan: RequestPlan) -> RequestPlan:
        """``plan``, or a bypass when the rules decide otherwise on the request as some origin
        reads its ambiguous query parameters and fields, each reading of the one combined with
        each of the other: for an origin that reads ``?mode=view&mode=edit`` as ``edit`` and
        ``X-Mode`` sent twice as its first line, a ``bypass`` rule on both held only in that
        combination, which no reading tried, and its editor form was stored for everyone.

        The query is read with its first values (the rules' own reading), its last (Rails,
        Django), as PHP reads it (``php_params``) and, when it has a ``;``, split there too
        (``split_params``: Rack 2, Go before 1.17); the fields as sent and each way
        ``_field_readings`` lists. At most 5 x 6 readings; a reading that finds an ambiguity the
        first did not reach (a rule evaluated only there) adds its readings. When one decides
        otherwise the request is neither looked up nor stored: ``AMBIGUOUS-QUERY:<name>`` when
        that reading read the query otherwise, else ``AMBIGUOUS-HEADER:<name>``, the first such
        parameter or field a condition read. Only requests with such a parameter or field a
        condition read get here."""
        param, field = view.repeated_param, view.repeated
        query = request.target.partition("?")[2]  # PHP reads no name otherwise without these:
        others: tuple[QueryReading, ...] = ("php",) if any(c in query for c in ".[ %+") else ()
        if ";" in query:  # Rack 2, Go before 1.17: ``?x=1;edit_mode=1`` holds ``edit_mode``
            others = (*others, "split_first", "split_last")
        fields: list[dict[str, str | None] | None] = [None]  # None: the fields as sent
        if field is not None:
            more = self._field_readings(request, view)
            if more is None:
                return self._unkeyable_plan(f"AMBIGUOUS-HEADER:{field}", plan)
            fields.extend(more)
        done = {("first", 0)}
        while True:
            found = (param, field)
            queries: tuple[QueryReading, ...] = ("first",) if param is None else ("first", "last", *others)
            for reading_of_query in queries:
                for i, reading in enumerate(fields):
                    if (reading_of_query, i) in done:
                        continue
                    done.add((reading_of_query, i))
                    other = RequestView(request, reading, reading_of_query)
                    if _decides_otherwise(self._scan(other), plan):
                        detail = (f"AMBIGUOUS-QUERY:{param}" if reading_of_query != "first"
                                  else f"AMBIGUOUS-HEADER:{field}")
                        return self._unkeyable_plan(detail, plan)
                    if param is None and other.repeated_param is not None:
                        param = other.repeated_param
                    if field is None and other.repeated is not None:
                        field = other.repeated
                        more = self._field_readings(request, other)
                        if more is None:
                            return self._unkeyable_plan(f"AMBIGUOUS-HEADER:{field}", plan)
                        fields.extend(more)
            if (param, field) == found:
                return plan

    def _scan(self, view: RequestView) -> RequestPlan:
        """The plan of the first rule that holds for ``view`` (one reading of the request)."""
        response_rules: list[Rule] | None = None
        plan = self.default_plan
        for r in self._by_segment.get(first_segment(view.path), self._other):
            if not r.holds(view):
                continue
            if r.needs_response:
                if response_rules is None:
                    response_rules = []
                response_rules.append(r)
                continue
            plan = r.plan
            break
        if response_rules is not None:
            plan = self._composed(plan, response_rules)
        if (view._cookies is not None or plan.key.cookies) and not plan.bypass:
            plan = self._unambiguous(view, plan)
        return plan

    def _head(self, request: RequestHead) -> RequestPlan:
        """The plan of a HEAD when some rule is for HEAD without GET: a HEAD that misses fills the
        GET entry, and every GET is answered from it, so what is looked up and stored, and how,
        is what a GET of the same request gets, every ambiguity check included (``plan``).
        Such a rule met first (before the rule a GET meets) adds only what is the HEAD's own: its
        ``bypass`` (the HEAD is then bypassed), its ``response_headers`` (the HEAD's reply,
        ``RequestPlan.head_rules``) and its ``client_cache_control`` (the HEAD's lookup). Its
        plan alone, the defaults', replaced the GET's: a HEAD with a session cookie stored the
        logged-in page a later bypass rule kept from the cache, for every GET after it.

        Such rules are read on the rules' own reading only, on a view of their own: what only
        they read (``?v=1&v=2``, ``Cookie: beta=1; beta=2``, ``/static/..;/account/x``) is no
        ambiguity for the HEAD. They decide nothing another client gets: the HEAD's answer is
        the GET's entry, whose readings ``plan`` checks, or, bypassed, the origin's, stored
        for no one. Read in every reading, they bypassed a HEAD whose GET was a HIT."""
        own = RequestView(request)
        response_rules: list[Rule] = []
        rule: Rule | None = None
        for r in self._by_segment.get(first_segment(own.path), self._other):
            if not r.holds(own):
                continue
            if r.needs_response:
                response_rules.append(r)
                continue
            rule = r
            break
        if rule is not None and rule.head_only:
            if rule.actions.bypass:
                return self._composed(rule.plan, response_rules) if response_rules else rule.plan
        elif not any(r.head_only for r in response_rules):
            return self.plan(request._replace(method="GET"))  # none met: the GET's plan
        as_get = self.plan(request._replace(method="GET"))
        return self._head_plan(as_get, (*response_rules, *((rule,) if rule is not None else ())))

    def _head_plan(self, as_get: RequestPlan, head_rules: tuple[Rule, ...]) -> RequestPlan:
        """``as_get`` (the plan of a GET of the request) for a HEAD whose own reading met
        ``head_rules`` (``_head``: those with response conditions, then the one that decided).
        Memoised by ``as_get``'s id (the memo keeps it alive) when it is a rule's plan or
        memoised too: a plan another path reading or a lower-cased path built is made anew."""
        memo: tuple[int | Rule, ...] = (id(as_get), *head_rules)
        found = self._heads.get(memo)
        if found is not None:
            return found[1]
        rule = head_rules[-1] if head_rules and not head_rules[-1].needs_response else None
        options, edits = as_get.options, as_get.store.response_headers
        if rule is not None and rule.head_only:
            if rule.actions.client_cache_control is not None:
                options = replace(options, client_cache_control=rule.actions.client_cache_control)
            if rule.actions.response_headers is not None:
                edits = rule.actions.response_headers
        plan = replace(as_get, options=options, store=replace(as_get.store, response_headers=edits),
                       head_rules=head_rules)
        if len(self._heads) < 4096 and as_get.read_as is None and as_get.lowered_by is None:
            self._heads[memo] = (as_get, plan)
        return plan

    def _field_readings(self, request: RequestHead, view: RequestView) -> list[dict[str, str | None]] | None:
        """The other readings of the fields the rules read that came as several lines or spelled
        otherwise too, each for all of them at once; None when more than ``MAX_AMBIGUOUS`` came.

        A value condition reads a field sent as several lines joined with ``, `` (RFC 9110
        §5.3), but aiohttp, Go and Varnish read its first line and some frameworks its last:
        ``X-Requested-With: XMLHttpRequest`` sent twice did not hold a bypass rule's ``equals:
        XMLHttpRequest`` while the origin answered its XHR fragment, stored for every browser.
        And CGI, WSGI and Rack origins read ``X_Requested_With`` as ``X-Requested-With`` (both
        are ``HTTP_X_REQUESTED_WITH``), which the rules did not see. So: their first line, their
        last, and with the other spellings as more lines, first, last and joined (at most 5);
        the other fields as they are."""
        headers = request.headers
        own: dict[str, tuple[str, ...]] = {}  # lower-cased name -> its lines
        other: dict[str, tuple[str, ...]] = {}  # -> its other spellings
        for n in self.header_names:
            lines = view.lines.get(n)
            if lines is None:
                lines = tuple(headers.getall(n, ()))
            names = aliases(headers, n, view.spelled)
            if len(lines) > 1 or names:
                own[n] = lines
                if names:
                    other[n] = names
        if len(own) > MAX_AMBIGUOUS:
            return None
        readings = [{n: lines[0] if lines else None for n, lines in own.items()}]
        last: dict[str, str | None] = {n: lines[-1] if lines else None for n, lines in own.items()}
        if last != readings[0]:
            readings.append(last)
        if other:  # the other spellings as more lines, in the order they came
            wanted = {n: (n, *names) for n, names in other.items()}
            every: dict[str, list[str]] = {n: list(own[n]) if n not in other else [] for n in own}
            for k, v in headers.items():
                low = k.lower()
                for n, spellings in wanted.items():
                    if low in spellings:
                        every[n].append(v)
            more: tuple[dict[str, str | None], ...] = (
                {n: lines[0] for n, lines in every.items()},
                {n: lines[-1] for n, lines in every.items()},
                {n: ", ".join(lines) for n, lines in every.items()})
            for reading in more:
                if reading not in readings:
                    readings.append(reading)
        return readings

    def _unambiguous(self, view: RequestView, plan: RequestPlan) -> RequestPlan:
        """``plan``, or a bypass when a cookie the rules read (in a condition, or the key) reads
        ambiguously (``policy.fields.ambiguous_cookie``), or a value condition evaluated on the
        scan decided otherwise on the value as an origin decodes it (``preview=%31`` under
        ``preview: "1"``: ``RequestView.decoded_otherwise``): the request is then neither looked
        up nor stored, with ``Cache-Status`` detail ``AMBIGUOUS-COOKIE:<name>``."""
        read = view._cookies is not None  # a cookie condition was evaluated
        jar = view.cookies()
        name = (ambiguous_cookie(jar, self.cookie_names) or view.decoded_otherwise) if read else None
        if name is None:
            name = ambiguous_cookie(jar, plan.key.cookies)
            if name is None:
                return plan
        return self._unkeyable_plan(f"AMBIGUOUS-COOKIE:{name}", plan)

    def _unkeyable_plan(self, detail: str, plan: RequestPlan) -> RequestPlan:
        """``plan`` as a bypass with Cache-Status ``detail``; the few combinations are memoised."""
        memo = (detail, plan.rule, *plan.response_rules)
        bypass = self._unkeyable.get(memo)
        if bypass is None:
            bypass = replace(plan, bypass=True, detail=detail)
            if len(self._unkeyable) < 4096:
                self._unkeyable[memo] = bypass
        return bypass

    def _composed(self, plan: RequestPlan, response_rules: list[Rule]) -> RequestPlan:
        """``plan`` with response-dependent rules before it; the few combinations are memoised."""
        key = (plan.rule, *response_rules)
        composed = self._plans.get(key)
        if composed is None:
            composed = replace(plan, response_rules=tuple(response_rules))
            if len(self._plans) < 4096:
                self._plans[key] = composed
        return composed

    def key_shapes(self, request: RequestHead) -> list[KeySpec]:
        """Every key spec a GET of ``request``'s URL may be stored under, whatever fields and
        cookies it carries: the plan's for ``request`` as it is, and that of every rule whose
        URL conditions hold (``Match.url_holds``), on its path as sent and, when one of those
        keys lower-cases it, on the lower-cased path (``_lowered``). A purge by URL plans a
        request with no fields, which a rule with a header condition (``X-Mobile: present``)
        never matched: the URL's entries under that rule's key (``query: ignore``: its path
        alone) escaped it."""
        specs = [self.plan(request).key]
        self._url_shapes(request, specs, lowered=False)
        if any(spec.lowercase_path for spec in specs):
            # A lower-casing rule reads the rules again on the lower-cased path (``_lowered``),
            # where a rule the client's path does not match (``/shop/**`` for ``/Shop/x``) keys
            # it: with a header condition, the plan above never reached it either.
            lowered = lowered_path(request)
            if lowered is not request:
                self._url_shapes(lowered, specs, lowered=True)
        return specs

    def _url_shapes(self, request: RequestHead, specs: list[KeySpec], *, lowered: bool) -> None:
        """Add to ``specs`` the key of every rule whose URL conditions hold for ``request``
        (``lowered``: a lower-cased path, which only a key that lower-cases it is reached by)."""
        view = RequestView(request)
        for r in self._by_segment.get(first_segment(view.path), self._other):
            key = r.actions.key
            if key is not None and not r.actions.bypass and key not in specs \
                    and (key.lowercase_path or not lowered) and r.match.url_holds(view):
                specs.append(key)

    def trace(self, request: RequestHead) -> list[tuple[Rule, str | None]]:
        """Every rule with the first request condition that fails (None: it holds). For explain."""
        view = RequestView(request)
        return [(r, r.match.request_mismatch(view)) for r in self.rules]

    def _store_plan(self, rule: Rule | None) -> StorePlan:
        a = rule.actions if rule is not None else None
        d = self.defaults
        ttl = a.ttl if a is not None and a.ttl is not None else d.ttl
        ttl_default = a.ttl_default if a is not None and a.ttl is not None else d.ttl_default
        override = bool(a and a.override_origin)
        options = replace(
            self.base,
            ttl_by_status=ttl if ttl is not None else self.base.ttl_by_status,
            ttl_default=ttl_default,
            override_origin=override,
            stale_while_revalidate=first(a.stale_while_revalidate if a else None,
                                          d.stale_while_revalidate) or 0.0,
            stale_if_error=first(a.stale_if_error if a else None, d.stale_if_error) or 0.0,
            client_cache_control=first(a.client_cache_control if a else None,
                                        d.client_cache_control) or "honor",
            allow_set_cookie=bool(first(a.allow_set_cookie if a else None, d.allow_set_cookie)),
        )
        guard = a.deception_guard if a is not None and a.deception_guard is not None else override
        return StorePlan(
            rule=rule,
            options=options,
            no_store=bool(a and a.no_store),
            tags=a.tags if a else (),
            deception_guard=guard,
            ttl_jitter=first(a.ttl_jitter if a else None, d.ttl_jitter) or 0.0,
            response_headers=first(a.response_headers if a else None, d.response_headers),
        )
