"""Data-driven scenario files in the style of etcd raft's `testdata/*.txt`, shared by the
scenario tests of the protocol cores (tests/txn, tests/replication).

A script is a sequence of blocks: a command line, a `----` line, the output the command must
produce (zero or more non-blank lines), then a blank line. Comment (`#`) and blank lines between
blocks are kept as they are when a file is rewritten with the code's current answers.
"""

from __future__ import annotations

from dataclasses import dataclass


class ScenarioError(Exception):
    """A malformed scenario file (not a failure of the code under test)."""


# -- the file format -------------------------------------------------------------------------


@dataclass
class Block:
    leading: list[str]
    """Comment and blank lines before the command, kept verbatim on rewrite."""
    line_no: int
    command: str
    expected: list[str]


@dataclass
class Script:
    blocks: list[Block]
    trailer: list[str]


def parse_script(text: str) -> Script:
    lines = text.splitlines()
    blocks: list[Block] = []
    leading: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip() or line.lstrip().startswith("#"):
            leading.append(line)
            i += 1
            continue
        if i + 1 >= len(lines) or lines[i + 1] != "----":
            raise ScenarioError(f"line {i + 1}: command {line!r} is not followed by '----'")
        expected: list[str] = []
        j = i + 2
        while j < len(lines) and lines[j].strip():
            expected.append(lines[j])
            j += 1
        blocks.append(Block(leading, i + 1, line, expected))
        leading = []
        i = j + 1  # skip the blank line that ends the block
    return Script(blocks, leading)


def render_script(script: Script, outputs: list[list[str]]) -> str:
    out: list[str] = []
    for block, output in zip(script.blocks, outputs, strict=True):
        out += [*block.leading, block.command, "----", *output, ""]
    out += script.trailer
    while out and not out[-1].strip():
        out.pop()
    return "\n".join(out) + "\n"


def mismatches(script: Script, outputs: list[list[str]], where: str) -> list[str]:
    out = []
    for block, got in zip(script.blocks, outputs, strict=True):
        if got != block.expected:
            out.append(
                f"{where}:{block.line_no}: {block.command}\n"
                + "  expected:\n"
                + "".join(f"    {line}\n" for line in block.expected or ["(nothing)"])
                + "  got:\n"
                + "".join(f"    {line}\n" for line in got or ["(nothing)"])
            )
    return out
