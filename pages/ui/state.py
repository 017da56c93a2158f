"""Settings that survive page switches and live in the URL, and widgets bound to them.

Settings live in `st.session_state["settings"]` (they survive page switches, unlike widget state)
and in the URL's query params (so a link reopens the same view). A widget is bound to a setting
with `bind(...)`; each page calls `sync_url(...)` with the settings it shows, and the model
source's own parameters (`source`, `suite`, `folder`, `limit`) are always kept in the URL.
"""
from __future__ import annotations

from typing import Any, Callable
from urllib.parse import urlencode

import streamlit as st

SETTINGS = "settings"
PAGE_KEY = "page"  # which script is drawing widgets now (see start_page)
START_URL = "start_url"
PRESENT = "present"  # presenter mode's setting and URL key (pages/ui/presenter.py): kept on every page


def start_page(name: str) -> None:
    """First line of every page script: name the page (widget keys are per page).

    A widget's state belongs to the page that drew it, so each page binds a setting through its
    own widget key; the setting itself (in `settings()`) is what pages share.
    """
    st.session_state[PAGE_KEY] = name


def remember_start_url() -> None:
    """Keep the query params the session was opened with: settings are read from them on first use,
    even on a page reached later (the page shown first rewrites the URL to its own settings)."""
    if START_URL not in st.session_state:
        st.session_state[START_URL] = {k: st.query_params[k] for k in st.query_params}


def start_url() -> dict[str, str]:
    return dict(st.session_state.get(START_URL) or {})


def settings() -> dict[str, Any]:
    if SETTINGS not in st.session_state:
        st.session_state[SETTINGS] = {}
    return st.session_state[SETTINGS]


def _url_value(raw: str, like: Any) -> Any:
    """Parse a query-param string into the type of `like` (the default value)."""
    if isinstance(like, bool):
        return raw.lower() in ("1", "true", "yes", "on")
    if isinstance(like, int):
        return int(float(raw))
    if isinstance(like, float):
        return float(raw)
    if isinstance(like, (list, tuple)):
        items = [v for v in raw.split(",") if v]
        if like and isinstance(like[0], (int, float)) and not isinstance(like[0], bool):
            items = [type(like[0])(float(v)) for v in items]
        return type(like)(items)
    return raw


def _url_string(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def setting(name: str, default: Any, url_key: str | None = None) -> Any:
    """The current value of a setting: session first, then the URL (first visit), then the default.

    `url_key` is the query-param name (default: `name`; "" = never read from the URL)."""
    store = settings()
    if name not in store:
        key = url_key or name
        value = default
        start = st.session_state.get(START_URL)
        url = start if start is not None else {k: st.query_params[k] for k in st.query_params}
        if url_key != "" and key in url:
            try:
                value = _url_value(url[key], default)
            except (TypeError, ValueError):
                value = default  # a hand-edited link with a bad value: fall back quietly
        store[name] = value
    return store[name]


def bind(widget: Callable[..., Any], name: str, default: Any, *args: Any, url_key: str | None = None,
         valid: Callable[[Any], bool] | None = None, **kwargs: Any) -> Any:
    """Draw `widget(*args, key=..., **kwargs)` initialised from (and written back to) setting `name`."""
    value = setting(name, default, url_key)
    if valid is not None and not valid(value):
        value = default
    wkey = f"w.{st.session_state.get(PAGE_KEY, '')}.{name}"
    if wkey not in st.session_state or (valid is not None and not valid(st.session_state[wkey])):
        st.session_state[wkey] = value
    out = widget(*args, key=wkey, **kwargs)
    settings()[name] = out
    return out


def source_url_params() -> dict[str, Any]:
    """The sidebar's source settings as URL params (the demo zoo, the default, needs none)."""
    store = settings()
    kind = store.get("source", "zoo")
    if kind == "folder":
        return {"source": "folder", "folder": store.get("folder") or None}
    params: dict[str, Any] = {"source": "suite", "suite": store.get("suite") or None} if kind == "suite" else {}
    limit = store.get("limit")  # a suite and the demo zoo have test images
    params["limit"] = limit if limit is not None and limit != DEFAULT_LIMIT else None
    return params


DEFAULT_LIMIT = 200  # images per task: a slider's merge + evaluation stays well under a second on a CPU


def sync_url(params: dict[str, Any]) -> None:
    """Make the URL hold exactly the source and these settings (None values are left out)."""
    every_page = {PRESENT: 1 if settings().get(PRESENT) else None}
    wanted = {k: _url_string(v) for k, v in {**source_url_params(), **every_page, **params}.items() if v is not None}
    if dict(st.query_params) != wanted:
        st.query_params.from_dict(wanted)


def current_view() -> str:
    """This page and its settings as a link path ("merge?method=ties&k=20"): what reopens the view."""
    page = st.session_state.get(PAGE_KEY) or ""
    query = urlencode(dict(st.query_params))
    return page + (f"?{query}" if query else "")
