"""Reading a received email the way a mail client would: parse the MIME tree, then the HTML."""

from __future__ import annotations

import email
import email.policy
import struct
from dataclasses import dataclass, field
from email.message import EmailMessage
from html.parser import HTMLParser


def parse(raw: bytes) -> EmailMessage:
    return email.message_from_bytes(raw, policy=email.policy.default)


@dataclass
class HtmlView:
    links: list[str] = field(default_factory=list)  # every <a href>, in order, as a client resolves it
    images: list[str] = field(default_factory=list)  # every <img src>
    text: str = ""  # visible text: one line per block (row, paragraph, ...), cells joined by " | "


class _Reader(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.view = HtmlView()
        self._chunks: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "a" and "href" in attrs:
            self.view.links.append(attrs["href"])
        if tag == "img":
            self.view.images.append(attrs.get("src", ""))
        if tag in ("title", "style", "head"):
            self._skip += 1
        if tag in ("br", "p", "tr", "li", "div", "h1", "h2"):
            self._chunks.append("\n")

    def handle_endtag(self, tag):
        if tag in ("title", "style", "head"):
            self._skip -= 1
        if tag in ("td", "th"):
            self._chunks.append(" | ")
        if tag in ("tr", "table"):
            self._chunks.append("\n")

    def handle_data(self, data):
        if not self._skip:  # source line breaks are spaces to a reader; blocks make the lines
            text = " ".join(data.split())
            self._chunks.append((" " if data[:1].isspace() else "") + text + (" " if data[-1:].isspace() and text else ""))


def read_html(html: str) -> HtmlView:
    reader = _Reader()
    reader.feed(html)
    reader.close()
    lines = (" ".join(line.split()) for line in "".join(reader._chunks).splitlines())
    reader.view.text = "\n".join(line for line in lines if line)
    return reader.view


def png_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", png[16:24])
    return width, height
