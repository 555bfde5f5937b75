"""Validation of FIX 4.4 messages against QuickFIX's FIX44.xml data dictionary.

The dictionary (data/FIX44.xml, from the quickfix 1.16.0 sdist; licence in
data/QUICKFIX_LICENSE.txt) is read with the standard library's ElementTree. A message is
checked the way a counterparty's engine would check it before accepting it:

* framing: BeginString(8), BodyLength(9), MsgType(35) first, CheckSum(10) last; on the wire,
  BodyLength and CheckSum equal to what the bytes give;
* every tag is a FIX 4.4 field and allowed where it stands: in the header, in the trailer, or
  in the body of this message type (components expanded), group members only inside their
  repeating group, which must open with its delimiter field and have as many instances as its
  NoXxx count says; no tag twice outside a group;
* required fields of the header, the trailer, the message and each group instance present;
* values of their type (INT, QTY, PRICE, UTCTIMESTAMP, CHAR, BOOLEAN, ...) and, where the
  dictionary lists values, one of them;
* the FIX 4.4 rules the XML cannot express for the messages rebal sends: SecurityIDSource(22)
  with SecurityID(48), and a NewOrderSingle sized by one of OrderQty(38), CashOrderQty(152),
  OrderPercent(516) (the OrderQtyData component).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import simplefix

FIX44_XML = Path(__file__).with_name("data") / "FIX44.xml"
SOH = b"\x01"


class FixValidationError(ValueError):
    def __init__(self, reasons: list[str]):
        super().__init__("; ".join(reasons))
        self.reasons = reasons


@dataclass(frozen=True)
class FieldDef:
    tag: int
    name: str
    type: str
    values: frozenset[str] = frozenset()

    def label(self) -> str:
        return f"{self.name}({self.tag})"


@dataclass
class Layout:
    """The fields allowed at one level (header, trailer, message body or a group instance), in
    dictionary order, with repeating groups keyed by their NoXxx count tag."""

    required: dict[int, bool] = field(default_factory=dict)
    groups: dict[int, Group] = field(default_factory=dict)


@dataclass
class Group:
    count_tag: int
    delimiter: int
    layout: Layout


@dataclass(frozen=True)
class MessageDef:
    name: str
    msgtype: str
    layout: Layout


# FIX 4.4 Volume 1, "Data types". Numbers: optional sign, digits, optional decimal point, no
# exponent; timestamps in UTC.
_INT = re.compile(r"-?\d+")
_UINT = re.compile(r"\d+")
_FLOAT = re.compile(r"-?(\d+(\.\d*)?|\.\d+)")
_UTCTIMESTAMP = re.compile(r"(\d{8})-(\d{2}):(\d{2}):(\d{2})(\.\d{3})?")
_UTCTIMEONLY = re.compile(r"(\d{2}):(\d{2}):(\d{2})(\.\d{3})?")
_DATE = re.compile(r"\d{8}")
_MONTHYEAR = re.compile(r"\d{6}(\d{2}|w[1-5])?")


def _type_error(kind: str, value: str) -> str | None:
    """Why `value` is not of the FIX type `kind` (None: it is)."""
    if kind in ("INT",):
        ok = _INT.fullmatch(value)
    elif kind in ("SEQNUM", "LENGTH", "NUMINGROUP"):
        ok = _UINT.fullmatch(value)
    elif kind in ("QTY", "PRICE", "PRICEOFFSET", "AMT", "FLOAT", "PERCENTAGE"):
        ok = _FLOAT.fullmatch(value)
    elif kind == "CHAR":
        ok = len(value) == 1 and value != " "
    elif kind == "BOOLEAN":
        ok = value in ("Y", "N")
    elif kind == "UTCTIMESTAMP":
        m = _UTCTIMESTAMP.fullmatch(value)
        ok = bool(m) and _valid_datetime(value[:17])
    elif kind == "UTCTIMEONLY":
        ok = bool(_UTCTIMEONLY.fullmatch(value)) and _valid_time(value[:8])
    elif kind in ("UTCDATEONLY", "LOCALMKTDATE"):
        ok = bool(_DATE.fullmatch(value)) and _valid_date(value)
    elif kind == "MONTHYEAR":
        ok = bool(_MONTHYEAR.fullmatch(value)) and _valid_date(value[:6] + "01")
    elif kind == "CURRENCY":
        ok = len(value) == 3 and value.isalpha()
    elif kind == "COUNTRY":
        ok = len(value) == 2 and value.isalpha()
    else:  # STRING, MULTIPLEVALUESTRING, EXCHANGE, DATA
        ok = True
    return None if ok else f"{value!r} is not a valid {kind}"


def _valid_datetime(text: str) -> bool:
    try:
        datetime.strptime(text, "%Y%m%d-%H:%M:%S")
    except ValueError:
        return False
    return True


def _valid_time(text: str) -> bool:
    try:
        datetime.strptime(text, "%H:%M:%S")
    except ValueError:
        return False
    return True


def _valid_date(text: str) -> bool:
    try:
        datetime.strptime(text, "%Y%m%d")
    except ValueError:
        return False
    return True


class FixDictionary:
    """A QuickFIX data dictionary (FIX44.xml): fields, header, trailer, messages."""

    def __init__(self, path: Path):
        root = ET.parse(path).getroot()
        self.version = f"{root.get('type')}.{root.get('major')}.{root.get('minor')}"
        self.fields: dict[int, FieldDef] = {}
        by_name: dict[str, int] = {}
        for element in root.find("fields"):
            values = frozenset(v.get("enum") for v in element.findall("value"))
            definition = FieldDef(int(element.get("number")), element.get("name"), element.get("type"), values)
            self.fields[definition.tag] = definition
            by_name[definition.name] = definition.tag
        self._by_name = by_name
        self._components = {c.get("name"): c for c in root.find("components")}
        self.header = self._layout(root.find("header"))
        self.trailer = self._layout(root.find("trailer"))
        self.messages: dict[str, MessageDef] = {}
        for element in root.find("messages"):
            self.messages[element.get("msgtype")] = MessageDef(element.get("name"), element.get("msgtype"),
                                                               self._layout(element))

    def tag(self, name: str) -> int:
        return self._by_name[name]

    def label(self, tag: int) -> str:
        known = self.fields.get(tag)
        return known.label() if known else f"tag {tag}"

    def _layout(self, element: ET.Element, layout: Layout | None = None, required: bool = True) -> Layout:
        """Expand components inline. A field of an optional component is not required even if the
        component lists it as required (it is required only when the component is used)."""
        layout = layout if layout is not None else Layout()
        for child in element:
            child_required = required and child.get("required") == "Y"
            if child.tag == "field":
                layout.required[self._by_name[child.get("name")]] = child_required
            elif child.tag == "component":
                self._layout(self._components[child.get("name")], layout, child_required)
            elif child.tag == "group":
                count_tag = self._by_name[child.get("name")]
                inner = self._layout(child, Layout(), True)
                layout.required[count_tag] = child_required
                layout.groups[count_tag] = Group(count_tag, next(iter(inner.required)), inner)
        return layout

    # -----------------------------------------------------------------------------------------
    # Validation
    # -----------------------------------------------------------------------------------------

    def validate(self, message: simplefix.FixMessage | list[tuple]) -> list[str]:
        """Why the message is not a valid FIX 4.4 message (empty list: it is valid).

        `message` is a parsed message (simplefix.FixParser) or its (tag, value) pairs. A message
        built with simplefix and not yet encoded has no BodyLength and CheckSum: it is encoded
        and parsed back first, which is what the counterparty will see."""
        if isinstance(message, simplefix.FixMessage) and not any(int(t) == 10 for t, _ in message.pairs):
            try:
                data = message.encode()
            except ValueError as exc:  # no BeginString or MsgType to frame it with
                return [f"the message cannot be framed: {exc}"]
            parser = simplefix.FixParser()
            parser.append_buffer(data)
            message = parser.get_message()
        pairs = [(int(tag), (value.decode("latin-1") if isinstance(value, bytes) else str(value)))
                 for tag, value in (message.pairs if isinstance(message, simplefix.FixMessage) else message)]
        errors: list[str] = []
        if [t for t, _ in pairs[:3]] != [8, 9, 35]:
            errors.append("the message must begin with BeginString(8), BodyLength(9), MsgType(35)")
        if not pairs or pairs[-1][0] != 10:
            errors.append("the message must end with CheckSum(10)")
        elif not re.fullmatch(r"\d{3}", pairs[-1][1]):
            errors.append(f"CheckSum(10) {pairs[-1][1]!r} is not three digits")
        begin = next((v for t, v in pairs if t == 8), None)
        if begin != self.version:
            errors.append(f"BeginString(8) is {begin!r}, the dictionary is {self.version}")
        msgtype = next((v for t, v in pairs if t == 35), None)
        message_def = self.messages.get(msgtype)
        if message_def is None:
            errors.append(f"MsgType(35) {msgtype!r} is not a FIX 4.4 message type")

        # Header fields come first and trailer fields last (FIX 4.4 Vol. 1: message structure).
        i = 0
        while i < len(pairs) and self._in_layout(pairs[i][0], self.header):
            i += 1
        j = len(pairs)
        while j > i and self._in_layout(pairs[j - 1][0], self.trailer):
            j -= 1
        errors += self._walk(pairs[:i], self.header, "header")
        if message_def is not None:
            errors += self._walk(pairs[i:j], message_def.layout, message_def.name)
        errors += self._walk(pairs[j:], self.trailer, "trailer")

        for tag, value in pairs:
            definition = self.fields.get(tag)
            if definition is None:
                continue  # reported by the walk
            if value == "":
                errors.append(f"{definition.label()} has no value")
                continue
            if SOH.decode() in value:
                errors.append(f"{definition.label()} contains the SOH delimiter")
            problem = _type_error(definition.type, value)
            if problem:
                errors.append(f"{definition.label()}: {problem}")
            elif definition.values:
                tokens = value.split(" ") if definition.type == "MULTIPLEVALUESTRING" else [value]
                bad = [t for t in tokens if t not in definition.values]
                if bad:
                    errors.append(f"{definition.label()}: {' '.join(bad)!r} is not one of its enumerated values "
                                  f"({', '.join(sorted(definition.values)[:12])}"
                                  f"{', ...' if len(definition.values) > 12 else ''})")
        if message_def is not None and message_def.name == "NewOrderSingle":
            errors += self._order_rules(pairs)
        return errors

    def check(self, message: simplefix.FixMessage | list[tuple]) -> None:
        """Raise FixValidationError with every reason if the message is not valid."""
        errors = self.validate(message)
        if errors:
            raise FixValidationError(errors)

    def validate_wire(self, data: bytes) -> list[str]:
        """Validate one encoded message: BodyLength and CheckSum against its bytes, then parsed
        back with simplefix.FixParser and validated field by field."""
        errors = []
        data = data.rstrip(b"\r\n")
        m = re.match(rb"8=[^\x01]*\x019=(\d+)\x01", data)
        tail = data.rfind(SOH + b"10=")
        if not m or tail < 0 or not data.endswith(SOH):
            return ["not a framed FIX message (8=...|9=...| ... |10=nnn|)"]
        declared = int(m.group(1))
        actual = tail + 1 - m.end()
        if declared != actual:
            errors.append(f"BodyLength(9) is {declared}, the body has {actual} bytes")
        checksum = sum(data[:tail + 1]) % 256
        stated = data[tail + 4:-1].decode("latin-1")
        if stated != f"{checksum:03d}":
            errors.append(f"CheckSum(10) is {stated!r}, the bytes give {checksum:03d}")
        parser = simplefix.FixParser()
        parser.append_buffer(data)
        try:
            message = parser.get_message()
        except Exception as exc:  # simplefix raises its own errors for malformed fields
            return errors + [f"simplefix cannot parse the message: {exc!r}"]
        if message is None:
            return errors + ["simplefix found no complete message"]
        return errors + self.validate(message)

    def _in_layout(self, tag: int, layout: Layout) -> bool:
        if tag in layout.required:
            return True
        return any(self._in_layout(tag, g.layout) for g in layout.groups.values())

    def _walk(self, pairs: list[tuple[int, str]], layout: Layout, where: str) -> list[str]:
        errors: list[str] = []
        i = self._walk_level(pairs, 0, layout, where, errors, in_group=False)
        for tag, _ in pairs[i:]:
            errors.append(self._misplaced(tag, where))
        return errors

    def _misplaced(self, tag: int, where: str) -> str:
        if tag not in self.fields:
            return f"tag {tag} is not a FIX 4.4 field (unknown tag)"
        return f"{self.label(tag)} is not allowed here in {where}"

    def _walk_level(self, pairs: list[tuple[int, str]], i: int, layout: Layout, where: str, errors: list[str],
                    in_group: bool) -> int:
        """Consume the fields of one level from pairs[i:]; return where it stopped. At the top
        level every field is consumed (misplaced ones reported); in a group instance, the walk
        stops at the first field that is not the instance's (or that opens the next instance)."""
        seen: set[int] = set()
        start = i
        while i < len(pairs):
            tag, value = pairs[i]
            if in_group and (tag not in layout.required or (i > start and tag == self._delimiter_of(layout))):
                break
            if tag not in layout.required:
                errors.append(self._misplaced(tag, where))
                i += 1
                continue
            if tag in seen:
                errors.append(f"{self.label(tag)} appears twice in {where}")
            seen.add(tag)
            i += 1
            group = layout.groups.get(tag)
            if group is not None:
                count = int(value) if _UINT.fullmatch(value) else 0
                instances = 0
                while i < len(pairs) and pairs[i][0] == group.delimiter:
                    instances += 1
                    i = self._walk_level(pairs, i, group.layout, f"{where} group {self.label(tag)}", errors,
                                         in_group=True)
                if instances != count:
                    errors.append(f"{self.label(tag)} says {value} instances, the message has {instances} "
                                  f"(each must begin with {self.label(group.delimiter)})")
        for tag, required in layout.required.items():
            if required and tag not in seen:
                errors.append(f"required field {self.label(tag)} is missing from {where}")
        return i

    @staticmethod
    def _delimiter_of(layout: Layout) -> int:
        return next(iter(layout.required))

    def _order_rules(self, pairs: list[tuple[int, str]]) -> list[str]:
        tags = {t for t, _ in pairs}
        errors = []
        if 48 in tags and 22 not in tags:
            errors.append("SecurityIDSource(22) is required when SecurityID(48) is given")
        sizes = tags & {38, 152, 516}
        if len(sizes) != 1:
            errors.append("NewOrderSingle needs exactly one of OrderQty(38), CashOrderQty(152), OrderPercent(516) "
                          f"(OrderQtyData); it has {len(sizes)}")
        return errors


@lru_cache(maxsize=1)
def load_fix44() -> FixDictionary:
    """The shipped FIX 4.4 dictionary (parsed once per process)."""
    return FixDictionary(FIX44_XML)


def validate(message: simplefix.FixMessage | list[tuple]) -> list[str]:
    """Why a parsed message is not valid FIX 4.4 (empty: valid)."""
    return load_fix44().validate(message)


def validate_wire(data: bytes) -> list[str]:
    """Why one encoded message (its bytes) is not valid FIX 4.4 (empty: valid)."""
    return load_fix44().validate_wire(data)
