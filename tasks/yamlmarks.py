"""Safe YAML loading that remembers where every value came from.

`load_marked(text)` builds plain Python data from PyYAML's node graph itself, so it can
refuse what a manifest never needs (explicit tags, anchors/aliases, duplicate keys) and
record the line and column of every node, keyed by its path (`("speakers", 0, "box")`).
"""

from __future__ import annotations

from dataclasses import dataclass

import yaml

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
MAX_NODES = 100_000  # far above any real manifest; stops a crafted document early


class YamlProblem(ValueError):
    def __init__(self, message: str, line: int, column: int):
        super().__init__(message)
        self.line, self.column = line, column


@dataclass(frozen=True)
class Mark:
    line: int  # 1-based
    column: int  # 1-based


class _Builder:
    def __init__(self) -> None:
        self.marks: dict[Path_, Mark] = {}
        self.key_marks: dict[Path_, Mark] = {}
        self._nodes = 0
        self._scalars = yaml.SafeLoader("")

    def build(self, node: yaml.Node, path: Path_) -> object:
        self._count(node)
        self.marks[path] = _mark(node)
        if node.tag not in _PLAIN_TAGS:
            raise _problem(node, f"YAML tag {node.tag!r} is not allowed in a manifest; remove it")
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, path)
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
        if node.tag == "tag:yaml.org,2002:timestamp":
            return node.value  # dates stay text; the models decide what they mean
        return self._scalars.construct_object(node)

    def _mapping(self, node: yaml.MappingNode, path: Path_) -> dict:
        out: dict = {}
        for key_node, value_node in node.value:
            self._count(key_node)
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                raise _problem(key_node, "mapping keys must be plain words (no merge keys or complex keys)")
            key = str(self._scalars.construct_object(key_node))
            if key in out:
                raise _problem(key_node, f"duplicate key {key!r}; keep one of them")
            self.key_marks[(*path, key)] = _mark(key_node)
            out[key] = self.build(value_node, (*path, key))
        return out

    def _count(self, node: yaml.Node) -> None:
        self._nodes += 1
        if self._nodes > MAX_NODES:
            raise _problem(node, f"document has more than {MAX_NODES} nodes; a manifest is far smaller")


class _NoAliasComposer(yaml.SafeLoader):
    """Refuses anchors and aliases outright: they only make manifests harder to read (and bombs possible)."""

    def compose_node(self, parent, index):  # noqa: ANN001 - PyYAML's signature
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise YamlProblem(
                "YAML aliases (*name) are not allowed in a manifest; write the value out",
                event.start_mark.line + 1,
                event.start_mark.column + 1,
            )
        event = self.peek_event()
        if getattr(event, "anchor", None):
            raise YamlProblem(
                "YAML anchors (&name) are not allowed in a manifest; remove the anchor",
                event.start_mark.line + 1,
                event.start_mark.column + 1,
            )
        return super().compose_node(parent, index)


def load_marked(text: str) -> tuple[object, _Builder]:
    """Parse one YAML document; return (data, builder with .marks / .key_marks)."""
    loader = _NoAliasComposer(text)
    try:
        node = loader.get_single_node()
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
    builder = _Builder()
    if node is None:
        return None, builder
    return builder.build(node, ()), builder


def _mark(node: yaml.Node) -> Mark:
    return Mark(node.start_mark.line + 1, node.start_mark.column + 1)


def _problem(node: yaml.Node, message: str) -> YamlProblem:
    mark = _mark(node)
    return YamlProblem(message, mark.line, mark.column)
