"""The names PHP reads request parameters and cookies under (``main/php_variables.c``).

PHP registers a query parameter or a cookie (``$_GET``, ``$_COOKIE``) under a rewritten name
(``php_register_variable_ex``), so ``?edit.mode=1`` is its ``edit_mode`` and the cookie
``logged.in`` its ``logged_in``. The rules and the key read names as sent; these say which other
name a PHP origin reads, for ``proxy.rules.match`` (the query) and ``policy.fields.cookies``.
"""

from __future__ import annotations

__all__ = ["php_name"]


def php_name(name: str) -> str | None:
    """The name PHP registers a (decoded) query parameter under (``php_register_variable_ex``,
    PHP 8): cut at a NUL (it takes the name as a C string: ``edit_mode%00x`` is ``edit_mode``),
    leading spaces dropped, ``.`` and `` `` read as ``_``; an array (``a[x]``, ``a[]``)
    under the name before its ``[``; a ``[`` with no ``]`` after it read as ``_``, and the rest's
    `` ``, ``.`` and ``[`` too. None when PHP drops it (an empty name, a ``__Host-`` or
    ``__Secure-`` prefix only the rewriting made).

    >>> php_name("edit.mode"), php_name(" edit mode"), php_name("edit[mode"), php_name("edit[x]")
    ('edit_mode', 'edit_mode', 'edit_mode', 'edit')
    >>> php_name("edit_mode\\x00x")
    'edit_mode'
    """
    name = name.split("\x00", 1)[0].lstrip(" ")
    head, bracket, rest = name.partition("[")
    var = head.replace(" ", "_").replace(".", "_")
    if not var or (var != head and var.startswith(("__Host-", "__Secure-"))
                   and not head.startswith(("__Host-", "__Secure-"))):
        return None
    if not bracket or "]" in rest:
        return var
    return var + "_" + rest.replace(" ", "_").replace(".", "_").replace("[", "_")
