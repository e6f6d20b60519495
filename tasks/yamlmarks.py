"""Safe, bounded YAML loading that remembers where every value came from.

`load_marked(text)` builds plain Python data from PyYAML's event stream itself, so it can
refuse what a manifest never needs (explicit tags, anchors/aliases, duplicate keys) and
record the line and column of every node, keyed by its path (`("speakers", 0, "box")`).

The build is iterative (no recursion, so 900 levels of `[` are a located error, not a
`RecursionError`) and counts nodes and depth as the events arrive: a hostile document is
refused after at most `max_nodes` events, long before PyYAML would have built all of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import yaml
from yaml.constructor import SafeConstructor

Path_ = tuple[str | int, ...]

# Implicitly resolved scalar tags only: `!!python/object`, `!custom`, binary... are refused.
_PLAIN_TAGS = {
    "tag:yaml.org,2002:null",
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:str",
    "tag:yaml.org,2002:timestamp",
    "tag:yaml.org,2002:seq",
    "tag:yaml.org,2002:map",
}
MAX_NODES = 50_000  # 10x a feature film's 2,000 lines; stops a crafted document within a second
MAX_DEPTH = 32  # a manifest nests 5 deep (speakers[0].box[1].box[2])
# libyaml's parser when PyYAML was built with it (10-50x faster on a large document), else the pure one
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class YamlProblem(ValueError):
    def __init__(self, message: str, line: int, column: int):
        super().__init__(message)
        self.line, self.column = line, column


@dataclass(frozen=True)
class Mark:
    line: int  # 1-based
    column: int  # 1-based


@dataclass
class _Open:
    """A mapping or sequence being built; a mapping waits for a key, then for that key's value."""

    value: dict | list
    path: Path_
    key: str | None = None


@dataclass
class _Builder:
    max_nodes: int = MAX_NODES
    max_depth: int = MAX_DEPTH
    marks: dict[Path_, Mark] = field(default_factory=dict)
    key_marks: dict[Path_, Mark] = field(default_factory=dict)
    nodes: int = 0
    stack: list[_Open] = field(default_factory=list)
    root: object = None
    _scalars: SafeConstructor = field(default_factory=SafeConstructor)

    def feed(self, event: yaml.Event) -> None:
        """One parser event: a scalar, the start or end of a collection."""
        if isinstance(event, yaml.AliasEvent):
            raise _problem(event, "YAML aliases (*name) are not allowed in a manifest; write the value out")
        if isinstance(event, yaml.SequenceEndEvent | yaml.MappingEndEvent):
            self.stack.pop()
            return
        if getattr(event, "anchor", None):
            raise _problem(event, "YAML anchors (&name) are not allowed in a manifest; remove the anchor")
        self._count(event)
        top = self.stack[-1] if self.stack else None
        if isinstance(top, _Open) and isinstance(top.value, dict) and top.key is None:
            top.key = self._key(event, top)
            return
        self._value(event, top)

    def _value(self, event: yaml.Event, top: _Open | None) -> None:
        if top is None:
            path: Path_ = ()
        elif isinstance(top.value, list):
            path = (*top.path, len(top.value))
        else:
            path = (*top.path, top.key)  # type: ignore[arg-type]  (a mapping's value follows its key)
        self.marks[path] = _mark(event)
        if isinstance(event, yaml.ScalarEvent):
            value = self._scalar(event)
        else:
            _check_tag(event, "tag:yaml.org,2002:seq" if isinstance(event, yaml.SequenceStartEvent) else "")
            if len(self.stack) >= self.max_depth:
                raise _problem(event, f"nested more than {self.max_depth} levels deep; a manifest is flat")
            value = [] if isinstance(event, yaml.SequenceStartEvent) else {}
        if top is None:
            self.root = value
        elif isinstance(top.value, list):
            top.value.append(value)
        else:
            top.value[top.key] = value  # type: ignore[index]
            top.key = None
        if isinstance(value, list | dict) and not isinstance(event, yaml.ScalarEvent):
            self.stack.append(_Open(value, path))

    def _key(self, event: yaml.Event, top: _Open) -> str:
        if not isinstance(event, yaml.ScalarEvent):
            raise _problem(event, "mapping keys must be plain words (no merge keys or complex keys)")
        tag = _scalar_tag(event)
        if tag == "tag:yaml.org,2002:merge":
            raise _problem(event, "mapping keys must be plain words (no merge keys or complex keys)")
        key = str(self._scalar(event))
        if key in top.value:
            raise _problem(event, f"duplicate key {key!r}; keep one of them")
        self.key_marks[(*top.path, key)] = _mark(event)
        return key

    def _scalar(self, event: yaml.ScalarEvent) -> object:
        tag = _scalar_tag(event)
        if tag not in _PLAIN_TAGS:
            raise _problem(event, f"YAML tag {tag!r} is not allowed in a manifest; remove it")
        if tag == "tag:yaml.org,2002:timestamp":
            return event.value  # dates stay text; the models decide what they mean
        node = yaml.ScalarNode(tag, event.value, event.start_mark, event.end_mark, event.style)
        return self._scalars.construct_object(node)

    def _count(self, event: yaml.Event) -> None:
        self.nodes += 1
        if self.nodes > self.max_nodes:
            raise _problem(event, f"document has more than {self.max_nodes} nodes; a manifest is far smaller")


def _scalar_tag(event: yaml.ScalarEvent) -> str:
    if event.tag is None or event.tag == "!":
        return _RESOLVER.resolve(yaml.ScalarNode, event.value, event.implicit)
    return event.tag


def _check_tag(event: yaml.Event, seq_tag: str) -> None:
    tag = getattr(event, "tag", None)
    allowed = {None, "!", seq_tag or "tag:yaml.org,2002:map"}
    if tag not in allowed:
        raise _problem(event, f"YAML tag {tag!r} is not allowed in a manifest; remove it")


_RESOLVER = yaml.resolver.Resolver()


def load_marked(
    text: str, *, max_nodes: int = MAX_NODES, max_depth: int = MAX_DEPTH
) -> tuple[object, _Builder]:
    """Parse one YAML document; return (data, builder with .marks / .key_marks)."""
    loader = _Loader(text)
    builder = _Builder(max_nodes=max_nodes, max_depth=max_depth)
    try:
        _build(loader, builder)
    except YamlProblem:
        raise
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        raise YamlProblem(f"not valid YAML: {exc.problem or exc.context}", line, col) from None
    except yaml.YAMLError as exc:
        raise YamlProblem(f"not valid YAML: {exc}", 1, 1) from None
    finally:
        loader.dispose()
    return builder.root, builder


def _build(loader, builder: _Builder) -> None:
    loader.get_event()  # StreamStart
    if loader.check_event(yaml.StreamEndEvent):
        return  # an empty document
    loader.get_event()  # DocumentStart
    while not loader.check_event(yaml.DocumentEndEvent):
        builder.feed(loader.get_event())
    loader.get_event()
    if not loader.check_event(yaml.StreamEndEvent):
        event = loader.peek_event()
        raise _problem(event, "a manifest is one YAML document; remove the second '---' and what follows")


def _mark(event: yaml.Event) -> Mark:
    return Mark(event.start_mark.line + 1, event.start_mark.column + 1)


def _problem(event: yaml.Event, message: str) -> YamlProblem:
    mark = _mark(event)
    return YamlProblem(message, mark.line, mark.column)
