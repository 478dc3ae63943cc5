"""Union-find over feature variables: each class becomes one merge point (``Space``).

Variable 0 is the special class ``FIXED`` (network input/output channels, frozen class embeddings):
anything joined with it is never permuted and is not emitted as a space.
"""

from __future__ import annotations

from math import lcm

from .errors import GraphError

FIXED = 0


class UnionFind:
    """Feature variables with a size, a readable name and a group size, joined into classes."""

    def __init__(self) -> None:
        self.parent: list[int] = [FIXED]
        self.size: list[int] = [0]
        self.name: list[str] = ["<fixed>"]
        self.group: list[int] = [1]

    def new(self, size: int, name: str, group_size: int = 1) -> int:
        """A fresh variable; ids grow in forward order, so the smallest id in a class is its first."""
        self.parent.append(len(self.parent))
        self.size.append(int(size))
        self.name.append(name)
        self.group.append(group_size)
        return len(self.parent) - 1

    def new_fixed(self, size: int) -> int:
        v = self.new(size, "<fixed>")
        self.parent[v] = FIXED
        return v

    def find(self, v: int) -> int:
        root = v
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[v] != root:  # path compression
            self.parent[v], v = root, self.parent[v]
        return root

    def union(self, a: int, b: int, where: str = "") -> int:
        """Join two classes; the earlier root stays root (so FIXED always wins)."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if FIXED not in (ra, rb) and self.size[ra] != self.size[rb]:
            raise GraphError(
                f"{where}: cannot join features {self.name[ra]!r} ({self.size[ra]}) and "
                f"{self.name[rb]!r} ({self.size[rb]}) of different sizes"
            )
        ra, rb = min(ra, rb), max(ra, rb)
        self.parent[rb] = ra
        self.group[ra] = lcm(self.group[ra], self.group[rb])
        return ra

    def fix(self, v: int) -> None:
        self.union(FIXED, v)

    def is_fixed(self, v: int) -> bool:
        return self.find(v) == FIXED

    def set_group(self, v: int, group_size: int) -> None:
        r = self.find(v)
        self.group[r] = lcm(self.group[r], group_size)
