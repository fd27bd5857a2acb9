"""ChannelGraph: the layouts, memberships and couplings of one traced model, resolved into groups."""
from __future__ import annotations

import math
from typing import Optional

from torch import fx

from ._types import ChannelGraphError, ChannelGroup, ChannelSlice, NodeInfo, _Layout, _Space, _where


def _lcm(a: int, b: int) -> int:
    return a * b // math.gcd(a, b)


class ChannelGraph:
    """The traced model with every node's channel layout and the coupled channels.

    Built by ``build_graph``; ``groups`` lists the public ChannelGroups, ``info[node]`` each
    node's NodeInfo, ``pieces(seg)`` where a layout segment's channels sit in the groups.

    Coupling is resolved at the end (``finish``): each coupling says "channels oa.. of space A
    are channels ob.. of space B". The spaces are cut into atoms at every coupling boundary,
    the cuts carried across couplings until they agree, and coupled atoms merged (union-find):
    a group is a class of equal-length atoms, its channel c is channel c of each atom. So a
    concatenation added to one layer's output couples that layer's first rows with the first
    concatenated layer and its last rows with the second.
    """

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.spaces: list[_Space] = []
        self.info: dict[fx.Node, NodeInfo] = {}
        self.calls: dict[str, list[fx.Node]] = {}  # module name -> its call nodes
        self._members: list[tuple[str, str, int, int, int, int, int]] = []  # (module, role, start, space, sstart, n, spatial)
        self._mod_out: dict[str, _Layout] = {}
        self._mod_in: dict[str, _Layout] = {}
        self._couplings: list[tuple[int, int, int, int, int]] = []  # (space a, start a, space b, start b, n)
        self._fixes: list[tuple[int, int, int, str]] = []  # (space, start, n, reason)
        self._divides: list[tuple[int, int]] = []  # (space, divisions)
        self.groups: list[ChannelGroup] = []
        self._atoms: dict[int, list[int]] = {}  # space -> sorted cut points (0 ... size)
        self._atom_group: dict[tuple[int, int], int] = {}  # (space, atom start) -> group index or -1

    # ---- spaces and coupling (recorded; resolved in finish)
    def new_space(self, size: int, fixed: str = "", divisions: int = 1, producer: bool = True) -> int:
        self.spaces.append(_Space(size, producer))
        sid = len(self.spaces) - 1
        if fixed:
            self._fixes.append((sid, 0, size, fixed))
        if divisions > 1:
            self._divides.append((sid, divisions))
        return sid

    def fix(self, layout: _Layout, reason: str) -> None:
        for s in layout.segs:
            self._fixes.append((s.space, s.start, s.length, reason))

    def divide(self, space: int, d: int) -> None:
        self._divides.append((space, d))

    def space_size(self, s: int) -> int:
        return self.spaces[s].size

    def couple(self, a: _Layout, b: _Layout, node: fx.Node) -> None:
        """Channel i of a is channel i of b (a residual sum, a product, a shared module)."""
        if a.channels != b.channels or a.features != b.features:
            raise ChannelGraphError(f"{_where(node)} combines tensors with {a.channels} and {b.channels} channels")
        ia, ib = list(a.segs), list(b.segs)
        pa = pb = 0  # channels of the current segment already matched
        while ia and ib:
            sa, sb = ia[0], ib[0]
            n = min(sa.length - pa, sb.length - pb)
            oa, ob = sa.start + pa, sb.start + pb
            if sa.spatial != sb.spatial:
                raise ChannelGraphError(
                    f"{_where(node)} couples channels of {self._space_name(sa.space)} flattened {sa.spatial} features "
                    f"each with channels of {self._space_name(sb.space)} flattened {sb.spatial} each (not supported)")
            if (sa.space, oa) != (sb.space, ob):
                self._couplings.append((sa.space, oa, sb.space, ob, n))
            pa += n
            pb += n
            if pa == sa.length:
                ia.pop(0)
                pa = 0
            if pb == sb.length:
                ib.pop(0)
                pb = 0

    def _space_name(self, s: int) -> str:
        for (mod, role, _, space, *_rest) in self._members:
            if role == "out" and space == s:
                return f"'{mod}'"
        return "the model input"

    # ---- memberships
    def member(self, module: str, role: str, layout: _Layout) -> None:
        off = 0
        for s in layout.segs:
            self._members.append((module, role, off, s.space, s.start, s.length, s.spatial))
            off += s.length * (s.spatial if role == "in" else 1)

    def pieces(self, space: int, start: int, length: int) -> list[tuple[int, int, int, int]]:
        """Where channels start .. start+length-1 of a space sit: [(group index or -1 for the model
        input, first group channel, count, offset in the range)]."""
        out = []
        cuts = self._atoms[space]
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            a, b = max(lo, start), min(hi, start + length)
            if a < b:
                out.append((self._atom_group[(space, lo)], a - lo, b - a, a - start))
        return out

    def module_layouts(self, name: str) -> tuple[Optional[_Layout], Optional[_Layout]]:
        """(input layout, output layout) of a module's (first) call."""
        return self._mod_in.get(name), self._mod_out.get(name)

    def _refine(self) -> None:
        """Cut the spaces into atoms so that every coupling pairs whole atoms of equal length."""
        cuts = [{0, sp.size} for sp in self.spaces]
        for a, oa, b, ob, n in self._couplings:
            cuts[a] |= {oa, oa + n}
            cuts[b] |= {ob, ob + n}
        changed = True
        while changed:  # carry each cut across every coupling it falls inside (finite: cuts <= sizes)
            changed = False
            for a, oa, b, ob, n in self._couplings:
                for (x, ox, y, oy) in ((a, oa, b, ob), (b, ob, a, oa)):
                    new = {oy + c - ox for c in cuts[x] if ox < c < ox + n} - cuts[y]
                    if new:
                        cuts[y] |= new
                        changed = True
        self._atoms = {i: sorted(c) for i, c in enumerate(cuts)}

    def finish(self) -> None:
        self._refine()
        ids: dict[tuple[int, int], int] = {}  # (space, atom start) -> atom id
        for s, c in self._atoms.items():
            for lo in c[:-1]:
                ids[(s, lo)] = len(ids)
        parent = list(range(len(ids)))

        def find(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        def atoms_in(s: int, start: int, n: int) -> list[int]:
            c = self._atoms[s]
            return [ids[(s, lo)] for lo in c[:-1] if start <= lo < start + n]

        for a, oa, b, ob, n in self._couplings:
            for i, j in zip(atoms_in(a, oa, n), atoms_in(b, ob, n)):
                ri, rj = find(i), find(j)
                parent[max(ri, rj)] = min(ri, rj)
        key = {v: k for k, v in ids.items()}  # atom id -> (space, start)
        length = {i: self._atoms[s][self._atoms[s].index(lo) + 1] - lo for i, (s, lo) in key.items()}
        fixed: dict[int, str] = {}
        divisions: dict[int, int] = {}
        producer: dict[int, bool] = {}
        for i, (s, lo) in key.items():
            r = find(i)
            producer[r] = producer.get(r, False) or self.spaces[s].producer
        for s, start, n, reason in self._fixes:
            for lo in self._atoms[s][:-1]:
                hi = self._atoms[s][self._atoms[s].index(lo) + 1]
                if lo < start + n and hi > start:
                    fixed.setdefault(find(ids[(s, lo)]), reason)
        for s, d in self._divides:
            whole = [find(i) for i in atoms_in(s, 0, self.spaces[s].size)]
            if len(whole) == 1:
                divisions[whole[0]] = _lcm(divisions.get(whole[0], 1), d)
            else:  # equal counts per conv group across several groups: not expressible, leave them
                for r in whole:
                    fixed.setdefault(r, "feeds or comes from a grouped conv and is coupled in parts")
        roots = sorted({find(i) for i in key if producer[find(i)]})
        index = {r: gi for gi, r in enumerate(roots)}
        for i, (s, lo) in key.items():
            self._atom_group[(s, lo)] = index.get(find(i), -1)
        members: dict[int, list] = {r: [] for r in roots}
        for (mod, role, start, s, sstart, n, spatial) in self._members:
            for gi, gstart, cnt, off in self.pieces(s, sstart, n):
                if gi >= 0:
                    mstart = start + off * (spatial if role == "in" else 1)
                    members[roots[gi]].append(ChannelSlice(mod, role, mstart, gstart, cnt, spatial))
        for r in roots:
            slices, prod, cons, bns = [], [], [], []
            for sl in members[r]:
                if sl not in slices:
                    slices.append(sl)
                lst = {"out": prod, "in": cons, "bn": bns}[sl.role]
                if sl.module not in lst:
                    lst.append(sl.module)
            size, div = length[r], divisions.get(r, 1)
            reason = fixed.get(r, "") or ("a single channel" if size < 2 else "")
            if not reason and div == size:
                reason = f"{div} divisions of one channel (a grouped conv with one channel per group)"
            self.groups.append(ChannelGroup(size, prod, cons, bns, slices, not reason, reason, div))
