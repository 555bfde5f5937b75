"""The drill's advisor: reads the alert email and uses its links the way a browser does.

Contract:
- `email_links(message)` is the alert's buttons as a mail client shows them: the button's words
  ("Approve", "Review or modify", "Defer", "Escalate to compliance") → its URL, from the HTML part.
- `approve_by_link(client, url)` opens the one-click approve link (GET with a browser's Accept:
  the page, which changes nothing), then presses its button (POST of the empty urlencoded form),
  and returns what the advisor saw on both pages.
- `modify_in_portal(client, url, reason)` opens the "Review or modify" link, changes one quantity
  in the page's form (the largest buy, to about 90% in whole shares) and records it (POST of
  every field, as the form sends them); returns what the advisor saw and the quantity changed.
- Only what a browser would send: no API token, no JSON. The page's words come back as they are
  (account numbers on them are already masked by the portal).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from email.message import EmailMessage
from html.parser import HTMLParser

BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
FORM = {"Content-Type": "application/x-www-form-urlencoded", "Accept": BROWSER_ACCEPT}


@dataclass
class PageView:
    """What a person reads on a page: its title, first heading, the status sentence and the form."""

    status: int = 0
    title: str = ""
    heading: str = ""
    lede: str = ""  # the result's sentence (`<p class="lede …">`), or the first error shown
    inputs: list[dict[str, str]] = field(default_factory=list)  # the form's <input>s (name, value, aria-label)
    links: dict[str, str] = field(default_factory=dict)  # an <a>'s words → its href

    def said(self) -> str:
        """One line: the heading and its sentence (what the advisor takes away)."""
        heading = self.heading or self.title
        if self.lede and (not heading or self.lede.startswith(heading)):  # "Approved — the trades go …"
            return self.lede
        return " — ".join(part for part in (heading, self.lede) if part)


class _Reader(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.view = PageView()
        self._in: list[str] = []  # open tags whose text we collect: title, h1, lede, error, a
        self._href = ""
        self._text: dict[str, list[str]] = {"title": [], "h1": [], "lede": [], "a": []}

    def handle_starttag(self, tag, attrs):
        attrs = {k: v or "" for k, v in attrs}
        classes = attrs.get("class", "").split()
        if tag == "input" and attrs.get("name"):
            self.view.inputs.append({"name": attrs["name"], "value": attrs.get("value", ""),
                                     "label": attrs.get("aria-label", "")})
        if tag == "title":
            self._in.append("title")
        elif tag == "h1" and not self._text["h1"]:
            self._in.append("h1")
        elif tag in ("p", "div") and ("lede" in classes or "field-error" in classes) and not self._text["lede"]:
            self._in.append("lede")
        elif tag == "a" and attrs.get("href"):
            self._href, self._text["a"] = attrs["href"], []
            self._in.append("a")

    def handle_endtag(self, tag):
        wanted = {"title": "title", "h1": "h1", "p": "lede", "div": "lede", "a": "a"}.get(tag)
        if wanted and self._in and self._in[-1] == wanted:
            self._in.pop()
            if wanted == "a":
                words = " ".join(" ".join(self._text["a"]).split())
                if words:
                    self.view.links.setdefault(words, self._href)

    def handle_data(self, data):
        if self._in:
            self._text[self._in[-1]].append(data)

    def close(self):
        super().close()
        join = lambda key: " ".join(" ".join(self._text[key]).split())  # noqa: E731
        self.view.title, self.view.heading, self.view.lede = join("title"), join("h1"), join("lede")


def read_page(html: str, status: int = 0) -> PageView:
    reader = _Reader()
    reader.feed(html)
    reader.close()
    reader.view.status = status
    return reader.view


def email_links(message: EmailMessage) -> dict[str, str]:
    """The email's buttons (words → URL), from its HTML part."""
    part = message.get_body(("html",))
    return read_page(part.get_content()).links if part is not None else {}


@dataclass(frozen=True)
class AdvisorVisit:
    opened: PageView  # the page the link opened (GET)
    result: PageView  # the page after pressing the button (POST)
    changed: str = ""  # what was changed in the form, in the page's words ("Buy VTI (••••1234): 40 → 36")


def approve_by_link(client, url: str) -> AdvisorVisit:
    opened = client.get(url, headers={"Accept": BROWSER_ACCEPT})
    pressed = client.post(url, content=b"", headers=FORM)
    return AdvisorVisit(read_page(opened.text, opened.status_code), read_page(pressed.text, pressed.status_code))


def _smaller(quantity: float) -> float:
    """About 90% of a quantity in whole shares (whole shares suit stocks, ETFs and funds alike)."""
    reduced = math.floor(quantity * 0.9)
    if reduced >= quantity:
        reduced = math.floor(quantity) - 1
    return float(max(reduced, 1))


def _number(text: str) -> str:
    return f"{float(text):.10f}".rstrip("0").rstrip(".")


def modify_in_portal(client, url: str, reason: str) -> AdvisorVisit:
    opened_response = client.get(url, headers={"Accept": BROWSER_ACCEPT})
    opened = read_page(opened_response.text, opened_response.status_code)
    rows = [i for i in opened.inputs if i["name"].startswith("qty_")]
    buys = [i for i in rows if i["label"].startswith("New quantity: Buy") and float(i["value"] or 0) >= 2]
    if not buys:  # already decided (no form), or nothing to change: show what the page says
        return AdvisorVisit(opened, opened)
    chosen = max(buys, key=lambda i: float(i["value"]))
    before = float(chosen["value"])
    after = _smaller(before)
    fields = {i["name"]: (_number(str(after)) if i is chosen else i["value"]) for i in rows}
    fields["reason"] = reason
    pressed = client.post(url, data=fields, headers=FORM)
    label = chosen["label"].removeprefix("New quantity: ")
    return AdvisorVisit(opened, read_page(pressed.text, pressed.status_code),
                        changed=f"{label}: {_number(str(before))} → {_number(str(after))}")
